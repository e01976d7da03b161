"""ScaleKV selection of rows that all share one cut (the CPU and GPU tests' view of `select_kept`)."""

from __future__ import annotations

import torch

from varserve.cache.plan import ScoredCut
from varserve.cache.scalekv import select_kept


def select_for_cut(keys: torch.Tensor, window_q: torch.Tensor, cut: ScoredCut, width: int | None = None) -> torch.Tensor:
    """Kept positions [G, H, width or cut.capacity] of G rows of one cut."""
    rows, device = keys.shape[0], keys.device
    window = torch.as_tensor(cut.window_positions, device=device).expand(rows, -1)
    lengths, capacity = (torch.full((rows,), n, device=device) for n in (cut.attend_len, cut.capacity))
    return select_kept(keys, window_q, window, lengths, capacity, width or cut.capacity)
