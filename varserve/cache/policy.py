"""KV policies: how many tokens each (layer, head) of a row keeps after every scale.

Every policy here is static per (model, size, budget): the token counts are known before a request starts,
so admission knows a request's page need at every layer of every scale. Which tokens are kept may be
dynamic (ScaleKV selects by attention scores); how many never is.

Within a scale, layer l of a row: grows to `attend_len` (history + the current scale), attends, then is cut
to `kept` and the freed pages go back to the pool at once, before layer l+1 runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from varserve.models.config import ModelConfig
from varserve.models.schedule import ScaleSchedule


@dataclass(frozen=True)
class KVPlan:
    """Token counts of one row: kept[s, l, h] after scale s's cut; attend_len[s, l, h] during scale s."""

    kept: np.ndarray
    attend_len: np.ndarray

    @property
    def num_scales(self) -> int:
        return self.kept.shape[0]

    def pages_kept(self, page_size: int) -> np.ndarray:
        """[S, L] pages held per layer (summed over heads) after each scale."""
        return _pages(self.kept, page_size).sum(-1)

    def pages_attend(self, page_size: int) -> np.ndarray:
        """[S, L] pages held per layer while that layer attends at each scale."""
        return _pages(self.attend_len, page_size).sum(-1)

    def max_pages_per_table(self, page_size: int) -> int:
        return int(_pages(self.attend_len, page_size).max())

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


def plan_from_kept(schedule: ScaleSchedule, kept: np.ndarray) -> KVPlan:
    """Build a plan from per-scale kept counts [S, L, H]; attend_len = previous kept + current tokens."""
    n = np.asarray(schedule.tokens, dtype=np.int64)[:, None, None]
    prev = np.concatenate([np.zeros_like(kept[:1]), kept[:-1]])
    return KVPlan(kept=kept.astype(np.int64), attend_len=(prev + n).astype(np.int64))


class KVPolicy(ABC):
    """Base of all policies. Subclasses give the static counts (`kept_counts`) and, where the kept
    tokens are not a prefix of the row's cache, the selection done on the device (see model runner)."""

    name = "base"
    keeps_prefix = True  # kept tokens are the first `kept` ones: cutting only frees tail pages

    def __init__(self, budget: float = 1.0):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"kv_budget must be in (0, 1], got {budget}")
        self.budget = budget

    def plan(self, cfg: ModelConfig, schedule: ScaleSchedule) -> KVPlan:
        return plan_from_kept(schedule, self.kept_counts(cfg, schedule))

    @abstractmethod
    def kept_counts(self, cfg: ModelConfig, schedule: ScaleSchedule) -> np.ndarray:
        """[S, L, H] tokens each (layer, head) of a row keeps after each scale."""


class FullPolicy(KVPolicy):
    """Keeps every token, but drops the last scale's K/V (and with it the whole cache of the layer) as
    soon as the layer has attended: nothing reads it later."""

    name = "full"

    def __init__(self, budget: float = 1.0):
        super().__init__(budget)
        if budget != 1.0:
            raise ValueError("the full policy keeps everything: kv_budget must be 1.0")

    def kept_counts(self, cfg: ModelConfig, schedule: ScaleSchedule) -> np.ndarray:
        cum = np.cumsum(schedule.tokens).astype(np.int64)
        cum[-1] = 0
        return np.broadcast_to(cum[:, None, None], (schedule.num_scales, cfg.depth, cfg.num_heads)).copy()


POLICIES: dict[str, type[KVPolicy]] = {"full": FullPolicy}


def make_policy(name: str, budget: float = 1.0) -> KVPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown kv_policy {name!r}; available: {', '.join(POLICIES)}")
    return POLICIES[name](budget)
