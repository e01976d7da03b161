"""Baselines under the same budgets as ScaleKV and HeatKV: every (layer, head) keeps at most
`budget_tokens` = floor(budget * history) tokens after each scale, chosen by position alone.

window: the most recent tokens (sliding window).
streaming: StreamingLLM-style, the tokens of the first scales as attention sinks plus the most recent ones.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace

import numpy as np

from varserve.cache.plan import KVPlan, KVPolicy, StaticCut, capped_counts, plan_from_kept
from varserve.models.config import ModelConfig
from varserve.models.schedule import ScaleSchedule

SINK_SCALES = 3  # streaming: the first scales (1 + 4 + 16 tokens) are the sinks


class PositionalPolicy(KVPolicy):
    """Same count on every (layer, head), positions that depend on the lengths only."""

    def plan(self, cfg: ModelConfig, schedule: ScaleSchedule) -> KVPlan:
        cap = self.budget_tokens(schedule)
        kept = capped_counts(schedule, np.full((schedule.num_scales, cfg.depth, cfg.num_heads), cap))
        plan = plan_from_kept(schedule, kept)
        cuts = {s: StaticCut.from_positions([self.positions(schedule, int(a), int(k))] * cfg.num_heads)
                for s, (a, k) in enumerate(zip(plan.attend_len[:-1, 0, 0], kept[:-1, 0, 0])) if k < a}
        return replace(plan, cuts=lambda scale, layer: cuts.get(scale))

    @abstractmethod
    def positions(self, schedule: ScaleSchedule, attend_len: int, kept: int) -> np.ndarray:
        """Sorted positions of the `kept` tokens that survive out of `attend_len`."""


class WindowPolicy(PositionalPolicy):
    name = "window"

    def positions(self, schedule: ScaleSchedule, attend_len: int, kept: int) -> np.ndarray:
        return np.arange(attend_len - kept, attend_len)


class StreamingPolicy(PositionalPolicy):
    """Sinks: the first SINK_SCALES scales' tokens, at most half the budget; the rest: the most recent."""

    name = "streaming"

    def positions(self, schedule: ScaleSchedule, attend_len: int, kept: int) -> np.ndarray:
        sinks = sink_tokens(schedule, kept)
        return np.concatenate([np.arange(sinks), np.arange(attend_len - kept + sinks, attend_len)])


def sink_tokens(schedule: ScaleSchedule, kept: int) -> int:
    return min(schedule.offset(min(SINK_SCALES, schedule.num_scales)), kept // 2)
