"""The elementwise pieces of a block, written once in plain torch.

On CUDA each function is compiled with torch.compile, which fuses its per-row gathers, norms, rotations and
casts into a kernel or two (the profile showed these passes over [T, C] costing more than the GEMMs).
Elsewhere they run eagerly, so the CPU exactness tests check the same math. VARSERVE_COMPILE=0 turns
compilation off (for debugging a CUDA run).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger("varserve")


def compiled_on_cuda(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    compiled: Callable[..., Tensor] | None = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if not args[0].is_cuda or os.environ.get("VARSERVE_COMPILE", "1") == "0":
            return fn(*args, **kwargs)
        if compiled is None:
            logger.info("compiling %s with torch.compile (first CUDA call)", fn.__name__)
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args, **kwargs)

    return run


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent (even, odd) pairs of x [T, H, d] by per-token angles [T, d/2]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


@compiled_on_cuda
def ln_modulate(x: Tensor, scale: Tensor, shift: Tensor, row_index: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """LayerNorm (no affine) of x [T, C], then per-row AdaLN: * (1 + scale[row]) + shift[row], cast to dtype."""
    return (F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[row_index]) + shift[row_index]).to(dtype)


@compiled_on_cuda
def gated_add(x: Tensor, y: Tensor, gamma: Tensor, row_index: Tensor) -> Tensor:
    """Residual update x + y * gamma[row] in x's dtype."""
    return x + y.to(x.dtype) * gamma[row_index]


@compiled_on_cuda
def layer_norm_cast(x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Affine LayerNorm computed in x's dtype (fp32 residual), output cast to dtype."""
    return F.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), eps).to(dtype)


@compiled_on_cuda
def cosine_qkv(qkv: Tensor, q_bias: Tensor, v_bias: Tensor, q_scale: Tensor, cos: Tensor, sin: Tensor,
               dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """qkv [T, 3, H, d] (no bias) -> q, k, v [T, H, d]: biases, L2-normalised q (times the per-head scale
    q_scale [H, 1]) and k in q_scale's precision, 2D RoPE on both, cast to dtype."""
    acc = q_scale.dtype
    q = F.normalize((qkv[:, 0] + q_bias).to(acc), dim=-1) * q_scale
    k = F.normalize(qkv[:, 1].to(acc), dim=-1)
    v = qkv[:, 2] + v_bias
    return apply_rope(q, cos, sin).to(dtype), apply_rope(k, cos, sin).to(dtype), v
