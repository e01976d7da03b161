"""Attention statistics of dense generations, for `varserve calibrate` (varserve/cache/calibration.py).

Attention probabilities are computed explicitly (softmax of q.k, not SDPA) and only the cond row of each
image is measured, as HeatKV's released calibration does.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from varserve.cache.heatkv import PROTECTED_SCALES
from varserve.cache.policy import make_policy
from varserve.models.config import ModelConfig, get_config
from varserve.models.generation import ScaleSampling, num_rows
from varserve.models.loader import load_model
from varserve.models.reference import DenseKV, sample_dense
from varserve.models.schedule import ScaleSchedule, parse_size
from varserve.params import SamplingParams

ASI_TOP_KEYS = 16  # ASI: the mass of a query's strongest history keys measures how concentrated it is


class AttentionStats(ABC):
    def __init__(self, cfg: ModelConfig, schedule: ScaleSchedule):
        self.schedule = schedule
        self.starts = [schedule.offset(s) for s in range(schedule.num_scales + 1)]

    @abstractmethod
    def update(self, layer: int, scale: int, probs: Tensor) -> None:
        """probs: [H, queries of `scale`, keys of scales 0..scale] of the cond row at `layer`."""

    @abstractmethod
    def result(self, num_prompts: int) -> dict:
        """The JSON fields of the statistics."""


class Scas(AttentionStats):
    """HeatKV's S-CAS(l, h, s): the attention mass that the queries of a later scale t put on source scale s
    (summed over the source's keys, averaged over the queries), averaged over the later scales and prompts;
    protected scales and the last scale are no sources (null)."""

    def __init__(self, cfg: ModelConfig, schedule: ScaleSchedule):
        super().__init__(cfg, schedule)
        self.mass = np.zeros((cfg.depth, cfg.num_heads, schedule.num_scales))

    def update(self, layer: int, scale: int, probs: Tensor) -> None:
        for source in range(PROTECTED_SCALES, scale):
            a, b = self.starts[source], self.starts[source + 1]
            self.mass[layer, :, source] += probs[:, :, a:b].sum(-1).mean(-1).double().cpu().numpy()

    def result(self, num_prompts: int) -> dict:
        num_scales = self.schedule.num_scales
        later = num_scales - 1 - np.arange(num_scales)
        sources = (np.arange(num_scales) >= PROTECTED_SCALES) & (later > 0)
        scas = np.where(sources, self.mass / (num_prompts * np.maximum(later, 1)), np.nan)
        return {"scas": [[[None if np.isnan(x) else float(x) for x in head] for head in layer] for layer in scas]}


class Asi(AttentionStats):
    """ScaleKV's Attention Selectivity Index of (scale, layer): per query, the attention mass on the current
    scale plus the mass of its ASI_TOP_KEYS strongest history keys, averaged over queries, heads and
    prompts. Refiners (local, concentrated attention) score high, drafters (attention spread over earlier
    scales) low. The paper's exact weighting is not in the released code; this is the form used here."""

    def __init__(self, cfg: ModelConfig, schedule: ScaleSchedule):
        super().__init__(cfg, schedule)
        self.total = np.zeros((schedule.num_scales, cfg.depth))

    def update(self, layer: int, scale: int, probs: Tensor) -> None:
        if scale == 0:
            return
        start = self.starts[scale]
        history = probs[:, :, :start]
        top = history.topk(min(ASI_TOP_KEYS, start), dim=-1).values.sum(-1)
        self.total[scale, layer] += float((probs[:, :, start:].sum(-1) + top).mean())

    def result(self, num_prompts: int) -> dict:
        return {"asi": [None] + (self.total[1:] / num_prompts).tolist()}


class CalibrationKV(DenseKV):
    """Full dense cache whose attention is computed with explicit probabilities, fed to `stats` (row 0)."""

    def __init__(self, rows: int, depth: int, stats: AttentionStats):
        super().__init__(rows, depth)
        self.stats, self.scale = stats, -1

    def begin(self, row_lengths: list[int]) -> None:
        super().begin(row_lengths)
        self.scale += 1

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, raw_q: Tensor | None) -> Tensor:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = []
        for row, (a, b) in enumerate(self.spans):
            keys = self._append(self.k[layer], row, k[a:b])
            values = self._append(self.v[layer], row, v[a:b])
            probs = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b].to(acc), keys.to(acc)), dim=-1)
            if row == 0:
                self.stats.update(layer, self.scale, probs)
            out.append(torch.einsum("hqk,khd->qhd", probs, values.to(acc)).to(q.dtype))
        return torch.cat(out)


def calibrate(policy: str, model: str, prompts: list[str], size: str, seed: int, *, device: str | None = None,
              dtype: str | None = None, weights: str | None = None, random_weights: bool = False) -> dict:
    """Dense generation of every prompt (image i with seed + i) recording `policy`'s statistics."""
    params = SamplingParams(size=size)
    schedule = params.schedule
    if policy == "heatkv" and schedule.num_scales < PROTECTED_SCALES + 2:
        raise ValueError(f"heatkv calibration needs a size with more than {PROTECTED_SCALES + 1} scales")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    loaded = load_model(model, device=dev, dtype=torch_dtype, random_weights=random_weights, weights=weights)
    cfg = loaded.config
    stats = {"scalekv": Asi, "heatkv": Scas}[policy](cfg, schedule)
    sampling = ScaleSampling(params.cfg, params.tau, params.top_p)
    for i, prompt in enumerate(prompts):
        kv = CalibrationKV(num_rows(params.cfg, False), cfg.depth, stats)
        sample_dense(loaded.transformer, loaded.vae, loaded.text_encoder, prompt, schedule, sampling, seed + i, kv=kv)
    return {
        "policy": policy, "model": cfg.name, "depth": cfg.depth, "num_heads": cfg.num_heads, "size": schedule.name,
        "scales": [list(hw) for hw in schedule.scales], "seed": seed, "num_prompts": len(prompts),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "dtype": str(torch_dtype),
        "device": dev.type, **stats.result(len(prompts)),
    }


def summary(budget: float, path: str, data: dict) -> str:
    """What `budget` keeps at the calibrated size with this calibration (mean tokens per layer and head)."""
    policy, cfg, schedule = data["policy"], get_config(data["model"]), parse_size(data["size"])
    kept = make_policy(policy, budget, str(path)).plan(cfg, schedule).kept[:-1].mean(axis=(1, 2))
    full = np.cumsum(schedule.tokens)[:-1]
    return (f"{policy} at kv_budget {budget} ({schedule.name}): tokens kept per (layer, head) after each scale "
            f"{np.round(kept, 1).tolist()} of {full.tolist()}")
