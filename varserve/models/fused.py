"""The elementwise pieces of a block (and the VAE's norm), written once in plain torch.

On CUDA the per-token ones run as Triton kernels of our own (norm, AdaLN modulation, gated residual,
cosine q/k/v with RoPE: one pass each over [T, C]), and the VAE's GroupNorm + swish is compiled with
torch.compile. Elsewhere they run eagerly, so the CPU exactness tests check the same math; the GPU tests
compare both. VARSERVE_COMPILE=0 runs the eager versions on CUDA too (for debugging a CUDA run).
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


def rows_on_cuda(fast: Callable[..., Tensor]) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Run `fast` (a Triton launch) instead of the decorated eager function for a float32 CUDA residual `x`.
    These run 6 times per layer: torch.compile's guards and wrappers cost ~0.3 ms of host time per call,
    more than the kernels themselves at small batches, and a direct launch ~20 us."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        @functools.wraps(fn)
        def run(x: Tensor, *args, **kwargs):
            if (x.is_cuda and triton is not None and x.dtype == torch.float32 and x.is_contiguous()
                    and os.environ.get("VARSERVE_COMPILE", "1") != "0"):
                return fast(x, *args, **kwargs)
            return fn(x, *args, **kwargs)

        return run

    return wrap


def _ln_modulate_triton(x: Tensor, scale: Tensor, shift: Tensor, row_index: Tensor, eps: float,
                        dtype: torch.dtype) -> Tensor:
    return _norm_rows(x, scale, shift, row_index, eps, dtype, modulate=True)


def _layer_norm_cast_triton(x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    return _norm_rows(x, weight[None], bias[None], x, eps, dtype, modulate=False)


def _norm_rows(x: Tensor, a: Tensor, b: Tensor, row_index: Tensor, eps: float, dtype: torch.dtype,
               modulate: bool) -> Tensor:
    """LayerNorm of every row of x [T, C], then * (1 + a[row]) + b[row] (modulate) or * a[0] + b[0] (affine)."""
    T, C = x.shape
    out = torch.empty(T, C, dtype=dtype, device=x.device)
    a, b = _unit_last(a), _unit_last(b)
    if T:
        block = triton.next_power_of_2(C)
        _norm_rows_kernel[(T,)](x, a, b, row_index, out, C, a.stride(0), b.stride(0), eps, MODULATE=modulate,
                                BLOCK_C=block, num_warps=8 if block >= 2048 else 4)
    return out


def _gated_add_triton(x: Tensor, y: Tensor, gamma: Tensor, row_index: Tensor) -> Tensor:
    T, C = x.shape
    out = torch.empty_like(x)
    gamma = _unit_last(gamma)
    if T:
        block = triton.next_power_of_2(C)
        _gated_add_kernel[(T,)](x, y.contiguous(), gamma, row_index, out, C, gamma.stride(0), BLOCK_C=block,
                                num_warps=8 if block >= 2048 else 4)
    return out


def _unit_last(x: Tensor) -> Tensor:
    """x with unit stride along its last dimension (the kernels step rows by stride(0), columns by 1)."""
    return x if x.stride(-1) == 1 else x.contiguous()


@rows_on_cuda(_ln_modulate_triton)
def ln_modulate(x: Tensor, scale: Tensor, shift: Tensor, row_index: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """LayerNorm (no affine) of x [T, C], then per-row AdaLN: * (1 + scale[row]) + shift[row], cast to dtype."""
    return (F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[row_index]) + shift[row_index]).to(dtype)


@rows_on_cuda(_gated_add_triton)
def gated_add(x: Tensor, y: Tensor, gamma: Tensor, row_index: Tensor) -> Tensor:
    """Residual update x + y * gamma[row] in x's dtype."""
    return x + y.to(x.dtype) * gamma[row_index]


@rows_on_cuda(_layer_norm_cast_triton)
def layer_norm_cast(x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Affine LayerNorm computed in x's dtype (fp32 residual), output cast to dtype."""
    return F.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), eps).to(dtype)


def residual_add(x: Tensor, y: Tensor) -> Tensor:
    """x + y in x's dtype (the ungated cross-attention residual): one eager kernel, type promotion included."""
    return x + y.to(x.dtype)


@compiled_on_cuda
def group_norm_swish(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, dtype: torch.dtype) -> Tensor:
    """swish(GroupNorm(x)) in at least fp32 (autocast runs GroupNorm in fp32), cast to dtype: the VAE's norm,
    activation and the next conv's cast in one pass (eagerly, three passes over a 1024^2 x 128 map each)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = F.group_norm(x.to(acc), groups, weight.to(acc), bias.to(acc), eps)
    return (h * torch.sigmoid(h)).to(dtype)  # the reference's swish formula; F.silu may round differently


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
    def _norm_rows_kernel(X, A, B, Rows, Out, C, stride_a, stride_b, eps, MODULATE: tl.constexpr,
                          BLOCK_C: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_C)
        mask = offs < C
        x = tl.load(X + t * C + offs, mask=mask, other=0.0)
        mean = tl.sum(x, 0) / C
        centred = tl.where(mask, x - mean, 0.0)
        h = centred * tl.rsqrt(tl.sum(centred * centred, 0) / C + eps)
        row = tl.load(Rows + t).to(tl.int64) if MODULATE else 0
        a = tl.load(A + row * stride_a + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + row * stride_b + offs, mask=mask, other=0.0).to(tl.float32)
        h = h * (1 + a) + b if MODULATE else h * a + b
        tl.store(Out + t * C + offs, h.to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_add_kernel(X, Y, Gamma, Rows, Out, C, stride_g, BLOCK_C: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_C)
        mask = offs < C
        row = tl.load(Rows + t).to(tl.int64)
        x = tl.load(X + t * C + offs, mask=mask, other=0.0)
        y = tl.load(Y + t * C + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(Gamma + row * stride_g + offs, mask=mask, other=0.0)
        tl.store(Out + t * C + offs, x + y * g, mask=mask)

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
