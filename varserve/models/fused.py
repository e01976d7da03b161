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

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the eager path runs
    triton = None

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
def group_norm_swish(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, dtype: torch.dtype) -> Tensor:
    """swish(GroupNorm(x)) in at least fp32 (autocast runs GroupNorm in fp32), cast to dtype: the VAE's norm,
    activation and the next conv's cast in one pass (eagerly, three passes over a 1024^2 x 128 map each)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = F.group_norm(x.to(acc), groups, weight.to(acc), bias.to(acc), eps)
    return (h * torch.sigmoid(h)).to(dtype)  # the reference's swish formula; F.silu may round differently


@compiled_on_cuda
def residual_add(x: Tensor, y: Tensor) -> Tensor:
    """x + y in x's dtype (the ungated cross-attention residual)."""
    return x + y.to(x.dtype)


def cosine_qkv(qkv: Tensor, q_bias: Tensor, v_bias: Tensor, q_scale: Tensor, cos: Tensor, sin: Tensor,
               dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """qkv [T, 3, H, d] (no bias) -> q, k, v [T, H, d]: biases, L2-normalised q (times the per-head scale
    q_scale [H, 1]) and k in q_scale's precision, 2D RoPE on both, cast to dtype. On CUDA one Triton
    program per token does it all (torch.compile's fusion of this ran ~8x under memory bandwidth)."""
    half = qkv.shape[-1] // 2
    fits_kernel = half & (half - 1) == 0 and q_scale.dtype == torch.float32  # power-of-2 pairs, fp32 math
    if qkv.is_cuda and triton is not None and fits_kernel and os.environ.get("VARSERVE_COMPILE", "1") != "0":
        return _cosine_qkv_triton(qkv, q_bias, v_bias, q_scale, cos, sin, dtype)
    return cosine_qkv_eager(qkv, q_bias, v_bias, q_scale, cos, sin, dtype)


def cosine_qkv_eager(qkv: Tensor, q_bias: Tensor, v_bias: Tensor, q_scale: Tensor, cos: Tensor, sin: Tensor,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    acc = q_scale.dtype
    q = F.normalize((qkv[:, 0] + q_bias).to(acc), dim=-1) * q_scale
    k = F.normalize(qkv[:, 1].to(acc), dim=-1)
    v = qkv[:, 2] + v_bias
    return apply_rope(q, cos, sin).to(dtype), apply_rope(k, cos, sin).to(dtype), v


def _cosine_qkv_triton(qkv: Tensor, q_bias: Tensor, v_bias: Tensor, q_scale: Tensor, cos: Tensor, sin: Tensor,
                       dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    T, _, H, d = qkv.shape
    qkv = qkv.contiguous()
    q, k, v = (torch.empty(T, H, d, dtype=dt, device=qkv.device) for dt in (dtype, dtype, qkv.dtype))
    _cosine_qkv_kernel[(T,)](
        qkv, q_bias.contiguous(), v_bias.contiguous(), q_scale.reshape(H).float().contiguous(),
        cos.float().contiguous(), sin.float().contiguous(), q, k, v,
        HEADS=H, HALF=d // 2, BLOCK_H=triton.next_power_of_2(H), num_warps=4)
    return q, k, v


if triton is not None:

    @triton.jit
    def _cosine_qkv_kernel(QKV, QBias, VBias, QScale, Cos, Sin, Q, K, V,
                           HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        valid = h < HEADS
        offs = h * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]  # every head's row, read contiguously
        width = HEADS * 2 * HALF  # elements of one token's q (or k, or v)
        row = t * width
        cos = tl.load(Cos + t * HALF + tl.arange(0, HALF))[None, :]
        sin = tl.load(Sin + t * HALF + tl.arange(0, HALF))[None, :]
        scale = tl.load(QScale + h, mask=valid, other=0.0)
        for part in tl.static_range(2):  # 0: q (bias, per-head scale), 1: k
            x = tl.load(QKV + 3 * row + part * width + offs, mask=valid, other=0.0).to(tl.float32)
            if part == 0:
                x += tl.load(QBias + offs, mask=valid, other=0.0).to(tl.float32)
            inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None]
            if part == 0:
                inv = inv * scale
            even, odd = tl.split(tl.reshape(x * inv, [BLOCK_H, HALF, 2]))  # the (even, odd) pairs RoPE turns
            turned = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), [BLOCK_H, 2 * HALF])
            out = Q if part == 0 else K
            tl.store(out + row + offs, turned.to(out.dtype.element_ty), mask=valid)
        vv = tl.load(QKV + 3 * row + 2 * width + offs, mask=valid, other=0.0).to(tl.float32)
        vv += tl.load(VBias + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(V + row + offs, vv.to(V.dtype.element_ty), mask=valid)
