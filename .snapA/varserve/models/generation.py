"""Steps of next-scale generation shared by the dense reference path and the engine: CFG rows of the text,
sampling one scale and turning the sampled bits into the next scale's input, for one request or for several at
the same scale of the same size at once (each with its own generator: a request's random draws do not depend
on what it is batched with)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    return model.encode_text(*row_features(model, prompts, index, rows, negatives, negative_index))


def row_features(
    model: Infinity, prompts: TextBatch, index: int, rows: int, negatives: TextBatch | None = None,
    negative_index: int | None = None,
) -> tuple[Tensor, list[int]]:
    """The packed text features [sum(lengths), D] and the lengths of one request's rows (see `text_rows`), for
    `Infinity.encode_text` of one request or of several at once."""
    feats, lens = [_one(prompts, index)], [prompts.lengths[index]]
    if rows == 2:
        has_negative = negatives is not None and negative_index is not None
        uncond = _one(negatives, negative_index) if has_negative else model.uncond_text(lens[0])
        feats.append(uncond.to(feats[0].device, feats[0].dtype))
        lens.append(uncond.shape[0])
    return torch.cat(feats), lens


def _one(batch: TextBatch, index: int) -> Tensor:
    start = int(sum(batch.lengths[:index]))
    return batch.features[start : start + batch.lengths[index]]


def sample_scale(logits: Tensor, rows: int, params: ScaleSampling, generators: Sequence[torch.Generator]) -> Tensor:
    """logits [k*rows*n, 2d] of k requests at one scale (same size, rows and params; each request's rows
    together, cond first), one generator each -> bits [k, n, d]."""
    per_request = logits.view(len(generators), rows, -1, logits.shape[-1])
    uncond = per_request[:, 1] if rows == 2 else None
    cfg = params.cfg if rows == 2 else 1.0
    return sample_bits(bit_probs(per_request[:, 0], uncond, cfg, params.tau), params.top_p, generators)


def advance(
    model: Infinity, vae: BSQVAE, summed: Tensor | None, bits: Tensor, schedule: ScaleSchedule, scale: int, rows: int,
) -> tuple[Tensor, Tensor | None]:
    """Add one scale's bits [k, n, d] of k requests (same size) to their accumulated codes [k, ...]; return
    (summed, next inputs [k, rows*n', C] or None after the last scale)."""
    last = scale == schedule.num_scales - 1
    codes = vae.bits_to_codes(bits, schedule.scales[scale])
    summed = vae.accumulate(summed, codes, schedule.scales[-1], last)
    if last:
        return summed, None
    tokens = vae.next_input(summed, schedule.scales[scale + 1])
    return summed, model.embed_tokens(tokens).repeat(1, rows, 1)  # a request's rows share its input
