"""HeatKV (arXiv 2605.14877): a static pruning schedule per (layer, head, source scale) from S-CAS.

S-CAS(l, h, s), from `varserve calibrate --policy heatkv` (cond rows): the attention mass that queries of
later scales put on source scale s, averaged over later scales and prompts. For each source scale the
(layer, head) pairs are ranked by S-CAS ascending (ties: head, then layer, as the released code).

Budget B caps the cache summed over all (layer, head) relative to the full cache's peak (the history,
H = tokens of all scales before the last). Before target scale t, whose full cache I_t (tokens of scales < t)
exceeds B * H, the N_t = ceil(P * (I_t - B*H) / (I_t - prefix)) lowest-ranked of the P = L*heads pairs drop
source scale s, for every source scale s < t; `prefix` is the first PROTECTED_SCALES scales (21 tokens),
never dropped. N_t only grows with t, so pruning is permanent. Drops happen at the end-of-layer cut of scale
t-1 (the current scale is always attended in full first) and remove whole scale segments of one head, so
kept counts differ per head but are the same for every request of a size: the cuts are static.

Layers are cut one after the other, so in the middle of a scale the layers already cut hold the new scale
while the later ones still hold their older segments. As the released code's strict schedule, later layers
drop some of their already-decided segments one scale early where that keeps every layer boundary within
the budget: the cache then never exceeds the budget plus the current scale of the layer that attends.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from varserve.cache.calibration import read_calibration
from varserve.cache.plan import CalibratedPolicy, KVPlan, StaticCut, full_counts, plan_from_kept
from varserve.models.config import ModelConfig
from varserve.models.schedule import ScaleSchedule

PROTECTED_SCALES = 3


class HeatKVPolicy(CalibratedPolicy):
    name = "heatkv"

    def plan(self, cfg: ModelConfig, schedule: ScaleSchedule) -> KVPlan:
        counts = prune_counts(schedule, cfg.depth * cfg.num_heads, self.budget)
        if not counts.any():
            return plan_from_kept(schedule, full_counts(cfg, schedule))
        if self.calibration_file(cfg) is None:
            raise ValueError(f"heatkv at kv_budget {self.budget} needs S-CAS calibration, and none ships for "
                             f"{cfg.name}: pass kv_calibration=PATH (a file from `varserve calibrate --policy heatkv`)")
        alive = alive_segments(schedule, source_ranks(self.scas(cfg), schedule.num_scales), counts, self.budget)
        n = np.asarray(schedule.tokens, dtype=np.int64)
        # kept after scale s: the segments of sources <= s alive at scale s+1; nothing after the last scale.
        kept = np.stack([(n[: s + 1, None, None] * alive[s + 1, : s + 1]).sum(0) for s in range(len(n) - 1)]
                        + [np.zeros(alive.shape[2:], dtype=np.int64)])
        plan = plan_from_kept(schedule, kept)
        return replace(plan, cuts=_StaticCuts(alive, n))

    def scas(self, cfg: ModelConfig) -> np.ndarray:
        """[L, H, S] S-CAS of the calibration file (NaN where a scale is no source)."""
        data = read_calibration(self.calibration_file(cfg), "heatkv", cfg)
        return np.array(data["scas"], dtype=np.float64)


def prune_counts(schedule: ScaleSchedule, pairs: int, budget: float) -> np.ndarray:
    """[S] N_t: (layer, head) pairs that drop each unprotected source scale before target scale t."""
    history = schedule.history_tokens
    prefix = schedule.offset(min(PROTECTED_SCALES, schedule.num_scales))
    allowed = budget * history
    if allowed < prefix:
        raise ValueError(f"heatkv always keeps the first {PROTECTED_SCALES} scales ({prefix} tokens): kv_budget "
                         f"must be >= {prefix / history:.4f} for a {schedule.name} image, got {budget}")
    counts = np.zeros(schedule.num_scales, dtype=np.int64)
    for t in range(schedule.num_scales):
        full = schedule.offset(t)
        if full > allowed:
            counts[t] = min(pairs, math.ceil(pairs * (full - allowed) / (full - prefix) - 1e-9))
    return counts


def source_ranks(scas: np.ndarray, num_scales: int) -> np.ndarray:
    """[S, L, H] rank of every (layer, head) among all pairs for each source scale, by S-CAS ascending (ties:
    head, then layer). Sources past the calibrated ones take the last calibrated source's ranks."""
    layers, heads, calibrated = scas.shape
    last = max(s for s in range(calibrated) if not np.isnan(scas[..., s]).all())
    head, layer = np.meshgrid(np.arange(heads), np.arange(layers))
    ranks = np.zeros((num_scales, layers, heads), dtype=np.int64)
    for s in range(PROTECTED_SCALES, num_scales):
        score = scas[..., min(s, last)]
        order = np.lexsort((layer.ravel(), head.ravel(), score.ravel()))
        ranks[s].ravel()[order] = np.arange(layers * heads)
    return ranks


def alive_segments(schedule: ScaleSchedule, ranks: np.ndarray, counts: np.ndarray, budget: float) -> np.ndarray:
    """[S, S, L, H] bool: alive[t, s, l, h] says whether (layer l, head h) still holds source scale s when it
    attends at scale t. The drops of scale t's end-of-layer cuts are the N_{t+1} lowest-ranked pairs of every
    source <= t. As the released code's strict schedule, when the cache after layer l's cut at scale t would
    exceed the budget, later layers drop some of those segments one scale early (before attending at t):
    last layer first, then larger source scale, then rank. Without such candidates it stays over."""
    num_scales, layers, heads = ranks.shape
    n = np.asarray(schedule.tokens, dtype=np.int64)
    src = np.arange(num_scales)[:, None, None]
    drops = [(src >= PROTECTED_SCALES) & (src <= t) & (ranks < counts[t + 1]) for t in range(num_scales - 1)]
    limit = budget * layers * heads * schedule.history_tokens
    alive = np.ones((num_scales, num_scales, layers, heads), dtype=bool)
    for t in range(num_scales - 1):
        active = drops[t - 1].copy() if t else np.zeros_like(drops[0])
        early = np.zeros_like(active)
        for layer in range(layers):
            active[:, : layer + 1] |= drops[t][:, : layer + 1]
            excess = _cached(schedule, active, t, layer) - limit
            if excess > 0:
                s, l, h = np.nonzero(drops[t] & ~active & (src < t) & (np.arange(layers)[:, None] > layer))
                order = np.lexsort((ranks[s, l, h], -s, -l))[: np.searchsorted(np.cumsum(n[s]), excess) + 1]
                active[s[order], l[order], h[order]] = early[s[order], l[order], h[order]] = True
        alive[t] = ~((drops[t - 1] if t else False) | early)
    alive[-1] = ~drops[-1]
    return alive


def _cached(schedule: ScaleSchedule, dropped: np.ndarray, t: int, layer: int) -> int:
    """Tokens cached over all (layer, head) at scale t once layers <= `layer` are cut, `dropped` excluded."""
    n = np.asarray(schedule.tokens, dtype=np.int64)
    pairs = dropped.shape[1] * dropped.shape[2]
    history = (n[:t] * (pairs - dropped[:t].sum(axis=(1, 2)))).sum()
    return int(history + n[t] * ((layer + 1) * dropped.shape[2] - dropped[t, : layer + 1].sum()))


class _StaticCuts:
    """The cut of (scale s, layer l): segments alive before target s (and scale s itself) are in the
    table in scale order; those alive before target s+1 stay. Built once per (scale, layer), on demand."""

    def __init__(self, alive: np.ndarray, tokens: np.ndarray):
        self.alive, self.tokens = alive, tokens
        self._cuts: dict[tuple[int, int], StaticCut | None] = {}

    def __call__(self, scale: int, layer: int) -> StaticCut | None:
        if scale + 1 >= self.alive.shape[0]:
            return None  # the last scale: everything goes, nothing moves
        if (scale, layer) not in self._cuts:
            self._cuts[scale, layer] = self._build(scale, layer)
        return self._cuts[scale, layer]

    def _build(self, scale: int, layer: int) -> StaticCut | None:
        held = self.alive[scale, : scale + 1, layer].copy()  # [sources, heads]
        held[scale] = True
        stays = self.alive[scale + 1, : scale + 1, layer]
        positions = []
        for h in range(held.shape[1]):
            lengths = self.tokens[: scale + 1] * held[:, h]
            starts = np.cumsum(lengths) - lengths
            positions.append(np.concatenate([np.arange(a, a + n) for a, n, keep in zip(starts, lengths, stays[:, h])
                                             if keep and n]))
        cut = StaticCut.from_positions(positions)
        return cut if len(cut.src) else None
