"""What a KV policy decides for one image size: static token counts, and how every cut is made.

Counts are static per (model, size, budget): `kept[s, l, h]` tokens of (layer l, head h) of a row survive the
cut after scale s, so admission knows every request's page need in advance. Which tokens survive is a `Cut`:
- none (`None`): the kept tokens are the first `kept` ones, so cutting only frees tail pages;
- `StaticCut`: the kept positions are known in advance and are the same for every row (HeatKV, window);
- `ScoredCut`: the kept positions are chosen on the device from attention scores, per row and head (ScaleKV).
Positions index a row's tokens in its table order (0 .. attend_len - 1); a cut moves the kept tokens to
positions [0, kept) in their order, then the block manager frees the tail pages.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import numpy as np

from varserve.cache.block_table import PageMoves, StepMoves
from varserve.cache.calibration import calibration_for
from varserve.models.config import ModelConfig
from varserve.models.schedule import ScaleSchedule


@dataclass(frozen=True, eq=False)
class StaticCut:
    """The runs of tokens a cut moves, the same for every row: tokens src[i] .. src[i] + length[i] - 1 of head
    heads[i] go to positions dst[i] onwards. Tokens already in place are not listed. Compared by identity:
    rows share one object."""

    heads: np.ndarray  # int64 [runs]
    src: np.ndarray
    dst: np.ndarray
    length: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.length.sum())

    @staticmethod
    def from_positions(positions: list[np.ndarray]) -> "StaticCut":
        """From the sorted kept positions of every head."""
        heads = np.concatenate([np.full(len(p), h) for h, p in enumerate(positions)]).astype(np.int64)
        src = np.concatenate(positions).astype(np.int64)
        dst = np.concatenate([np.arange(len(p)) for p in positions]).astype(np.int64)
        moved = src != dst
        heads, src, dst = heads[moved], src[moved], dst[moved]
        starts = np.flatnonzero(np.diff(heads, prepend=-1) | (np.diff(src, prepend=-2) != 1))
        return StaticCut(heads[starts], src[starts], dst[starts], np.diff(starts, append=len(src)))


@dataclass(frozen=True)
class ScoredCut:
    """ScaleKV's cut of one layer at one scale (equal for every row that shares it, so rows group by it):
    every head keeps `capacity` of its `attend_len` tokens, chosen from the scores of the observation-window
    queries (`window`: indices into the current scale, whose tokens sit at positions history + index)."""

    history: int
    attend_len: int
    capacity: int
    window: tuple[int, ...]

    @property
    def window_positions(self) -> np.ndarray:
        return self.history + np.asarray(self.window, dtype=np.int64)


Cut = Union[StaticCut, ScoredCut, None]


@dataclass(frozen=True)
class KVPlan:
    """Token counts of one row: kept[s, l, h] after scale s's cut; attend_len[s, l, h] during scale s.
    `cuts(scale, layer)` says how that cut is made (None everywhere: prefix keeps)."""

    kept: np.ndarray
    attend_len: np.ndarray
    cuts: Callable[[int, int], Cut] | None = field(default=None, compare=False)
    _moves: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_scales(self) -> int:
        return self.kept.shape[0]

    def cut(self, scale: int, layer: int) -> Cut:
        return None if self.cuts is None else self.cuts(scale, layer)

    def pages_kept(self, page_size: int) -> np.ndarray:
        """[S, L] pages held per layer (summed over heads) after each scale."""
        return _pages(self.kept, page_size).sum(-1)

    def pages_attend(self, page_size: int) -> np.ndarray:
        """[S, L] pages held per layer while that layer attends at each scale."""
        return _pages(self.attend_len, page_size).sum(-1)

    def page_moves(self, page_size: int, rows: int, scale: int, layer: int) -> PageMoves:
        """The table entries that one layer of a request fills before it attends at `scale` and empties after
        its cut; memoised, as every request of this plan repeats them."""
        key = (page_size, rows, scale, layer)
        if key not in self._moves:
            before = self.kept[scale - 1, layer] if scale else np.zeros_like(self.kept[0, layer])
            shape = (rows, self.kept.shape[-1])
            self._moves[key] = PageMoves.between(
                *(np.broadcast_to(x, shape) for x in (before, self.attend_len[scale, layer], self.kept[scale, layer])),
                page_size)
        return self._moves[key]

    def step_moves(self, page_size: int, rows: int, scale: int) -> StepMoves:
        """`page_moves` of every layer at `scale`, gathered for planning a step at once; memoised."""
        key = (page_size, rows, scale)
        if key not in self._moves:
            self._moves[key] = StepMoves.of([self.page_moves(page_size, rows, scale, layer)
                                             for layer in range(self.kept.shape[1])], page_size)
        return self._moves[key]

    def max_pages_per_table(self, page_size: int) -> int:
        return int(self.table_widths(page_size).max())

    def table_widths(self, page_size: int) -> np.ndarray:
        """[S] pages of the longest table while attending at each scale (a step's block tables are as wide as the
        widest of its rows)."""
        return _pages(self.attend_len.max(axis=(1, 2)), page_size)

    def held_pages(self, page_size: int, rows: int) -> np.ndarray:
        """[S, L] pages a request (all rows) holds while layer l attends at scale s: layers before l are
        already cut, layer l holds history + current scale, layers after l still hold the last scale's."""
        kept, attend = self.pages_kept(page_size), self.pages_attend(page_size)
        before = np.vstack([np.zeros_like(kept[:1]), kept[:-1]])
        done = np.cumsum(kept, axis=1) - kept
        todo = before.sum(1, keepdims=True) - np.cumsum(before, axis=1)
        return rows * (done + attend + todo)


def _pages(tokens: np.ndarray, page_size: int) -> np.ndarray:
    return -(-tokens // page_size)


def plan_from_kept(schedule: ScaleSchedule, kept: np.ndarray, cuts: Callable[[int, int], Cut] | None = None) -> KVPlan:
    """Build a plan from per-scale kept counts [S, L, H]; attend_len = previous kept + current tokens."""
    n = np.asarray(schedule.tokens, dtype=np.int64)[:, None, None]
    prev = np.concatenate([np.zeros_like(kept[:1]), kept[:-1]])
    return KVPlan(kept=kept.astype(np.int64), attend_len=(prev + n).astype(np.int64), cuts=cuts)


def full_counts(cfg: ModelConfig, schedule: ScaleSchedule) -> np.ndarray:
    """[S, L, H] counts of the full cache: everything until the last scale, which nothing reads later."""
    cum = np.cumsum(schedule.tokens).astype(np.int64)
    cum[-1] = 0
    return np.broadcast_to(cum[:, None, None], (schedule.num_scales, cfg.depth, cfg.num_heads)).copy()


def capped_counts(schedule: ScaleSchedule, caps: np.ndarray) -> np.ndarray:
    """[S, L, H] counts when (layer, head) keeps at most caps[s, l, h] tokens after scale s (none after the
    last scale): kept = min(previous kept + current scale, cap), scale after scale."""
    kept = np.zeros(caps.shape, dtype=np.int64)
    prev = np.zeros(caps.shape[1:], dtype=np.int64)
    for s, n in enumerate(schedule.tokens[:-1]):
        kept[s] = prev = np.minimum(prev + n, caps[s])
    return kept


class KVPolicy(ABC):
    """Base of all policies: `plan` gives a size's counts and cuts. `budget` is the fraction of the full
    history cache (tokens of every scale before the last) kept per layer and row on average."""

    name = "base"

    def __init__(self, budget: float = 1.0):
        if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0):
            raise ValueError(f"kv_budget must be in (0, 1], got {budget!r}")
        self.budget = float(budget)

    @abstractmethod
    def plan(self, cfg: ModelConfig, schedule: ScaleSchedule) -> KVPlan:
        """Counts and cuts of one image size."""

    def budget_tokens(self, schedule: ScaleSchedule) -> int:
        """Tokens per (row, layer) on average at this size: floor(budget * history)."""
        tokens = math.floor(self.budget * schedule.history_tokens + 1e-9)
        if tokens < 1:
            raise ValueError(f"kv_budget {self.budget} keeps no token of the {schedule.history_tokens}-token history "
                             f"of a {schedule.name} image")
        return tokens


class CalibratedPolicy(KVPolicy):
    """A policy that can read a `varserve calibrate` file: the one given, else the one shipped for the model."""

    def __init__(self, budget: float = 1.0, calibration: str | None = None):
        super().__init__(budget)
        self.calibration = calibration

    def calibration_file(self, cfg: ModelConfig) -> str | Path | None:
        return calibration_for(self.name, cfg, self.calibration)
