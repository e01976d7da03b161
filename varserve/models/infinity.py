"""The Infinity transformer, written for packed variable-length batches.

One forward call runs the current scale of many rows (a row is one CFG half of a request), each possibly at
a different scale. Tokens of all rows are concatenated: `x` is [T, C] and `Batch.cu_seqlens` marks the rows.
Self-attention K/V live in an attention context (`SelfAttentionKV`) that the caller owns: the dense
reference path keeps contiguous per-request K/V, the engine keeps pages. The model never knows which.

Parameter names follow the official checkpoint layout (block_chunks.{c}.module.{j}...), so an official
state dict loads with a strict `load_state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varserve.attention import upload, varlen_attention
from varserve.models.config import ModelConfig
from varserve.models.fused import (PageWrite, add_ln_modulate, cosine_qkv, gated_add, gated_add_layer_norm, ln_modulate,
                                   needs_grad)

MAX_LOG_SCALE = math.log(100.0)


class SelfAttentionKV(Protocol):
    """Owns self-attention K/V. `attend` stores the current scale's k/v of `layer` and returns the attention
    of q over every kept key of the row (history and current scale), softmax scale 1, no mask.
    `raw_q` is the q projection without bias, norm or RoPE (what ScaleKV scores with); it is only computed
    when `wants_raw_query(layer)` is true. `page_slots(layer)`, when not None, says where the layer's new k/v
    go (paged K/V: the model writes them there as it makes them, then passes k = v = None to `attend`)."""

    def attend(self, layer: int, q: Tensor, k: Tensor | None, v: Tensor | None, raw_q: Tensor | None) -> Tensor: ...

    def wants_raw_query(self, layer: int) -> bool: ...

    def page_slots(self, layer: int) -> PageWrite | None: ...


@dataclass
class TextMemory:
    """Per-row conditioning derived from the text, computed once per request.
    cond: [R, C] pooled text (start token and AdaLN condition); gss: [R, 6, C] shared AdaLN output;
    head_ss: [R, 2, C] head AdaLN; ca_kv: [L, 2, sum(text_lens), H, d] every layer's cross-attention K and V
    (one tensor, so a step gathers the rows' text with one copy, not two per layer)."""

    cond: Tensor
    gss: Tensor
    head_ss: Tensor
    ca_kv: Tensor
    text_lens: list[int]

    def rows(self, start: int, stop: int) -> "TextMemory":
        """Rows start .. stop - 1 as views (no copy; they keep the whole memory alive)."""
        first = sum(self.text_lens[:start])
        last = first + sum(self.text_lens[start:stop])
        return TextMemory(self.cond[start:stop], self.gss[start:stop], self.head_ss[start:stop],
                          self.ca_kv[:, :, first:last], self.text_lens[start:stop])

    @staticmethod
    def concat(parts: list["TextMemory"]) -> "TextMemory":
        if len(parts) == 1:
            return parts[0]
        return TextMemory(
            torch.cat([p.cond for p in parts]), torch.cat([p.gss for p in parts]),
            torch.cat([p.head_ss for p in parts]), torch.cat([p.ca_kv for p in parts], dim=2),
            [n for p in parts for n in p.text_lens],
        )


@dataclass
class Batch:
    """Metadata of one forward call over R rows. All tensors live on the model's device."""

    cu_seqlens: Tensor  # [R+1] int32, token boundaries of the rows
    max_seqlen: int
    row_index: Tensor  # [T] int64, row of every token
    level: Tensor  # [T] int64, scale index of every token (level embedding)
    rope_cos: Tensor  # [T, head_dim/2]
    rope_sin: Tensor
    text: TextMemory
    cu_text: Tensor  # [R+1] int32
    max_text: int


def rope_positions(scale_hw: tuple[int, int], grid_hw: tuple[int, int]) -> Tensor:
    """(row, col) positions [h*w, 2] of a scale's tokens placed on the last scale's grid."""
    (h, w), (gh, gw) = scale_hw, grid_hw
    rows = (torch.arange(h) * (gh / h)).round().long()
    cols = (torch.arange(w) * (gw / w)).round().long()
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


@lru_cache(maxsize=2048)
def rope_table(scale_hw: tuple[int, int], grid_hw: tuple[int, int], head_dim: int, base: float,
               device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(cos, sin) [h*w, head_dim/2] of a scale, cached on the device: a step only concatenates them."""
    angles = rope_angles(scale_hw, grid_hw, head_dim, base)
    return upload(angles.cos(), device, dtype), upload(angles.sin(), device, dtype)


@lru_cache(maxsize=512)
def rope_angles(scale_hw: tuple[int, int], grid_hw: tuple[int, int], head_dim: int, base: float) -> Tensor:
    """Angles [h*w, head_dim/2]: the first half of the pairs turn with the row, the second with the column."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (base ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float64) / (2 * quarter)))
    pos = rope_positions(scale_hw, grid_hw).double()
    return torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class SelfAttention(nn.Module):
    """Cosine attention: normalized q (times a learned per-head scale) and k, 2D RoPE, softmax scale 1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.mat_qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, cfg.num_heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor, batch: Batch, kv: SelfAttentionKV, layer: int) -> Tensor:
        T, hd = x.shape[0], (self.heads, self.head_dim)
        qkv = F.linear(x, self.mat_qkv.weight).view(T, 3, *hd)
        raw_q = qkv[:, 0] if kv.wants_raw_query(layer) else None
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        # Clamped in the parameter's dtype, as the reference (bf16 blocks: log(100) rounds to 4.59375), then exp.
        q_scale = self.scale_mul_1H11.view(self.heads, 1).clamp_max(MAX_LOG_SCALE).to(acc).exp()
        q, k, v = cosine_qkv(qkv, self.q_bias.view(hd), self.v_bias.view(hd), q_scale, batch.rope_cos,
                             batch.rope_sin, x.dtype, kv.page_slots(layer))
        out = kv.attend(layer, q, k, v, raw_q)
        return self.proj(out.reshape(T, -1))


class CrossAttention(nn.Module):
    """Attention of image tokens to the row's text memory; K/V come precomputed in TextMemory."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.mat_q = nn.Linear(cfg.width, cfg.width)
        self.mat_kv = nn.Linear(cfg.width, 2 * cfg.width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def text_kv(self, memory: Tensor) -> Tensor:
        """[2, T, H, d]: K and V of the text memory [T, C]."""
        kv = F.linear(memory, self.mat_kv.weight).view(-1, 2, self.heads, self.head_dim).transpose(0, 1)
        return torch.stack([kv[0], kv[1] + self.v_bias.view(self.heads, self.head_dim)])

    def forward(self, x: Tensor, batch: Batch, layer: int) -> Tensor:
        q = self.mat_q(x).view(x.shape[0], self.heads, self.head_dim)
        k, v = batch.text.ca_kv[layer]
        out = varlen_attention(q, k, v, batch.cu_seqlens, batch.cu_text, batch.max_seqlen, batch.max_text,
                               1.0 / math.sqrt(self.head_dim))
        return self.proj(out.reshape(x.shape[0], -1))


class FFN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        # GELU (tanh) as cuBLASLt's epilogue of fc1: one pass less over [T, 4C]
        if x.is_cuda and x.dim() == 2 and not needs_grad(x, self.fc1.weight, self.fc1.bias):
            return self.fc2(torch._addmm_activation(self.fc1.bias, x, self.fc1.weight.t(), use_gelu=True))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, cfg.width) / cfg.width**0.5)
        self.sa = SelfAttention(cfg)
        self.ca = CrossAttention(cfg)
        self.ca_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.ffn = FFN(cfg)

    def forward(self, x: Tensor, batch: Batch, kv: SelfAttentionKV, layer: int) -> Tensor:
        """x: [T, C] residual stream in fp32 (fp64 in exactness tests); sublayers run in the weights' dtype."""
        dtype, rows = self.sa.proj.weight.dtype, batch.row_index
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss[0, 0].to(x.dtype) + batch.text.gss).unbind(1)
        attended = self.sa(ln_modulate(x, scale1, shift1, rows, self.eps, dtype), batch, kv, layer)
        # ca_norm runs on the fp32 residual (the reference's autocast runs layer_norm in fp32); only its output
        # is cast to the weights' dtype.
        x, h = gated_add_layer_norm(x, attended, gamma1, rows, self.ca_norm.weight, self.ca_norm.bias,
                                    self.ca_norm.eps, dtype)
        x, h = add_ln_modulate(x, self.ca(h, batch, layer), scale2, shift2, rows, self.eps, dtype)
        return gated_add(x, self.ffn(h), gamma2, rows)


class BlockChunk(nn.Module):
    def __init__(self, blocks: list[Block]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class TextAttentivePool(nn.Module):
    """One learned query attends over a row's text: the pooled condition vector."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.pool_heads
        self.head_dim = cfg.width // cfg.pool_heads
        self.mat_q = nn.Parameter(torch.randn(1, self.heads, self.head_dim) * math.sqrt(1 / cfg.width / 3))
        self.mat_kv = nn.Linear(cfg.text_dim, 2 * cfg.width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, text: Tensor, cu_text: Tensor, max_text: int) -> Tensor:
        kv = F.linear(text, self.mat_kv.weight).view(-1, 2, self.heads, self.head_dim)
        k, v = kv[:, 0], kv[:, 1] + self.v_bias.view(self.heads, self.head_dim)
        rows = cu_text.numel() - 1
        q = self.mat_q.to(text.dtype).expand(rows, -1, -1).contiguous()
        cu_q = torch.arange(rows + 1, dtype=torch.int32, device=text.device)
        out = varlen_attention(q, k.contiguous(), v.contiguous(), cu_q, cu_text, 1, max_text, 1 / math.sqrt(self.head_dim))
        return self.proj(out.reshape(rows, -1))


class TextPool(nn.Module):
    """Holds the attentive pool under the official name `text_proj_for_sos.ca`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ca = TextAttentivePool(cfg)


class AdaLNHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))


class Infinity(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.width
        self.cfg_uncond = nn.Parameter(torch.randn(cfg.text_maxlen, cfg.text_dim) * 1.2 / cfg.text_dim**0.5)
        self.text_norm = RMSNorm(cfg.text_dim, cfg.norm_eps)
        self.text_proj_for_sos = TextPool(cfg)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(cfg.text_dim, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * math.sqrt(1 / C / 3))
        self.lvl_embed = nn.Embedding(cfg.num_levels, C)
        self.word_embed = nn.Linear(cfg.d_vae, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        blocks = [Block(cfg) for _ in range(cfg.depth)]
        n = cfg.blocks_per_chunk
        self.block_chunks = nn.ModuleList(BlockChunk(blocks[i : i + n]) for i in range(0, cfg.depth, n))
        self.head_nm = AdaLNHead(cfg)
        self.head = nn.Linear(C, 2 * cfg.d_vae)

    @property
    def blocks(self) -> list[Block]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    @property
    def residual_dtype(self) -> torch.dtype:
        return torch.float64 if self.head.weight.dtype == torch.float64 else torch.float32

    def uncond_text(self, length: int) -> Tensor:
        """The learned unconditional text of a prompt's length (CFG without a negative prompt)."""
        return self.cfg_uncond[:length]

    @torch.no_grad()
    def encode_text(self, features: Tensor, lengths: list[int]) -> TextMemory:
        """features: [sum(lengths), text_dim] packed T5 output of R rows -> the rows' TextMemory."""
        acc = self.residual_dtype
        # RMSNorm of the fp32 T5 features (as the reference); the text layers then run in the weights' dtype.
        text = self.text_norm(features.to(acc)).to(self.text_proj_for_ca[0].weight.dtype)
        cu = cu_seqlens(lengths, text.device)
        cond = self.text_proj_for_sos.ca(text, cu, max(lengths)).to(acc)
        memory = self.text_proj_for_ca(text)
        ca_kv = torch.stack([b.ca.text_kv(memory) for b in self.blocks])
        lin = self.shared_ada_lin[1]
        gss = F.linear(F.silu(cond), lin.weight.to(acc), lin.bias.to(acc)).view(-1, 6, self.cfg.width)
        head = self.head_nm.ada_lin[1]
        head_ss = F.linear(F.silu(cond), head.weight.to(acc), head.bias.to(acc)).view(-1, 2, self.cfg.width)
        return TextMemory(cond, gss, head_ss, ca_kv, list(lengths))

    def start_tokens(self, cond: Tensor) -> Tensor:
        """Scale-0 input of rows with pooled text `cond` [R, C]: one token each."""
        return cond.to(self.residual_dtype) + self.pos_start[0].to(self.residual_dtype)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Later-scale input: accumulated codes [T, d_vae] -> [T, C]."""
        return self.word_embed(tokens.to(self.word_embed.weight.dtype)).to(self.residual_dtype)

    @torch.no_grad()
    def forward(self, x: Tensor, batch: Batch, kv: SelfAttentionKV) -> Tensor:
        """x: [T, C] scale inputs of R rows -> bit logits [T, 2*d_vae] in fp32 (fp64 in fp64 runs)."""
        x = x.to(self.residual_dtype) + self.lvl_embed.weight.to(self.residual_dtype)[batch.level]
        for layer, block in enumerate(self.blocks):
            x = block(x, batch, kv, layer)
        return self.logits(x, batch)

    def logits(self, x: Tensor, batch: Batch) -> Tensor:
        scale, shift = batch.text.head_ss.unbind(1)
        h = ln_modulate(x, scale, shift, batch.row_index, self.cfg.norm_eps, x.dtype)
        return F.linear(h, self.head.weight.to(x.dtype), self.head.bias.to(x.dtype))


def cu_seqlens(lengths: list[int], device: torch.device) -> Tensor:
    """int32 [len(lengths) + 1] offsets of packed rows of these lengths, on `device`."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return upload(cu, device)


def make_batch(
    model: Infinity, text: TextMemory, row_scales: list[tuple[int, tuple[int, int], tuple[int, int]]],
) -> Batch:
    """Batch metadata for rows given as (scale index, (h, w), rope grid (H, W)), in row order."""
    cfg, device = model.cfg, model.head.weight.device
    lens = [h * w for _, (h, w), _ in row_scales]
    dtype = model.residual_dtype
    cos, sin = zip(*(rope_table(hw, grid, cfg.head_dim, cfg.rope_base, device, dtype) for _, hw, grid in row_scales))
    row_index = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    level = torch.repeat_interleave(torch.tensor([s for s, _, _ in row_scales]), torch.tensor(lens))
    return Batch(
        cu_seqlens=cu_seqlens(lens, device), max_seqlen=max(lens),
        row_index=upload(row_index, device), level=upload(level, device),
        rope_cos=torch.cat(cos), rope_sin=torch.cat(sin),
        text=text, cu_text=cu_seqlens(text.text_lens, device), max_text=max(text.text_lens),
    )
