"""Per-request steps of next-scale generation shared by the dense reference path and the engine:
CFG rows of the text, sampling one scale, and turning sampled bits into the next scale's input."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from varserve.models.infinity import Infinity, TextMemory
from varserve.models.sampler import bit_probs, sample_bits
from varserve.models.schedule import ScaleSchedule
from varserve.models.text_encoder import TextBatch
from varserve.models.vae import BSQVAE


@dataclass(frozen=True)
class ScaleSampling:
    cfg: float
    tau: float
    top_p: float

    @property
    def uses_cfg(self) -> bool:
        return self.cfg != 1.0


def num_rows(cfg: float, has_negative: bool) -> int:
    """Rows per request: a cond and an uncond row with CFG, the cond row alone without."""
    return 2 if cfg != 1.0 or has_negative else 1


def text_rows(
    model: Infinity, prompts: TextBatch, index: int, rows: int, negatives: TextBatch | None = None,
    negative_index: int | None = None,
) -> TextMemory:
    """TextMemory of one request's rows: prompt `index`, then (CFG) negative prompt `negative_index` or the
    learned unconditional text cut to the prompt's length."""
    feats, lens = [_one(prompts, index)], [prompts.lengths[index]]
    if rows == 2:
        has_negative = negatives is not None and negative_index is not None
        uncond = _one(negatives, negative_index) if has_negative else model.uncond_text(lens[0])
        feats.append(uncond.to(feats[0].device, feats[0].dtype))
        lens.append(uncond.shape[0])
    return model.encode_text(torch.cat(feats), lens)


def _one(batch: TextBatch, index: int) -> Tensor:
    start = int(sum(batch.lengths[:index]))
    return batch.features[start : start + batch.lengths[index]]


def sample_scale(logits: Tensor, rows: int, params: ScaleSampling, generator: torch.Generator) -> Tensor:
    """logits [rows*n, 2d] of one request at one scale -> bits [n, d]."""
    n = logits.shape[0] // rows
    uncond = logits[n:] if rows == 2 else None
    cfg = params.cfg if rows == 2 else 1.0
    return sample_bits(bit_probs(logits[:n], uncond, cfg, params.tau), params.top_p, generator)


def advance(
    model: Infinity, vae: BSQVAE, summed: Tensor | None, bits: Tensor, schedule: ScaleSchedule, scale: int, rows: int,
) -> tuple[Tensor, Tensor | None]:
    """Add one scale's bits to the accumulated codes; return (summed, next input [rows*n', C] or None)."""
    last = scale == schedule.num_scales - 1
    codes = vae.bits_to_codes(bits[None], schedule.scales[scale])
    summed = vae.accumulate(summed, codes, schedule.scales[-1], last)
    if last:
        return summed, None
    tokens = vae.next_input(summed, schedule.scales[scale + 1])[0]
    return summed, model.embed_tokens(tokens).repeat(rows, 1)
