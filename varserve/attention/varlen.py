"""Varlen attention over contiguous K/V: cross-attention of packed image tokens to packed text tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FLASH = getattr(torch.ops.aten, "_flash_attention_forward", None)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float) -> Tensor:
    """Non-causal attention of `q [Tq, H, d]` to `k, v [Tk, H, d]`, row b owning
    q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] and k/v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]. Returns `[Tq, H, d]`.
    CUDA fp16/bf16 runs torch's FlashAttention-2 varlen, called as the aten op (torch.nn.attention.varlen's
    wrapper, a custom op, cost ~0.4 ms of host time a call, 13 ms a step); everything else a padded SDPA (exact in
    float64)."""
    if q.is_cuda and FLASH is not None and q.dtype in (torch.float16, torch.bfloat16):
        cu_q, cu_k = (cu.to(q.device, torch.int32) for cu in (cu_seqlens_q, cu_seqlens_k))
        return FLASH(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, 0.0, False, False, scale=softmax_scale)[0]
    q_rows, q_valid = _pad(q, cu_seqlens_q, max_seqlen_q)
    (k_rows, k_valid), (v_rows, _) = _pad(k, cu_seqlens_k, max_seqlen_k), _pad(v, cu_seqlens_k, max_seqlen_k)
    out = F.scaled_dot_product_attention(q_rows.transpose(1, 2), k_rows.transpose(1, 2), v_rows.transpose(1, 2),
                                         attn_mask=k_valid[:, None, None, :], scale=softmax_scale)
    return out.transpose(1, 2)[q_valid]


def _pad(x: Tensor, cu_seqlens: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """Packed `[T, H, d]` -> zero-padded `[B, max_len, H, d]` and its validity mask `[B, max_len]`. Rows past the
    last one's end (a static buffer's unused tail) are ignored."""
    lengths = torch.diff(cu_seqlens.to(x.device))
    valid = torch.arange(max_len, device=x.device) < lengths[:, None]
    rows = x.new_zeros(len(lengths), max_len, *x.shape[1:])
    rows[valid] = x[: int(lengths.sum())]
    return rows, valid
