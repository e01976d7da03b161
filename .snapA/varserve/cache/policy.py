"""KV policies: which tokens every (layer, head) of a row keeps after each scale (counts and cuts: see
varserve/cache/plan.py).

Within a scale, layer l of a row grows to `attend_len` (history + the current scale), attends, then is cut
to `kept` and the freed pages go back to the pool at once, before layer l+1 runs.

full: keeps everything. scalekv, heatkv: varserve/cache/scalekv.py, heatkv.py. window, streaming: baselines
under the same budgets (varserve/cache/window.py).
"""

from __future__ import annotations

from varserve.cache.heatkv import HeatKVPolicy
from varserve.cache.plan import KVPlan, KVPolicy, full_counts, plan_from_kept
from varserve.cache.scalekv import ScaleKVPolicy
from varserve.cache.window import StreamingPolicy, WindowPolicy
from varserve.models.config import ModelConfig
from varserve.models.schedule import ScaleSchedule

__all__ = ["KVPlan", "KVPolicy", "FullPolicy", "POLICIES", "make_policy"]


class FullPolicy(KVPolicy):
    """Keeps every token, but drops the last scale's K/V (and with it the whole cache of the layer) as
    soon as the layer has attended: nothing reads it later."""

    name = "full"

    def __init__(self, budget: float = 1.0):
        super().__init__(budget)
        if budget != 1.0:
            raise ValueError("the full policy keeps everything: kv_budget must be 1.0")

    def plan(self, cfg: ModelConfig, schedule: ScaleSchedule) -> KVPlan:
        return plan_from_kept(schedule, full_counts(cfg, schedule))


POLICIES: dict[str, type[KVPolicy]] = {
    "full": FullPolicy, "scalekv": ScaleKVPolicy, "heatkv": HeatKVPolicy, "window": WindowPolicy,
    "streaming": StreamingPolicy,
}
CALIBRATED: dict[str, type[KVPolicy]] = {"scalekv": ScaleKVPolicy, "heatkv": HeatKVPolicy}


def make_policy(name: str, budget: float = 1.0, calibration: str | None = None) -> KVPolicy:
    """The policy `name` at `budget`; `calibration` is a `varserve calibrate` JSON file (scalekv, heatkv)."""
    if name not in POLICIES:
        raise ValueError(f"unknown kv_policy {name!r}; available: {', '.join(POLICIES)}")
    if calibration is None:
        return POLICIES[name](budget)
    if name not in CALIBRATED:
        raise ValueError(f"kv_calibration is used by {' and '.join(CALIBRATED)} only, not by {name!r}")
    return CALIBRATED[name](budget, calibration)
