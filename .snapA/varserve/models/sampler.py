"""Bitwise sampling: every bit of a token is its own 2-way softmax, with CFG applied to the logits.

Each request owns a torch.Generator, and every scale draws a uniform number per bit whatever the values,
so a request's bits depend only on its own prompt and seed, not on what it is batched with.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def bit_probs(cond: Tensor, uncond: Tensor | None, cfg: float, tau: float) -> Tensor:
    """Probability of bit 1, [..., d], from cond (and uncond) logits [..., 2d] (pairs (bit 0, bit 1))."""
    logits = cond.unflatten(-1, (-1, 2)) / tau
    if uncond is not None:
        logits = cfg * logits + (1 - cfg) * uncond.unflatten(-1, (-1, 2)) / tau
    return torch.softmax(logits, dim=-1)[..., 1]


def sample_bits(p1: Tensor, top_p: float, generator: torch.Generator | Sequence[torch.Generator]) -> Tensor:
    """Sample bits (uint8) of p1 [n, d], or of p1 [k, n, d] with one generator per request (slice p1[i] draws
    from generator[i] exactly what it would alone). top_p as the reference: the minority bit is removed (the
    majority is forced) when its probability is <= 1 - top_p; top_p = 0 disables it."""
    if isinstance(generator, torch.Generator):
        u = torch.rand(p1.shape, generator=generator, device=p1.device, dtype=p1.dtype)
    else:
        if len(generator) != p1.shape[0]:
            raise ValueError(f"{len(generator)} generators for {p1.shape[0]} requests")
        u = torch.empty_like(p1)
        for i, g in enumerate(generator):
            torch.rand(p1.shape[1:], generator=g, device=p1.device, dtype=p1.dtype, out=u[i])
    bits = u < p1
    if top_p > 0:
        forced = torch.minimum(p1, 1 - p1) <= 1 - top_p
        bits = torch.where(forced, p1 > 0.5, bits)
    return bits.to(torch.uint8)


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
