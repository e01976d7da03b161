"""ScaleKV selection of rows that all share one cut (the CPU and GPU tests' view of `select_kept`)."""

from __future__ import annotations

import torch

from varserve.cache.plan import ScoredCut
from varserve.cache.scalekv import select_kept


def cut_rows(cut: ScoredCut, rows: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """`select_kept`'s per-row window positions, lengths and capacities of `rows` rows of one cut."""
    window = torch.as_tensor(cut.window_positions).expand(rows, -1)
    lengths, capacity = (torch.full((rows,), n) for n in (cut.attend_len, cut.capacity))
    return tuple(x.to(device) for x in (window, lengths, capacity))


def select_for_cut(keys: torch.Tensor, window_q: torch.Tensor, cut: ScoredCut) -> torch.Tensor:
    """Kept positions [G, H, cut.capacity] of G rows of one cut."""
    return select_kept(keys, window_q, *cut_rows(cut, keys.shape[0], keys.device), cut.capacity)
