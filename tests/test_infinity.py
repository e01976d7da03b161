"""The Infinity transformer: official checkpoint layout, the math of a block against a plain single-row
implementation written here from the reference facts (docs: /work/shared/reference/infinity.md), packed
multi-row forwards against per-row ones, and end-to-end dense generation with the test-small model.

Exactness tests run in float64 with random weights (non-zero biases, some attention scales above the
log(100) clamp) and random inputs.
"""

from __future__ import annotations

import copy
import math
import re
from fractions import Fraction

import pytest
import torch
from torch import Tensor

from varserve.models.checkpoint import INFINITY_IGNORED, load_into, load_transformer_state_dict
from varserve.models.config import get_config
from varserve.models.generation import ScaleSampling
from varserve.models.infinity import Infinity, TextMemory, make_batch
from varserve.models.loader import load_model
from varserve.models.reference import DenseKV, generate_dense
from varserve.models.schedule import parse_size

from model_fixtures import random_model

CFG = get_config("test-small")  # depth 4 in 2 chunks, width 128, 4 heads of 32, d_vae 16, T5 width 64
TOL = dict(rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# helpers




def text_features(seed: int, length: int, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return (torch.randn(length, CFG.text_dim, generator=g, dtype=torch.float64) * 0.5).to(dtype)


def randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class RowsKV(DenseKV):
    """Self-attention K/V of a packed call whose rows each own a DenseKV of one row (as the engine's pages)."""

    def __init__(self, rows: list[DenseKV]) -> None:
        self.rows = rows
        self.spans: list[tuple[int, int]] = []

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, raw_q: Tensor | None) -> Tensor:
        out = []
        for kv, (a, b) in zip(self.rows, self.spans):
            kv.begin([b - a])
            out.append(kv.attend(layer, q[a:b], k[a:b], v[a:b], None))
        return torch.cat(out)


# --------------------------------------------------------------------------------------------------------------
# plain single-row reference, BLC layout (batch 1), written from the facts, reading weights by official names

EPS = 1e-6


def ref_ln(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + EPS)
    return y if weight is None else y * weight + bias


def ref_gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_silu(x: Tensor) -> Tensor:
    return x / (1 + torch.exp(-x))


def ref_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """q [H, Lq, d], k/v [H, Lk, d]; every query sees every key."""
    logits = q @ k.transpose(-1, -2) * scale
    w = torch.exp(logits - logits.amax(-1, keepdim=True))
    return (w / w.sum(-1, keepdim=True)) @ v


def ref_heads(x: Tensor, heads: int) -> Tensor:
    """[1, L, C] -> [H, L, C/H]"""
    return x[0].view(x.shape[1], heads, -1).transpose(0, 1)


def ref_merge(x: Tensor) -> Tensor:
    """[H, L, d] -> [1, L, H*d]"""
    return x.transpose(0, 1).reshape(1, x.shape[1], -1)


def ref_positions(hw: tuple[int, int], grid: tuple[int, int]) -> list[tuple[int, int]]:
    (h, w), (gh, gw) = hw, grid
    return [(round(Fraction(i * gh, h)), round(Fraction(j * gw, w))) for i in range(h) for j in range(w)]


def ref_rope(x: Tensor, positions: list[tuple[int, int]], base: float = 10000.0) -> Tensor:
    """x [H, L, d]: pair m = (x[2m], x[2m+1]); pairs m < d/4 turn with the row, the others with the column."""
    d = x.shape[-1]
    quarter = d // 4
    pos = torch.tensor(positions, dtype=torch.float64)
    out = x.clone()
    for m in range(d // 2):
        theta = pos[:, 0 if m < quarter else 1] * base ** (-2 * (m % quarter) / (d // 2))
        c, s = torch.cos(theta), torch.sin(theta)
        a, b = x[..., 2 * m], x[..., 2 * m + 1]
        out[..., 2 * m], out[..., 2 * m + 1] = a * c - b * s, a * s + b * c
    return out


def ref_text(P: dict[str, Tensor], feats: Tensor) -> tuple[Tensor, Tensor]:
    """One row's T5 features [Lt, Ct5] -> (pooled cond [1, 1, C], cross-attention memory [1, Lt, C])."""
    C = CFG.width
    t = feats * torch.rsqrt((feats**2).mean(-1, keepdim=True) + EPS) * P["text_norm.weight"]
    w_kv = P["text_proj_for_sos.ca.mat_kv.weight"]
    q = P["text_proj_for_sos.ca.mat_q"][0]  # [Hp, dp], one learned query per head
    heads, dp = q.shape
    assert heads == CFG.text_dim // 16 and dp == C // heads  # test-small: pool head size 16 over the T5 width
    k = (t @ w_kv[:C].T)[None]
    v = (t @ w_kv[C:].T + P["text_proj_for_sos.ca.v_bias"])[None]
    o = ref_merge(ref_attention(q[:, None, :], ref_heads(k, heads), ref_heads(v, heads), 1 / math.sqrt(dp)))
    cond = o @ P["text_proj_for_sos.ca.proj.weight"].T + P["text_proj_for_sos.ca.proj.bias"]
    hidden = ref_gelu_tanh(t @ P["text_proj_for_ca.0.weight"].T + P["text_proj_for_ca.0.bias"])
    memory = hidden @ P["text_proj_for_ca.2.weight"].T + P["text_proj_for_ca.2.bias"]
    return cond, memory[None]


def ref_block(P: dict[str, Tensor], pre: str, x: Tensor, cond: Tensor, memory: Tensor,
              positions: list[tuple[int, int]], history: dict[str, Tensor]) -> Tensor:
    """x [1, L, C] -> [1, L, C]; `history` holds this row's K/V of earlier scales ([H, L_hist, d]) and grows."""
    C, H = CFG.width, CFG.num_heads
    d = C // H
    gss = (ref_silu(cond) @ P["shared_ada_lin.1.weight"].T + P["shared_ada_lin.1.bias"]).view(1, 1, 6, C)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (P[pre + "ada_gss"] + gss).unbind(2)

    # self-attention: cosine attention with 2D RoPE, block-causal over scales through the history
    h = ref_ln(x) * (1 + scale1) + shift1
    w_qkv = P[pre + "sa.mat_qkv.weight"]
    q = ref_heads(h @ w_qkv[:C].T + P[pre + "sa.q_bias"], H)
    k = ref_heads(h @ w_qkv[C : 2 * C].T, H)  # no K bias
    v = ref_heads(h @ w_qkv[2 * C :].T + P[pre + "sa.v_bias"], H)
    log_scale = P[pre + "sa.scale_mul_1H11"].view(H, 1, 1)
    q = q / q.norm(dim=-1, keepdim=True) * torch.exp(torch.clamp(log_scale, max=math.log(100)))
    k = k / k.norm(dim=-1, keepdim=True)
    q, k = ref_rope(q, positions), ref_rope(k, positions)
    history["k"] = k if "k" not in history else torch.cat([history["k"], k], dim=1)
    history["v"] = v if "v" not in history else torch.cat([history["v"], v], dim=1)
    o = ref_merge(ref_attention(q, history["k"], history["v"], 1.0))
    x = x + (o @ P[pre + "sa.proj.weight"].T + P[pre + "sa.proj.bias"]) * gamma1

    # cross-attention to the text memory: affine LayerNorm, no gate, scale 1/sqrt(d)
    y = ref_ln(x, P[pre + "ca_norm.weight"], P[pre + "ca_norm.bias"])
    w_kv = P[pre + "ca.mat_kv.weight"]
    qc = ref_heads(y @ P[pre + "ca.mat_q.weight"].T + P[pre + "ca.mat_q.bias"], H)
    kc = ref_heads(memory @ w_kv[:C].T, H)
    vc = ref_heads(memory @ w_kv[C:].T + P[pre + "ca.v_bias"], H)
    oc = ref_merge(ref_attention(qc, kc, vc, 1 / math.sqrt(d)))
    x = x + oc @ P[pre + "ca.proj.weight"].T + P[pre + "ca.proj.bias"]

    # FFN
    h = ref_ln(x) * (1 + scale2) + shift2
    f = ref_gelu_tanh(h @ P[pre + "ffn.fc1.weight"].T + P[pre + "ffn.fc1.bias"])
    return x + (f @ P[pre + "ffn.fc2.weight"].T + P[pre + "ffn.fc2.bias"]) * gamma2


def ref_block_prefixes() -> list[str]:
    n = CFG.depth // CFG.block_chunks
    return [f"block_chunks.{c}.module.{j}." for c in range(CFG.block_chunks) for j in range(n)]


def ref_forward(P: dict[str, Tensor], feats: Tensor, scale: int, hw: tuple[int, int], grid: tuple[int, int],
                tokens: Tensor | None, histories: list[dict[str, Tensor]]) -> Tensor:
    """One row, one scale: bit logits [1, h*w, 2*d_vae]."""
    cond, memory = ref_text(P, feats)
    if scale == 0:
        x = cond + P["pos_start"]
    else:
        x = (tokens @ P["word_embed.weight"].T + P["word_embed.bias"])[None]
    x = x + P["lvl_embed.weight"][scale]  # before the first block only
    positions = ref_positions(hw, grid)
    for pre, history in zip(ref_block_prefixes(), histories):
        x = ref_block(P, pre, x, cond, memory, positions, history)
    ss = (ref_silu(cond) @ P["head_nm.ada_lin.1.weight"].T + P["head_nm.ada_lin.1.bias"]).view(1, 1, 2, -1)
    scale_, shift = ss.unbind(2)
    return (ref_ln(x) * (1 + scale_) + shift) @ P["head.weight"].T + P["head.bias"]


# --------------------------------------------------------------------------------------------------------------
# 1. the official key layout


def official_parameter_names() -> list[str]:
    """Parameters of the official Infinity (infinity/models/infinity.py + basic.py, text-to-image, shared_aln,
    cos_attn, customized_flash_attn=False, head_aln, cross_attn_layer_scale<0, nm0=False, head_depth=1) with
    depth 4 in 2 block chunks, in the official state_dict order (own parameters, then children in order)."""
    return [
        "cfg_uncond",
        "pos_start",
        "text_norm.weight",
        "text_proj_for_sos.ca.mat_q",
        "text_proj_for_sos.ca.v_bias",
        "text_proj_for_sos.ca.mat_kv.weight",
        "text_proj_for_sos.ca.proj.weight",
        "text_proj_for_sos.ca.proj.bias",
        "text_proj_for_ca.0.weight",
        "text_proj_for_ca.0.bias",
        "text_proj_for_ca.2.weight",
        "text_proj_for_ca.2.bias",
        "lvl_embed.weight",
        "word_embed.weight",
        "word_embed.bias",
        "shared_ada_lin.1.weight",
        "shared_ada_lin.1.bias",
        "head_nm.ada_lin.1.weight",
        "head_nm.ada_lin.1.bias",
        "head.weight",
        "head.bias",
        "block_chunks.0.module.0.ada_gss",
        "block_chunks.0.module.0.sa.scale_mul_1H11",
        "block_chunks.0.module.0.sa.q_bias",
        "block_chunks.0.module.0.sa.v_bias",
        "block_chunks.0.module.0.sa.mat_qkv.weight",
        "block_chunks.0.module.0.sa.proj.weight",
        "block_chunks.0.module.0.sa.proj.bias",
        "block_chunks.0.module.0.ca.v_bias",
        "block_chunks.0.module.0.ca.mat_q.weight",
        "block_chunks.0.module.0.ca.mat_q.bias",
        "block_chunks.0.module.0.ca.mat_kv.weight",
        "block_chunks.0.module.0.ca.proj.weight",
        "block_chunks.0.module.0.ca.proj.bias",
        "block_chunks.0.module.0.ffn.fc1.weight",
        "block_chunks.0.module.0.ffn.fc1.bias",
        "block_chunks.0.module.0.ffn.fc2.weight",
        "block_chunks.0.module.0.ffn.fc2.bias",
        "block_chunks.0.module.0.ca_norm.weight",
        "block_chunks.0.module.0.ca_norm.bias",
        "block_chunks.0.module.1.ada_gss",
        "block_chunks.0.module.1.sa.scale_mul_1H11",
        "block_chunks.0.module.1.sa.q_bias",
        "block_chunks.0.module.1.sa.v_bias",
        "block_chunks.0.module.1.sa.mat_qkv.weight",
        "block_chunks.0.module.1.sa.proj.weight",
        "block_chunks.0.module.1.sa.proj.bias",
        "block_chunks.0.module.1.ca.v_bias",
        "block_chunks.0.module.1.ca.mat_q.weight",
        "block_chunks.0.module.1.ca.mat_q.bias",
        "block_chunks.0.module.1.ca.mat_kv.weight",
        "block_chunks.0.module.1.ca.proj.weight",
        "block_chunks.0.module.1.ca.proj.bias",
        "block_chunks.0.module.1.ffn.fc1.weight",
        "block_chunks.0.module.1.ffn.fc1.bias",
        "block_chunks.0.module.1.ffn.fc2.weight",
        "block_chunks.0.module.1.ffn.fc2.bias",
        "block_chunks.0.module.1.ca_norm.weight",
        "block_chunks.0.module.1.ca_norm.bias",
        "block_chunks.1.module.0.ada_gss",
        "block_chunks.1.module.0.sa.scale_mul_1H11",
        "block_chunks.1.module.0.sa.q_bias",
        "block_chunks.1.module.0.sa.v_bias",
        "block_chunks.1.module.0.sa.mat_qkv.weight",
        "block_chunks.1.module.0.sa.proj.weight",
        "block_chunks.1.module.0.sa.proj.bias",
        "block_chunks.1.module.0.ca.v_bias",
        "block_chunks.1.module.0.ca.mat_q.weight",
        "block_chunks.1.module.0.ca.mat_q.bias",
        "block_chunks.1.module.0.ca.mat_kv.weight",
        "block_chunks.1.module.0.ca.proj.weight",
        "block_chunks.1.module.0.ca.proj.bias",
        "block_chunks.1.module.0.ffn.fc1.weight",
        "block_chunks.1.module.0.ffn.fc1.bias",
        "block_chunks.1.module.0.ffn.fc2.weight",
        "block_chunks.1.module.0.ffn.fc2.bias",
        "block_chunks.1.module.0.ca_norm.weight",
        "block_chunks.1.module.0.ca_norm.bias",
        "block_chunks.1.module.1.ada_gss",
        "block_chunks.1.module.1.sa.scale_mul_1H11",
        "block_chunks.1.module.1.sa.q_bias",
        "block_chunks.1.module.1.sa.v_bias",
        "block_chunks.1.module.1.sa.mat_qkv.weight",
        "block_chunks.1.module.1.sa.proj.weight",
        "block_chunks.1.module.1.sa.proj.bias",
        "block_chunks.1.module.1.ca.v_bias",
        "block_chunks.1.module.1.ca.mat_q.weight",
        "block_chunks.1.module.1.ca.mat_q.bias",
        "block_chunks.1.module.1.ca.mat_kv.weight",
        "block_chunks.1.module.1.ca.proj.weight",
        "block_chunks.1.module.1.ca.proj.bias",
        "block_chunks.1.module.1.ffn.fc1.weight",
        "block_chunks.1.module.1.ffn.fc1.bias",
        "block_chunks.1.module.1.ffn.fc2.weight",
        "block_chunks.1.module.1.ffn.fc2.bias",
        "block_chunks.1.module.1.ca_norm.weight",
        "block_chunks.1.module.1.ca_norm.bias",
    ]


# Buffers the official module registers (CrossAttention/SelfAttention zero_k_bias); older files may also
# carry lvl_1L, attn_bias_for_masking, Infinity_visible_kvlen, Infinity_invisible_qlen.
OFFICIAL_BUFFERS = ["text_proj_for_sos.ca.zero_k_bias"] + [
    f"block_chunks.{c}.module.{j}.{m}.zero_k_bias" for c in range(2) for j in range(2) for m in ("sa", "ca")
]
OFFICIAL_EXTRAS = ["lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen"]


def test_parameter_names_equal_the_official_tree() -> None:
    with torch.device("meta"):
        model = Infinity(CFG)
    names = [n for n, _ in model.named_parameters()]
    official = official_parameter_names()
    assert len(official) == len(set(official)) == 21 + 4 * 19
    assert sorted(names) == sorted(official)
    assert sorted(model.state_dict()) == sorted(official)  # and no buffers of our own
    assert list(model.buffers()) == []
    patterns = [re.compile(p) for p in INFINITY_IGNORED]
    for key in OFFICIAL_BUFFERS + OFFICIAL_EXTRAS:
        assert any(p.search(key) for p in patterns), key
    for key in official:
        assert not any(p.search(key) for p in patterns), key


def test_parameter_shapes_follow_the_official_formulas() -> None:
    with torch.device("meta"):
        model = Infinity(CFG)
    C, H, Ct5, d_vae = CFG.width, CFG.num_heads, CFG.text_dim, CFG.d_vae
    pool_heads = Ct5 // CFG.pool_head_dim
    top = {
        "cfg_uncond": (CFG.text_maxlen, Ct5),
        "pos_start": (1, 1, C),
        "text_norm.weight": (Ct5,),
        "text_proj_for_sos.ca.mat_q": (1, pool_heads, C // pool_heads),
        "text_proj_for_sos.ca.v_bias": (C,),
        "text_proj_for_sos.ca.mat_kv.weight": (2 * C, Ct5),
        "text_proj_for_sos.ca.proj.weight": (C, C),
        "text_proj_for_ca.0.weight": (C, Ct5),
        "text_proj_for_ca.2.weight": (C, C),
        "lvl_embed.weight": (15, C),
        "word_embed.weight": (C, d_vae),
        "shared_ada_lin.1.weight": (6 * C, C),
        "shared_ada_lin.1.bias": (6 * C,),
        "head_nm.ada_lin.1.weight": (2 * C, C),
        "head.weight": (2 * d_vae, C),
        "head.bias": (2 * d_vae,),
    }
    block = {
        "ada_gss": (1, 1, 6, C),
        "sa.scale_mul_1H11": (1, H, 1, 1),
        "sa.q_bias": (C,),
        "sa.v_bias": (C,),
        "sa.mat_qkv.weight": (3 * C, C),
        "sa.proj.weight": (C, C),
        "ca.mat_q.weight": (C, C),
        "ca.mat_q.bias": (C,),
        "ca.mat_kv.weight": (2 * C, C),
        "ca.v_bias": (C,),
        "ffn.fc1.weight": (4 * C, C),
        "ffn.fc2.weight": (C, 4 * C),
        "ca_norm.weight": (C,),
        "ca_norm.bias": (C,),
    }
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, shape in top.items():
        assert shapes[name] == shape, name
    for pre in ref_block_prefixes():
        for name, shape in block.items():
            assert shapes[pre + name] == shape, pre + name


# --------------------------------------------------------------------------------------------------------------
# 2. checkpoints in the official layout


def _logits_over_scales(model: Infinity, feats: Tensor, lens: list[int], schedule, scales: int) -> list[Tensor]:
    text = model.encode_text(feats, lens)
    rows = len(lens)
    kv = DenseKV(rows, CFG.depth)
    out = []
    for s, hw in enumerate(schedule.scales[:scales]):
        n = hw[0] * hw[1]
        x = model.start_tokens(text.cond) if s == 0 else model.embed_tokens(randn(50 + s, rows * n, CFG.d_vae))
        kv.begin([n] * rows)
        out.append(model(x, make_batch(model, text, [(s, hw, schedule.rope_grid)] * rows), kv))
    return out


def _official_file(model: Infinity, path, extra_uncond_rows: int = 0) -> dict[str, Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in OFFICIAL_BUFFERS:
        state[key] = torch.zeros(CFG.width, dtype=torch.float64)
    state["lvl_1L"] = torch.arange(10).view(1, 10).float()
    if extra_uncond_rows:
        state["cfg_uncond"] = torch.cat([state["cfg_uncond"], randn(3, extra_uncond_rows, CFG.text_dim)])
    torch.save(state, path)
    return state


def test_official_checkpoint_loads_and_gives_the_same_logits(tmp_path) -> None:
    source = random_model(CFG, 0)
    _official_file(source, tmp_path / "infinity_tiny.pth", extra_uncond_rows=16)
    loaded = load_transformer_state_dict(tmp_path / "infinity_tiny.pth")
    assert "block_chunks.0.module.0.sa.zero_k_bias" in loaded and "lvl_1L" in loaded
    target = random_model(CFG, 1)
    load_into(target, loaded)
    for (name, a), (_, b) in zip(source.named_parameters(), target.named_parameters()):
        assert torch.equal(a, b), name

    feats, lens = torch.cat([text_features(0, 7), text_features(1, 4)]), [7, 4]
    schedule = parse_size("1:2@256")
    want = _logits_over_scales(source, feats, lens, schedule, 4)
    got = _logits_over_scales(target, feats, lens, schedule, 4)
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_checkpoint_missing_key_or_wrong_shape_names_it(tmp_path) -> None:
    source = random_model(CFG, 0)
    state = _official_file(source, tmp_path / "a.pth")
    target = random_model(CFG, 1)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    missing = dict(state)
    del missing["block_chunks.1.module.0.ca.mat_q.bias"]
    with pytest.raises(ValueError, match=re.escape("block_chunks.1.module.0.ca.mat_q.bias")):
        load_into(target, missing)

    misshaped = dict(state)
    misshaped["head.weight"] = torch.zeros(2 * CFG.d_vae, CFG.width + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape("head.weight")):
        load_into(target, misshaped)

    misshaped = dict(state)  # the per-head scale in the customized-flash layout [1, 1, H, 1]
    misshaped["block_chunks.0.module.1.sa.scale_mul_1H11"] = torch.zeros(1, 1, CFG.num_heads, 1)
    with pytest.raises(ValueError, match=re.escape("block_chunks.0.module.1.sa.scale_mul_1H11")):
        load_into(target, misshaped)

    for key, value in target.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key


# --------------------------------------------------------------------------------------------------------------
# 3. the math against the plain reference


SCHEDULE = parse_size("1:2@512")  # non-square: rows and columns placed on the 90 x 45 grid differently


def test_text_memory_against_reference() -> None:
    model = random_model(CFG, 2)
    P = dict(model.named_parameters())
    lens = [7, 4, 11]
    feats = [text_features(i, n) for i, n in enumerate(lens)]
    text = model.encode_text(torch.cat(feats), lens)
    starts = [0, 7, 11, 22]
    for r, f in enumerate(feats):
        cond, memory = ref_text(P, f)
        torch.testing.assert_close(text.cond[r], cond[0, 0], **TOL)
        gss = ref_silu(cond) @ P["shared_ada_lin.1.weight"].T + P["shared_ada_lin.1.bias"]
        torch.testing.assert_close(text.gss[r], gss.view(6, -1), **TOL)
        for layer, pre in enumerate(ref_block_prefixes()):
            w_kv = P[pre + "ca.mat_kv.weight"]
            k = (memory[0] @ w_kv[: CFG.width].T).view(lens[r], CFG.num_heads, -1)
            v = (memory[0] @ w_kv[CFG.width :].T + P[pre + "ca.v_bias"]).view(lens[r], CFG.num_heads, -1)
            torch.testing.assert_close(text.ca_kv[layer, 0, starts[r] : starts[r + 1]], k, **TOL)
            torch.testing.assert_close(text.ca_kv[layer, 1, starts[r] : starts[r + 1]], v, **TOL)


@pytest.mark.parametrize("layer", [0, 3])
def test_one_block_against_reference_over_scales(layer: int) -> None:
    model = random_model(CFG, 3)
    P = dict(model.named_parameters())
    pre = ref_block_prefixes()[layer]
    block = model.blocks[layer]
    lens = [7, 4]
    feats = [text_features(10 + i, n) for i, n in enumerate(lens)]
    text = model.encode_text(torch.cat(feats), lens)
    refs = [ref_text(P, f) for f in feats]
    kv = DenseKV(2, CFG.depth)
    histories: list[dict[str, Tensor]] = [{}, {}]
    for s, hw in enumerate(SCHEDULE.scales[:5]):
        n = hw[0] * hw[1]
        x = randn(100 + s, 2 * n, CFG.width) * 2 + 0.5
        kv.begin([n, n])
        got = block(x, make_batch(model, text, [(s, hw, SCHEDULE.rope_grid)] * 2), kv, layer)
        for r, (cond, memory) in enumerate(refs):
            want = ref_block(P, pre, x[r * n : (r + 1) * n][None], cond, memory,
                             ref_positions(hw, SCHEDULE.rope_grid), histories[r])
            torch.testing.assert_close(got[r * n : (r + 1) * n], want[0], **TOL)
        assert kv.k[layer][0].shape[0] == sum(h * w for h, w in SCHEDULE.scales[: s + 1])


def test_full_forward_against_reference_over_scales() -> None:
    model = random_model(CFG, 4)
    P = dict(model.named_parameters())
    lens = [9, 5]
    feats = [text_features(20 + i, n) for i, n in enumerate(lens)]
    text = model.encode_text(torch.cat(feats), lens)
    kv = DenseKV(2, CFG.depth)
    histories = [[{} for _ in range(CFG.depth)] for _ in lens]
    for s, hw in enumerate(SCHEDULE.scales[:5]):
        n = hw[0] * hw[1]
        tokens = randn(200 + s, n, CFG.d_vae) * 0.25
        x = model.start_tokens(text.cond) if s == 0 else model.embed_tokens(tokens).repeat(2, 1)
        kv.begin([n, n])
        got = model(x, make_batch(model, text, [(s, hw, SCHEDULE.rope_grid)] * 2), kv)
        assert got.shape == (2 * n, 2 * CFG.d_vae) and got.dtype == torch.float64
        for r, f in enumerate(feats):
            want = ref_forward(P, f, s, hw, SCHEDULE.rope_grid, tokens, histories[r])
            torch.testing.assert_close(got[r * n : (r + 1) * n], want[0], **TOL)


# --------------------------------------------------------------------------------------------------------------
# 4. packed rows at different scales, grids and text lengths == each row alone


def test_packed_rows_equal_rows_alone() -> None:
    model = random_model(CFG, 5)
    rows = [  # (text length, schedule, scale of the packed call)
        (5, parse_size("1:2@512"), 3),
        (9, parse_size("1024x1024"), 0),
        (3, parse_size("2:1@256"), 4),
        (12, parse_size("1024x1024"), 2),
    ]
    feats = [text_features(30 + i, n) for i, (n, _, _) in enumerate(rows)]
    lens = [n for n, _, _ in rows]
    alone_text = [model.encode_text(f, [n]) for f, n in zip(feats, lens)]

    # each row's history, built scale by scale on its own
    alone_kv, inputs = [], []
    for r, ((_, schedule, scale), text) in enumerate(zip(rows, alone_text)):
        kv = DenseKV(1, CFG.depth)
        for s in range(scale + 1):
            hw = schedule.scales[s]
            x = model.start_tokens(text.cond) if s == 0 else model.embed_tokens(
                randn(300 + 10 * r + s, hw[0] * hw[1], CFG.d_vae))
            if s == scale:
                inputs.append(x)
                break
            kv.begin([hw[0] * hw[1]])
            model(x, make_batch(model, text, [(s, hw, schedule.rope_grid)]), kv)
        alone_kv.append(kv)
    histories = [copy.deepcopy(kv) for kv in alone_kv]
    packed_kv = RowsKV(copy.deepcopy(histories))

    # rows alone at their scale
    want = []
    for (_, schedule, scale), text, kv, x in zip(rows, alone_text, alone_kv, inputs):
        hw = schedule.scales[scale]
        kv.begin([hw[0] * hw[1]])
        want.append(model(x, make_batch(model, text, [(scale, hw, schedule.rope_grid)]), kv))

    # one packed call: text encoded together, tokens of all rows concatenated
    text = model.encode_text(torch.cat(feats), lens)
    for part, r in ((text.rows(r, r + 1), r) for r in range(len(rows))):
        torch.testing.assert_close(part.cond, alone_text[r].cond, **TOL)
        torch.testing.assert_close(part.gss, alone_text[r].gss, **TOL)
        torch.testing.assert_close(part.ca_kv, alone_text[r].ca_kv, **TOL)
    row_scales = [(scale, schedule.scales[scale], schedule.rope_grid) for _, schedule, scale in rows]
    packed_kv.begin([hw[0] * hw[1] for _, hw, _ in row_scales])
    x = torch.cat([model.start_tokens(text.cond[1:2]) if r == 1 else inputs[r] for r in range(len(rows))])
    got = model(x, make_batch(model, text, row_scales), packed_kv)
    torch.testing.assert_close(got, torch.cat(want), **TOL)
    for layer in (0, CFG.depth - 1):
        for a, b in zip(packed_kv.rows, alone_kv):
            torch.testing.assert_close(a.k[layer][0], b.k[layer][0], **TOL)
            torch.testing.assert_close(a.v[layer][0], b.v[layer][0], **TOL)

    # the rows' own TextMemory put together (as the engine does) gives the same packed logits
    rebuilt = TextMemory.concat(alone_text)
    assert rebuilt.text_lens == lens
    again = RowsKV(copy.deepcopy(histories))
    again.begin([hw[0] * hw[1] for _, hw, _ in row_scales])
    torch.testing.assert_close(model(x, make_batch(model, rebuilt, row_scales), again), got, **TOL)


# --------------------------------------------------------------------------------------------------------------
# 5. test-small end-to-end dense generation


@pytest.fixture(scope="module")
def small():
    return load_model("test-small", device=torch.device("cpu"), dtype=torch.float32)


def _generate(small, seed: int, negative: str | None = None, cfg: float = 3.0):
    params = ScaleSampling(cfg=cfg, tau=1.0, top_p=0.97)
    return generate_dense(small.transformer, small.vae, small.text_encoder, "a red fox in the snow",
                          parse_size("256x256"), params, seed, negative)


def test_dense_generation_is_deterministic_per_seed(small) -> None:
    image, bits = _generate(small, 7)
    assert image.shape == (256, 256, 3) and image.dtype == torch.uint8
    assert len(bits) == 7 and bits[-1].shape == (16 * 16, CFG.d_vae) and bits[0].dtype == torch.uint8
    image2, bits2 = _generate(small, 7)
    assert torch.equal(image, image2)
    assert all(torch.equal(a, b) for a, b in zip(bits, bits2))
    other, other_bits = _generate(small, 8)
    assert not all(torch.equal(a, b) for a, b in zip(bits, other_bits))
    assert not torch.equal(image, other)


def test_negative_prompt_changes_the_image(small) -> None:
    image, bits = _generate(small, 7)
    neg_image, neg_bits = _generate(small, 7, negative="blurry, low quality")
    assert not all(torch.equal(a, b) for a, b in zip(bits, neg_bits))
    assert not torch.equal(image, neg_image)
