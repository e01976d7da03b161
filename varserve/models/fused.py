"""The elementwise pieces of a block (and the VAE's norm), written once in plain torch.

On CUDA the per-token ones run as Triton kernels of our own (norm, AdaLN modulation, gated residual,
cosine q/k/v with RoPE: one pass each over [T, C]), and so does the VAE's GroupNorm + swish (two passes over
a channels-last map). Elsewhere they run eagerly, so the CPU exactness tests check the same math; the GPU tests
compare both. VARSERVE_COMPILE=0 runs the eager versions on CUDA too (for debugging a CUDA run).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from varserve.attention import slot_mapping, write_kv

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the eager path runs
    triton = None

logger = logging.getLogger("varserve")


@dataclass(frozen=True)
class PageWrite:
    """Where a layer's new K/V go: token i of row b, head h, to position start[b, h] + i of that (row, head)'s
    pages. pages `[N, page_size, d]`; table `[R, H, pages]` and start `[R, H]` (int32, contiguous); token_row and
    token_pos `[T]` int64: each packed token's row and position in it (`token_rows`)."""

    k_pages: Tensor
    v_pages: Tensor
    table: Tensor
    start: Tensor
    token_row: Tensor
    token_pos: Tensor

    def slots(self) -> Tensor:
        """`[T, H]` int64 flat slots (`slot_mapping`)."""
        return slot_mapping(self.table, self.start, (self.token_row, self.token_pos), self.k_pages.shape[1])



def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent (even, odd) pairs of x [T, H, d] by per-token angles [T, d/2]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def needs_grad(*tensors: Tensor) -> bool:
    """Whether autograd records an op on these tensors: the Triton kernels and cuBLASLt's GELU epilogue have no
    backward, so such calls (training) run the eager versions."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _kernels_on(x: Tensor, *tensors: object) -> bool:
    """Whether a Triton kernel replaces the eager version: on CUDA, without autograd, unless VARSERVE_COMPILE=0."""
    return (x.is_cuda and triton is not None and os.environ.get("VARSERVE_COMPILE", "1") != "0"
            and not needs_grad(x, *(t for t in tensors if isinstance(t, Tensor))))


def rows_on_cuda(fast: Callable[..., Tensor]) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Run `fast` (a Triton launch) instead of the decorated eager function for a float32 CUDA residual `x`.
    These run 6 times per layer: torch.compile's guards and wrappers cost ~0.3 ms of host time per call,
    more than the kernels themselves at small batches, and a direct launch ~20 us."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        @functools.wraps(fn)
        def run(x: Tensor, *args, **kwargs):
            if x.dtype == torch.float32 and x.is_contiguous() and _kernels_on(x, *args, *kwargs.values()):
                return fast(x, *args, **kwargs)
            return fn(x, *args, **kwargs)

        return run

    return wrap


def _ln_modulate_triton(x: Tensor, scale: Tensor, shift: Tensor, row_index: Tensor, eps: float,
                        dtype: torch.dtype) -> Tensor:
    return _norm_rows(x, scale, shift, row_index, eps, dtype, modulate=True)[1]


def _gated_add_layer_norm_triton(x: Tensor, y: Tensor, gamma: Tensor, row_index: Tensor, weight: Tensor, bias: Tensor,
                                 eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _norm_rows(x, weight[None], bias[None], row_index, eps, dtype, modulate=False, y=y, gamma=gamma)


def _add_ln_modulate_triton(x: Tensor, y: Tensor, scale: Tensor, shift: Tensor, row_index: Tensor, eps: float,
                            dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _norm_rows(x, scale, shift, row_index, eps, dtype, modulate=True, y=y)


def _norm_rows(x: Tensor, a: Tensor, b: Tensor, row_index: Tensor, eps: float, dtype: torch.dtype, modulate: bool,
               y: Tensor | None = None, gamma: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LayerNorm of every row of x [T, C], then * (1 + a[row]) + b[row] (modulate) or * a[0] + b[0] (affine);
    with y, x first becomes x + y (or x + y * gamma[row]), a new tensor. Returns (x, the norm's output)."""
    T, C = x.shape
    out = torch.empty(T, C, dtype=dtype, device=x.device)
    residual = x if y is None else torch.empty_like(x)
    a, b = _unit_last(a), _unit_last(b)
    gate = a if gamma is None else _unit_last(gamma)  # unread without gamma
    if T:
        block = triton.next_power_of_2(C)
        _norm_rows_kernel[(T,)](x, x if y is None else y.contiguous(), gate, a, b, row_index, residual, out, C,
                                gate.stride(0), a.stride(0), b.stride(0), eps, ADD=y is not None,
                                GATED=gamma is not None, MODULATE=modulate, BLOCK_C=block,
                                num_warps=8 if block >= 2048 else 4)
    return residual, out


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


def layer_norm_cast(x: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Affine LayerNorm computed in x's dtype (fp32 residual), output cast to dtype."""
    return F.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), eps).to(dtype)


@rows_on_cuda(_gated_add_layer_norm_triton)
def gated_add_layer_norm(x: Tensor, y: Tensor, gamma: Tensor, row_index: Tensor, weight: Tensor, bias: Tensor,
                         eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`gated_add`, then `layer_norm_cast` of the result: (new residual, its norm). One pass on CUDA."""
    x = gated_add.__wrapped__(x, y, gamma, row_index)
    return x, layer_norm_cast(x, weight, bias, eps, dtype)


@rows_on_cuda(_add_ln_modulate_triton)
def add_ln_modulate(x: Tensor, y: Tensor, scale: Tensor, shift: Tensor, row_index: Tensor, eps: float,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The ungated residual x + y (in x's dtype), then `ln_modulate` of it: (new residual, its norm). One pass on
    CUDA."""
    x = x + y.to(x.dtype)
    return x, ln_modulate.__wrapped__(x, scale, shift, row_index, eps, dtype)


def group_norm_swish(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, dtype: torch.dtype) -> Tensor:
    """swish(GroupNorm(x)) of x [N, C, H, W] in at least fp32, cast to dtype: the VAE's norm, activation and the
    next conv's cast. On CUDA, for inference below float64, two Triton passes over the channels-last map
    (statistics, then the rest; no autograd, so training runs the eager version); the output is channels-last
    there. torch.compile's version ran at ~1/8 of memory bandwidth, its statistics one program per (image, group)."""
    if x.dtype != torch.float64 and _kernels_on(x, weight, bias):
        return _group_norm_swish_triton(x, weight, bias, groups, eps, dtype)
    return group_norm_swish_eager(x, weight, bias, groups, eps, dtype)


def group_norm_swish_eager(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
                           dtype: torch.dtype) -> Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    h = F.group_norm(x.to(acc), groups, weight.to(acc), bias.to(acc), eps)
    return (h * torch.sigmoid(h)).to(dtype)  # the reference's swish formula; F.silu may round differently


GN_TILE = 4096  # elements of one [pixels, channels] tile of the GroupNorm kernels
GN_STATS_PIXELS = 2048  # pixels one statistics program reduces


def _group_norm_swish_triton(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
                             dtype: torch.dtype) -> Tensor:
    N, C, H, W = x.shape
    nhwc = x.permute(0, 2, 3, 1).contiguous()  # a view when x is channels-last already
    block_c = triton.next_power_of_2(C)
    sub = max(1, GN_TILE // block_c)
    pixels = H * W
    blocks = triton.cdiv(pixels, GN_STATS_PIXELS)
    sums, m2s = (torch.empty(N, blocks, C, dtype=torch.float32, device=x.device) for _ in range(2))
    _group_stats_kernel[(blocks, N)](nhwc, sums, m2s, pixels, C, GN_STATS_PIXELS, blocks, SUB=sub, BLOCK_C=block_c,
                                     num_warps=8)
    mean, scale = _group_affine(sums, m2s, pixels, groups, weight, eps)
    out = torch.empty(N, H, W, C, dtype=dtype, device=x.device)
    _scale_swish_kernel[(triton.cdiv(pixels, sub), N)](nhwc, mean, scale, bias.float().contiguous(), out, pixels, C,
                                                       SUB=sub, BLOCK_C=block_c, num_warps=8)
    return out.permute(0, 3, 1, 2)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """F.conv2d. On CUDA, for inference below float64, a channels-last output takes its bias from one Triton pass
    (PyTorch adds a cuDNN conv's bias with a broadcast kernel that ran at ~2/5 of memory bandwidth in the VAE);
    the bias is cast to the output's dtype first, as autocast does."""
    if bias is None or x.dtype == torch.float64 or not _kernels_on(x, weight, bias):
        return F.conv2d(x, weight, bias, padding=padding)
    out = F.conv2d(x, weight, None, padding=padding)
    if not out.is_contiguous(memory_format=torch.channels_last):
        return out.add_(bias.to(out.dtype).view(1, -1, 1, 1))
    _channel_bias_add_triton(out.permute(0, 2, 3, 1), bias.to(out.dtype))
    return out


def _channel_bias_add_triton(nhwc: Tensor, bias: Tensor) -> None:
    """nhwc [N, H, W, C] (contiguous) += bias [C], in place."""
    C = nhwc.shape[-1]
    block_c = triton.next_power_of_2(C)
    sub = max(1, GN_TILE // block_c)
    pixels = nhwc.numel() // C
    _channel_bias_kernel[(triton.cdiv(pixels, sub),)](nhwc, bias.contiguous(), pixels, C, SUB=sub, BLOCK_C=block_c,
                                                      num_warps=8)


def _group_affine(sums: Tensor, m2s: Tensor, pixels: int, groups: int, weight: Tensor,
                  eps: float) -> tuple[Tensor, Tensor]:
    """Per (image, channel) group mean and rstd * weight, from per-block channel sums and squared deviations
    (Chan's combination, in float64: it is small)."""
    N, blocks, C = sums.shape
    first = torch.arange(blocks, dtype=torch.float64, device=sums.device) * GN_STATS_PIXELS
    count = (pixels - first).clamp(max=GN_STATS_PIXELS)  # pixels per block (no host value written: no sync)
    sums, m2s = sums.double().view(N, blocks, groups, -1), m2s.double().view(N, blocks, groups, -1)
    mean = sums.sum((1, 3)) / (pixels * sums.shape[-1])  # [N, G]
    block_mean = sums / count[:, None, None]
    m2 = m2s.sum((1, 3)) + (count[:, None, None] * (block_mean - mean[:, None, :, None]) ** 2).sum((1, 3))
    rstd = torch.rsqrt(m2 / (pixels * sums.shape[-1]) + eps)
    scale = rstd.repeat_interleave(C // groups, dim=1) * weight.double()  # [N, C]
    return mean.repeat_interleave(C // groups, dim=1).float().contiguous(), scale.float().contiguous()


def cosine_qkv(qkv: Tensor, q_bias: Tensor, v_bias: Tensor, q_scale: Tensor, cos: Tensor, sin: Tensor,
               dtype: torch.dtype, pages: PageWrite | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """qkv [T, 3, H, d] (no bias) -> q, k, v [T, H, d]: biases, L2-normalised q (times the per-head scale
    q_scale [H, 1]) and k in q_scale's precision, 2D RoPE on both, cast to dtype. With `pages` k and v go
    straight into their page slots (in the pages' dtype) and come back as None. On CUDA one Triton program per
    token does it all, the slots included (torch.compile's fusion of this ran ~8x under memory bandwidth; the
    page write saves writing k and v once more, and the slots in the kernel ~10 launches a layer)."""
    half = qkv.shape[-1] // 2
    fits_kernel = half & (half - 1) == 0 and q_scale.dtype == torch.float32  # power-of-2 pairs, fp32 math
    if fits_kernel and _kernels_on(qkv, q_bias, v_bias, q_scale, *((pages.k_pages, pages.v_pages) if pages else ())):
        return _cosine_qkv_triton(qkv, q_bias, v_bias, q_scale, cos, sin, dtype, pages)
    q, k, v = cosine_qkv_eager(qkv, q_bias, v_bias, q_scale, cos, sin, dtype)
    if pages is None:
        return q, k, v
    write_kv(pages.k_pages, pages.v_pages, k, v, pages.slots())
    return q, None, None


def cosine_qkv_eager(qkv: Tensor, q_bias: Tensor, v_bias: Tensor, q_scale: Tensor, cos: Tensor, sin: Tensor,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    acc = q_scale.dtype
    q = F.normalize((qkv[:, 0] + q_bias).to(acc), dim=-1) * q_scale
    k = F.normalize(qkv[:, 1].to(acc), dim=-1)
    v = qkv[:, 2] + v_bias
    return apply_rope(q, cos, sin).to(dtype), apply_rope(k, cos, sin).to(dtype), v


def _cosine_qkv_triton(qkv: Tensor, q_bias: Tensor, v_bias: Tensor, q_scale: Tensor, cos: Tensor, sin: Tensor,
                       dtype: torch.dtype, pages: PageWrite | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    T, _, H, d = qkv.shape
    qkv = qkv.contiguous()
    q = torch.empty(T, H, d, dtype=dtype, device=qkv.device)
    if pages is None:
        k, v = torch.empty_like(q), torch.empty(T, H, d, dtype=qkv.dtype, device=qkv.device)
        where, pages_per_table, page = (q, q, q, q), 1, 1
    else:
        k, v, where = pages.k_pages, pages.v_pages, (pages.table, pages.start, pages.token_row, pages.token_pos)
        pages_per_table, page = pages.table.shape[-1], k.shape[1]
        fits = pages.table.shape[:2] == pages.start.shape and pages.start.shape[1] == H and len(pages.token_row) == T
        if not (fits and k.is_contiguous() and v.is_contiguous() and k.shape[-1] == d
                and all(x.is_contiguous() for x in where)):
            raise ValueError(f"cosine_qkv: pages must be contiguous [N, page_size, {d}], with a contiguous table "
                             f"[R, {H}, pages], start [R, {H}] and {T} token rows and positions")
    _cosine_qkv_kernel[(T,)](
        qkv, q_bias.contiguous(), v_bias.contiguous(), q_scale.reshape(H).float().contiguous(),
        cos.float().contiguous(), sin.float().contiguous(), q, k, v, *where, pages_per_table,
        HEADS=H, HALF=d // 2, BLOCK_H=triton.next_power_of_2(H), PAGE=page, PAGED=pages is not None, num_warps=4)
    return (q, k, v) if pages is None else (q, None, None)


if triton is not None:

    @triton.jit
    def _norm_rows_kernel(X, Y, Gamma, A, B, Rows, XOut, Out, C, stride_g, stride_a, stride_b, eps,
                          ADD: tl.constexpr, GATED: tl.constexpr, MODULATE: tl.constexpr, BLOCK_C: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_C)
        mask = offs < C
        x = tl.load(X + t * C + offs, mask=mask, other=0.0)
        row = tl.load(Rows + t).to(tl.int64) if MODULATE or GATED else 0
        if ADD:
            y = tl.load(Y + t * C + offs, mask=mask, other=0.0).to(tl.float32)
            if GATED:
                x = x + y * tl.load(Gamma + row * stride_g + offs, mask=mask, other=0.0)
            else:
                x = x + y
            tl.store(XOut + t * C + offs, x, mask=mask)
        mean = tl.sum(x, 0) / C
        centred = tl.where(mask, x - mean, 0.0)
        h = centred * tl.rsqrt(tl.sum(centred * centred, 0) / C + eps)
        a = tl.load(A + (row if MODULATE else 0) * stride_a + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + (row if MODULATE else 0) * stride_b + offs, mask=mask, other=0.0).to(tl.float32)
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
    def _cosine_qkv_kernel(QKV, QBias, VBias, QScale, Cos, Sin, Q, K, V, Table, Start, TokenRow, TokenPos, pages,
                           HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, PAGE: tl.constexpr,
                           PAGED: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        valid = h < HEADS
        offs = h * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]  # every head's row, read contiguously
        width = HEADS * 2 * HALF  # elements of one token's q (or k, or v)
        row = t * width
        cos = tl.load(Cos + t * HALF + tl.arange(0, HALF))[None, :]
        sin = tl.load(Sin + t * HALF + tl.arange(0, HALF))[None, :]
        scale = tl.load(QScale + h, mask=valid, other=0.0)
        if PAGED:  # k and v of (token, head) go to their page slot's row
            sequence = tl.load(TokenRow + t) * HEADS + h  # [BLOCK_H, 1]: (row, head)
            position = tl.load(Start + sequence, mask=valid, other=0) + tl.load(TokenPos + t)
            page = tl.load(Table + sequence * pages + position // PAGE, mask=valid, other=0).to(tl.int64)
            kv_offs = (page * PAGE + position % PAGE) * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        else:
            kv_offs = row + offs
        for part in tl.static_range(2):  # 0: q (bias, per-head scale), 1: k
            x = tl.load(QKV + 3 * row + part * width + offs, mask=valid, other=0.0).to(tl.float32)
            if part == 0:
                x += tl.load(QBias + offs, mask=valid, other=0.0).to(tl.float32)
            inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None]
            if part == 0:
                inv = inv * scale
            even, odd = tl.split(tl.reshape(x * inv, [BLOCK_H, HALF, 2]))  # the (even, odd) pairs RoPE turns
            turned = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), [BLOCK_H, 2 * HALF])
            if part == 0:
                tl.store(Q + row + offs, turned.to(Q.dtype.element_ty), mask=valid)
            else:
                tl.store(K + kv_offs, turned.to(Q.dtype.element_ty).to(K.dtype.element_ty), mask=valid)
        vv = tl.load(QKV + 3 * row + 2 * width + offs, mask=valid, other=0.0).to(tl.float32)
        vv += tl.load(VBias + offs, mask=valid, other=0.0).to(tl.float32)
        # v rounds to qkv's dtype first, as the eager path's bias add does, then to the destination's
        tl.store(V + kv_offs, vv.to(QKV.dtype.element_ty).to(V.dtype.element_ty), mask=valid)

    @triton.jit
    def _group_stats_kernel(X, Sums, M2s, pixels, C, PIXELS: tl.constexpr, blocks, SUB: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        """Per-channel sum and squared deviation from the channel's mean over PIXELS pixels of one image, in one
        pass: sums of x - (the block's first pixel), which stay accurate when the mean is far from zero."""
        b, n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)  # many blocks: axis 0
        chan = tl.arange(0, BLOCK_C)[None, :]
        first = b * PIXELS
        shift = tl.load(X + (n * pixels + first) * C + chan, mask=chan < C, other=0.0).to(tl.float32)
        s1 = tl.zeros([SUB, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([SUB, BLOCK_C], dtype=tl.float32)
        for start in range(0, PIXELS, SUB):
            pix = first + start + tl.arange(0, SUB)[:, None]
            mask = (pix < pixels) & (chan < C)
            x = tl.load(X + (n * pixels + pix) * C + chan, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - shift, 0.0)
            s1 += d
            s2 += d * d
        count = tl.minimum(pixels - first, PIXELS).to(tl.float32)
        t1, t2 = tl.sum(s1, 0), tl.sum(s2, 0)
        out = (n * blocks + b) * C + tl.arange(0, BLOCK_C)
        valid = tl.arange(0, BLOCK_C) < C
        tl.store(Sums + out, t1 + count * tl.reshape(shift, [BLOCK_C]), mask=valid)
        tl.store(M2s + out, t2 - t1 * t1 / count, mask=valid)

    @triton.jit
    def _scale_swish_kernel(X, Mean, Scale, Bias, Out, pixels, C, SUB: tl.constexpr, BLOCK_C: tl.constexpr):
        """h = (x - mean[n, c]) * scale[n, c] + bias[c]; h * sigmoid(h), cast to Out's dtype, over SUB pixels."""
        b, n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)  # many blocks: axis 0
        chan = tl.arange(0, BLOCK_C)[None, :]
        pix = b * SUB + tl.arange(0, SUB)[:, None]
        mask = (pix < pixels) & (chan < C)
        offs = (n * pixels + pix) * C + chan
        mean = tl.load(Mean + n * C + chan, mask=chan < C, other=0.0)
        scale = tl.load(Scale + n * C + chan, mask=chan < C, other=0.0)
        bias = tl.load(Bias + chan, mask=chan < C, other=0.0)
        h = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean) * scale + bias
        tl.store(Out + offs, (h * tl.sigmoid(h)).to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _channel_bias_kernel(X, Bias, pixels, C, SUB: tl.constexpr, BLOCK_C: tl.constexpr):
        """x[p, c] += bias[c] over SUB pixels of a [pixels, C] map, in fp32, stored in x's dtype."""
        pix = tl.program_id(0).to(tl.int64) * SUB + tl.arange(0, SUB)[:, None]
        chan = tl.arange(0, BLOCK_C)[None, :]
        mask = (pix < pixels) & (chan < C)
        offs = pix * C + chan
        bias = tl.load(Bias + chan, mask=chan < C, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(X + offs, (x + bias).to(X.dtype.element_ty), mask=mask)
