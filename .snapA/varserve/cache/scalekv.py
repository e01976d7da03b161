"""ScaleKV (arXiv 2505.19602): per-scale drafter and refiner layers, observation-window token selection.

Capacities. At every scale s from the first whose full cache (tokens of scales <= s) exceeds the budget's
A tokens per layer, each layer keeps at most its capacity after attending; earlier scales are left alone.
Drafters (a few layers per scale) get Max(s), refiners Min(s), with the layer average A:
    Limit(s) = Max(s-1) + n_s          (Max before the first compressed scale: the full cache)
    Min(s)   = the least integer >= max(ceil(A * 4/13), ceil((A*L - k*Limit(s)) / (L-k)))
               such that k divides A*L - (L-k)*Min(s);      Max(s) = (A*L - (L-k)*Min(s)) / k
with k drafters among L layers: drafters keep all they can, refiners share the rest but keep at least
4/13 of the average. This rule reproduces every capacity of the released 2B and 8B 10% tables (A = 650; the
refiner floor binds once, 8B's last scale: 200). Refiners also keep at least the observation window (16
tokens at most), so a budget under 16 tokens per layer is refused.
The 10% presets are the released tables (A = 650, the released code's base capacity: 10.1% of the 6425-token
history); 4% and 20% are derived by `allocate` with A = floor(B * history) and the 10% table's drafters (its
first set for earlier scales). Drafters of other sizes and models: from a
calibration file (`varserve calibrate --policy scalekv`: the layers of lowest Attention Selectivity Index
at each scale), else a preset's 10% table by scale index, else layer 0 alone (a drafter at every scale of
both released tables). Capacities of sizes without a preset table come from `allocate`.
The layer average holds after every scale; within a scale, layers already cut hold their new (for drafters
larger) capacity while later layers still hold the previous scale's, so the peak exceeds the budget by
that growth (2B at 10%, a 1024x1024 CFG image, 32-token pages: peak 26976 pages; the sliding window at the
same budget 25600; the full cache 209920).

Selection, per row and head, on the device: the raw queries (no bias, norm or RoPE) at the centres of a
4x4 grid of cells over the current h x w map score every cached key (q.k / sqrt(d) summed over the window,
no softmax; window keys get -inf), scores are max-pooled (kernel 5) along the key index, window keys are
excluded, and the top (capacity - window) keys plus the window tokens are kept in their order. Ties go to
the lower position.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from varserve.cache.calibration import read_calibration
from varserve.cache.plan import CalibratedPolicy, KVPlan, ScoredCut, capped_counts, plan_from_kept
from varserve.models.config import ModelConfig
from varserve.models.schedule import ScaleSchedule

WINDOW_GRID = 4  # the observation window: centres of a WINDOW_GRID x WINDOW_GRID grid of cells
POOL_KERNEL = 5
REFINER_FLOOR = 4 / 13  # refiners keep at least this share of the layer average (200 of 650)
DRAFTER_SHARE = 0.07  # calibrated drafters per scale: round(0.07 * depth), at least 1 (2 of 32, 3 of 40)
DEFAULT_DRAFTERS = (0,)
PRESETS = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class ScaleBudget:
    drafters: tuple[int, ...]
    drafter_capacity: int
    refiner_capacity: int


Drafters = Callable[[int], tuple[int, ...]]


class ScaleKVPolicy(CalibratedPolicy):
    name = "scalekv"

    def plan(self, cfg: ModelConfig, schedule: ScaleSchedule) -> KVPlan:
        budgets = self.scale_budgets(cfg, schedule)
        caps = np.full((schedule.num_scales, cfg.depth), np.iinfo(np.int64).max)
        windows = [window_indices(h, w) for h, w in schedule.scales]
        for s, b in budgets.items():
            caps[s] = b.refiner_capacity
            caps[s, list(b.drafters)] = b.drafter_capacity
        kept = capped_counts(schedule, np.repeat(caps[:, :, None], cfg.num_heads, axis=2))
        plan = plan_from_kept(schedule, kept)
        history, attend = plan.attend_len[:, :, 0] - np.asarray(schedule.tokens)[:, None], plan.attend_len[:, :, 0]
        cuts = {(s, l): ScoredCut(int(history[s, l]), int(attend[s, l]), int(kept[s, l, 0]), windows[s])
                for s in budgets for l in range(cfg.depth) if kept[s, l, 0] < attend[s, l]}
        return replace(plan, cuts=lambda scale, layer: cuts.get((scale, layer)))

    def scale_budgets(self, cfg: ModelConfig, schedule: ScaleSchedule) -> dict[int, ScaleBudget]:
        """Drafters and capacities of every compressed scale (none after the last: nothing is kept)."""
        preset = load_preset(cfg)
        if self.calibration is None and preset is not None and schedule.name == preset["size"]:
            table = next((t for b, t in preset["budgets"].items() if math.isclose(float(b), self.budget)), None)
            if table is not None:
                return _read_table(table["scales"])
        calibration = self.calibration_file(cfg)
        if calibration is not None:
            drafters = calibrated_drafters(read_calibration(calibration, "scalekv", cfg)["asi"], cfg.depth)
        elif preset is not None:
            drafters = _by_scale({s: b.drafters for s, b in _read_table(preset["budgets"]["0.1"]["scales"]).items()})
        else:
            drafters = lambda s: DEFAULT_DRAFTERS  # noqa: E731
        windows = tuple(len(window_indices(h, w)) for h, w in schedule.scales)
        return allocate(schedule.tokens, cfg.depth, self.budget_tokens(schedule), drafters, windows)


def allocate(tokens: tuple[int, ...], depth: int, average: int, drafters: Drafters,
             windows: tuple[int, ...] | None = None) -> dict[int, ScaleBudget]:
    """Capacities of every scale from the first whose full cache exceeds `average`, to the one before the
    last (see the module docstring for the rule); no layer keeps fewer than its scale's `windows` tokens
    (default: a full 4x4 window at every scale)."""
    windows = windows or (WINDOW_GRID**2,) * len(tokens)
    cum = np.cumsum(tokens)
    compressed = [s for s in range(len(tokens) - 1) if cum[s] > average]
    if not compressed:
        return {}
    if average < max(windows[s] for s in compressed):
        raise ValueError(f"kv_budget too small for scalekv: {average} tokens per layer, but every layer keeps its "
                         f"{max(windows[s] for s in compressed)}-token observation window")
    total, prev_max, out = average * depth, int(cum[compressed[0] - 1]) if compressed[0] else 0, {}
    for s in compressed:
        chosen = tuple(sorted(drafters(s)))
        k, r = len(chosen), depth - len(chosen)
        if k == 0 or r == 0:
            out[s] = ScaleBudget(chosen, average, average)
        else:
            floor = max(math.ceil(average * REFINER_FLOOR), windows[s])
            low = max(floor, -(-(total - k * (prev_max + tokens[s])) // r))
            low += next((i for i in range(k) if (total - r * (low + i)) % k == 0), 0)  # an integer Max
            out[s] = ScaleBudget(chosen, (total - r * low) // k, low)
        prev_max = out[s].drafter_capacity
    return out


def calibrated_drafters(asi: list[list[float] | None], depth: int) -> Drafters:
    """Drafters per scale: the round(DRAFTER_SHARE * depth) layers (at least one) of lowest ASI (ties: lower
    layer); scales past the calibrated ones take the last calibrated scale's."""
    count = max(1, round(DRAFTER_SHARE * depth))
    return _by_scale({s: tuple(sorted(np.argsort(np.asarray(a), kind="stable")[:count].tolist()))
                      for s, a in enumerate(asi) if a is not None})


def _by_scale(table: dict[int, tuple[int, ...]]) -> Drafters:
    """Lookup by scale index, clamped to the scales the table has."""
    first, last = min(table), max(table)
    return lambda s: table[min(max(s, first), last)]


def _read_table(scales: dict[str, dict]) -> dict[int, ScaleBudget]:
    return {int(s): ScaleBudget(tuple(b["drafters"]), b["drafter_capacity"], b["refiner_capacity"])
            for s, b in scales.items()}


def load_preset(cfg: ModelConfig) -> dict | None:
    """The shipped budget tables of a model (varserve/cache/presets/scalekv-<model>.json), or None."""
    path = PRESETS / f"scalekv-{cfg.name}.json"
    if not path.is_file():
        return None
    preset = json.loads(path.read_text())
    if preset["depth"] != cfg.depth:
        raise ValueError(f"ScaleKV preset {path.name} is for depth {preset['depth']}, the model has {cfg.depth}")
    return preset


def window_indices(h: int, w: int) -> tuple[int, ...]:
    """Indices (row-major in the h x w map) of the observation-window tokens: the centre of each of
    WINDOW_GRID x WINDOW_GRID cells of size (h // 4) x (w // 4); maps under 4 tokens wide use cells of one."""
    rows, cols = _centres(h), _centres(w)
    return tuple(int(r * w + c) for r in rows for c in cols)


def _centres(n: int) -> list[int]:
    cell = max(1, n // WINDOW_GRID)
    return sorted({min(n - 1, i * cell + (cell - 1) // 2) for i in range(WINDOW_GRID)})


def select_kept(keys: Tensor, window_q: Tensor, window: Tensor, lengths: Tensor, capacity: Tensor, width: int
                ) -> Tensor:
    """Kept positions of G rows, each with its own cut: `keys` [G, H, L, d] are the rows' cached keys in table
    order (a row's keys from its `lengths` [G] on are padding), `window_q` [G, W, H, d] the raw queries of its
    observation-window tokens, `window` [G, W] their positions, `capacity` [G] how many tokens it keeps (at most
    `width`). Returns [G, H, width]: a row's first capacity entries ascending, then padding. No host sync."""
    query = window_query(window_q, keys.dtype)
    scores = torch.einsum("ghld,ghd->ghl", keys.to(query.dtype), query) / math.sqrt(keys.shape[-1])
    return kept_positions(scores, window, lengths, capacity, width)


def window_query(window_q: Tensor, dtype: torch.dtype) -> Tensor:
    """[G, H, d] the observation window's queries summed (its summed scores are the summed query's scores), in
    the scores' precision: float64 for float64 inputs, else float32."""
    return window_q.to(torch.float64 if dtype == torch.float64 else torch.float32).sum(1)


def kept_positions(scores: Tensor, window: Tensor, lengths: Tensor, capacity: Tensor, width: int) -> Tensor:
    """`select_kept` from the window's scores [G, H, L] of every key."""
    positions = torch.arange(scores.shape[2], device=scores.device)
    ignored = (positions >= lengths[:, None]).scatter(1, window, True)[:, None]  # padding and window: never chosen
    pooled = F.max_pool1d(scores.masked_fill(ignored, -math.inf), POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)
    pooled = pooled.masked_fill(ignored, -math.inf)
    best = torch.sort(pooled, dim=-1, descending=True, stable=True).indices[..., : width - window.shape[1]]
    chosen = torch.arange(best.shape[-1], device=scores.device) < (capacity - window.shape[1])[:, None, None]
    best = torch.where(chosen, best, scores.shape[2])  # past the row's share: sorts after every real position
    return torch.cat([best, window[:, None, :].expand(-1, best.shape[1], -1)], dim=-1).sort(dim=-1).values
