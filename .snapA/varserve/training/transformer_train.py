"""Transformer training: teacher forcing over all scales at once, on the weights of varserve's Infinity modules.

`forward_train` is the batched twin of the inference forward (`Infinity.forward` over the scales of a request,
with `encode_text`, `start_tokens` and `embed_tokens`): the same parameters, the same formulas, the same dtype steps,
but every scale of B images in one call, [B, L, C] with L the image's tokens, and self-attention block-causal over
scales (queries of scale s see the keys of scales 0..s, and no mask inside a scale), done as one attention call per
scale over the key prefix. Text is padded to a fixed length with a key mask. tests/test_training.py checks, in
float64, that its logits equal those of the unchanged inference code fed the same teacher-forced inputs.

Targets are the bits of every scale from `vae_train.multiscale_quantize`, inputs the `next_input` of the running sum
of codes (exactly the generation loop's); the loss is a 2-way cross-entropy per bit. CFG: a prompt is replaced by
the learned `cfg_uncond` (cut to its length, as inference does) with probability `cfg_drop`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varserve.models.config import ModelConfig
from varserve.models.infinity import MAX_LOG_SCALE, Infinity, rope_angles
from varserve.models.text_encoder import TextEncoder, Tokenizer
from varserve.models.vae import BSQVAE, Hw
from varserve.training.common import Budget, autocast, log, lr_at, param_count
from varserve.training.data import Scenes, render
from varserve.training.vae_train import Encoder, encode, multiscale_quantize

# ---- the training forward ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Token layout of one image: scales back to back, scale 0 first."""

    scales: tuple[Hw, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    level: Tensor  # [L] long, scale index of every token
    rope_cos: Tensor  # [L, head_dim/2]
    rope_sin: Tensor

    @property
    def total(self) -> int:
        return self.offsets[-1] + self.lengths[-1]


def make_layout(cfg: ModelConfig, scales: tuple[Hw, ...] | list[Hw], rope_grid: Hw, device: torch.device | str,
                dtype: torch.dtype = torch.float32) -> Layout:
    """dtype: the residual dtype (float32; float64 in exactness tests), as `make_batch` uploads the angles."""
    scales = tuple(tuple(hw) for hw in scales)
    lengths = tuple(h * w for h, w in scales)
    offsets = tuple(int(x) for x in np.cumsum((0,) + lengths[:-1]))
    angles = torch.cat([rope_angles(hw, tuple(rope_grid), cfg.head_dim, cfg.rope_base) for hw in scales])
    level = torch.repeat_interleave(torch.arange(len(scales)), torch.tensor(lengths))
    return Layout(scales, offsets, lengths, level.to(device), angles.cos().to(device, dtype),
                  angles.sin().to(device, dtype))


@dataclass
class TextCond:
    """What a batch of B prompts gives the transformer (padded to Lt tokens, `mask` marks the real ones)."""

    cond: Tensor  # [B, C] pooled text (start token, AdaLN condition), residual dtype
    gss: Tensor  # [B, 6, C]
    head_ss: Tensor  # [B, 2, C]
    memory: Tensor  # [B, Lt, C] cross-attention memory
    mask: Tensor  # [B, Lt] bool


def _acc(model: Infinity) -> torch.dtype:
    return model.residual_dtype


def text_condition(model: Infinity, features: Tensor, mask: Tensor) -> TextCond:
    """Padded T5 features [B, Lt, text_dim] -> TextCond; the twin of `Infinity.encode_text` (differentiable)."""
    acc = _acc(model)
    text = model.text_norm(features.to(acc)).to(model.text_proj_for_ca[0].weight.dtype)
    pool = model.text_proj_for_sos.ca
    B, Lt, _ = text.shape
    kv = F.linear(text, pool.mat_kv.weight).view(B, Lt, 2, pool.heads, pool.head_dim)
    k, v = kv[:, :, 0], kv[:, :, 1] + pool.v_bias.view(pool.heads, pool.head_dim)
    q = pool.mat_q.to(text.dtype).expand(B, -1, -1)[:, :, None, :]  # [B, Hp, 1, dp]
    out = F.scaled_dot_product_attention(
        q, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype), attn_mask=mask[:, None, None, :],
        scale=1 / math.sqrt(pool.head_dim),
    )
    cond = pool.proj(out.reshape(B, -1)).to(acc)
    memory = model.text_proj_for_ca(text)
    with torch.autocast(features.device.type, enabled=False):
        lin, head = model.shared_ada_lin[1], model.head_nm.ada_lin[1]
        gss = F.linear(F.silu(cond), lin.weight.to(acc), lin.bias.to(acc)).view(B, 6, -1)
        head_ss = F.linear(F.silu(cond), head.weight.to(acc), head.bias.to(acc)).view(B, 2, -1)
    return TextCond(cond, gss, head_ss, memory, mask)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent (even, odd) pairs of x [B, L, H, d] by per-token angles [L, d/2]."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def _modulate(x: Tensor, scale: Tensor, shift: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...],
                           scale: float = 1.0) -> Tensor:
    """q, k, v [B, H, L, d]: the queries of each scale attend to the keys of that scale and all before it."""
    outs = []
    for off, n in zip(offsets, lengths):
        end = off + n
        outs.append(F.scaled_dot_product_attention(q[:, :, off:end], k[:, :, :end], v[:, :, :end], scale=scale))
    return torch.cat(outs, dim=2)


def block_params(block) -> dict[str, Tensor]:
    """A block's parameters by role (what `block_math` reads)."""
    sa, ca, ffn = block.sa, block.ca, block.ffn
    return {
        "ada_gss": block.ada_gss, "qkv": sa.mat_qkv.weight, "q_bias": sa.q_bias, "v_bias": sa.v_bias,
        "log_scale": sa.scale_mul_1H11, "proj_w": sa.proj.weight, "proj_b": sa.proj.bias,
        "ca_q_w": ca.mat_q.weight, "ca_q_b": ca.mat_q.bias, "ca_kv": ca.mat_kv.weight, "ca_v_bias": ca.v_bias,
        "ca_proj_w": ca.proj.weight, "ca_proj_b": ca.proj.bias, "ca_norm_w": block.ca_norm.weight,
        "ca_norm_b": block.ca_norm.bias, "fc1_w": ffn.fc1.weight, "fc1_b": ffn.fc1.bias, "fc2_w": ffn.fc2.weight,
        "fc2_b": ffn.fc2.bias,
    }


def block_math(x: Tensor, p: dict[str, Tensor], gss: Tensor, memory: Tensor, mask: Tensor, rope_cos: Tensor,
               rope_sin: Tensor, offsets: tuple[int, ...], lengths: tuple[int, ...], heads: int, eps: float,
               ca_eps: float) -> Tensor:
    """The twin of `Block.forward` on [B, L, C], every scale at once. Tensors and constants only, so that one
    torch.compile graph serves every block."""
    B, L, C = x.shape
    d = C // heads
    dtype = p["proj_w"].dtype
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (p["ada_gss"][0, 0].to(x.dtype) + gss).unbind(1)

    # self-attention: cosine attention, 2D RoPE, block-causal over scales
    h = _modulate(x, scale1, shift1, eps).to(dtype)
    qkv = F.linear(h, p["qkv"]).view(B, L, 3, heads, d)
    q = qkv[:, :, 0] + p["q_bias"].view(heads, d)
    v = qkv[:, :, 2] + p["v_bias"].view(heads, d)
    q_scale = p["log_scale"].view(heads, 1).clamp_max(MAX_LOG_SCALE).to(acc).exp()
    q = _apply_rope(F.normalize(q.to(acc), dim=-1) * q_scale, rope_cos.to(acc), rope_sin.to(acc))
    k = _apply_rope(F.normalize(qkv[:, :, 1].to(acc), dim=-1), rope_cos.to(acc), rope_sin.to(acc))
    # Inference casts q and k to the weights' dtype; under autocast SDPA runs in bf16 as well.
    att = block_causal_attention(q.to(v.dtype).transpose(1, 2), k.to(v.dtype).transpose(1, 2), v.transpose(1, 2),
                                 offsets, lengths)
    att = F.linear(att.transpose(1, 2).reshape(B, L, C), p["proj_w"], p["proj_b"])
    x = x + att.to(x.dtype) * gamma1[:, None]

    # cross-attention to the padded text memory (affine LayerNorm on the residual, no gate)
    h = F.layer_norm(x, (C,), p["ca_norm_w"].to(x.dtype), p["ca_norm_b"].to(x.dtype), ca_eps).to(dtype)
    qc = F.linear(h, p["ca_q_w"], p["ca_q_b"]).view(B, L, heads, d)
    Lt = memory.shape[1]
    kv = F.linear(memory, p["ca_kv"]).view(B, Lt, 2, heads, d)
    kc, vc = kv[:, :, 0], kv[:, :, 1] + p["ca_v_bias"].view(heads, d)
    att = F.scaled_dot_product_attention(qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                         attn_mask=mask[:, None, None, :], scale=1.0 / math.sqrt(d))
    x = x + F.linear(att.transpose(1, 2).reshape(B, L, C), p["ca_proj_w"], p["ca_proj_b"]).to(x.dtype)

    # FFN
    h = _modulate(x, scale2, shift2, eps).to(dtype)
    f = F.linear(F.gelu(F.linear(h, p["fc1_w"], p["fc1_b"]), approximate="tanh"), p["fc2_w"], p["fc2_b"])
    return x + f.to(x.dtype) * gamma2[:, None]


def block_forward(block, x: Tensor, text: TextCond, layout: Layout, fn=block_math) -> Tensor:
    return fn(x, block_params(block), text.gss, text.memory, text.mask, layout.rope_cos, layout.rope_sin,
              layout.offsets, layout.lengths, block.sa.heads, block.eps, block.ca_norm.eps)


def forward_train(model: Infinity, layout: Layout, tokens: Tensor, features: Tensor, mask: Tensor,
                  block_fn=block_math) -> Tensor:
    """Bit logits [B, L, 2*d_vae] (float32; float64 in float64 runs) of every scale of B images.

    tokens: [B, L - 1, d_vae], the inputs of scales 1.. (`vae.next_input` of the running sums), back to back;
    features: [B, Lt, text_dim] T5 features padded to Lt (or cfg_uncond rows), mask: [B, Lt] bool;
    block_fn: `block_math` or a compiled copy of it."""
    acc = _acc(model)
    text = text_condition(model, features, mask)
    start = text.cond.to(acc) + model.pos_start[0].to(acc)  # [B, C]
    embedded = model.word_embed(tokens.to(model.word_embed.weight.dtype)).to(acc)
    x = torch.cat([start[:, None], embedded], dim=1)
    x = x + model.lvl_embed.weight.to(acc)[layout.level]
    for block in model.blocks:
        x = block_forward(block, x, text, layout, block_fn)
    with torch.autocast(x.device.type, enabled=False):
        scale, shift = text.head_ss.unbind(1)
        h = _modulate(x, scale, shift, model.cfg.norm_eps)
        return F.linear(h, model.head.weight.to(x.dtype), model.head.bias.to(x.dtype))


def scale_weights(layout: Layout, power: float, device: torch.device | str) -> Tensor:
    """Per-token loss weights [L] summing to 1: scale s gets a share proportional to (its tokens) ** power
    (power 1: every token alike; 0: every scale alike)."""
    share = torch.tensor([n**power for n in layout.lengths], dtype=torch.float64)
    share = share / share.sum()
    per_token = share / torch.tensor(layout.lengths, dtype=torch.float64)
    return per_token[layout.level.cpu()].to(device, torch.float32)


def bit_loss(logits: Tensor, bits: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """logits [B, L, 2d], bits [B, L, d] -> (weighted mean CE over bits, bit accuracy per token [B, L])."""
    B, L, two_d = logits.shape
    pairs = logits.float().view(B, L, two_d // 2, 2)
    ce = F.cross_entropy(pairs.reshape(-1, 2), bits.reshape(-1).long(), reduction="none").view(B, L, -1).mean(-1)
    loss = (ce * weights[None]).sum(-1).mean()
    acc = (pairs.argmax(-1) == bits.long()).float().mean(-1)
    return loss, acc.detach()


# ---- initialisation ---------------------------------------------------------------------------------------------


NO_DECAY = ("cfg_uncond", "pos_start", "lvl_embed", "ada_gss", "scale_mul_1H11", "mat_q", "embed.weight",
            "positions")


@torch.no_grad()
def init_weights(model: Infinity, std: float = 0.02) -> None:
    """Init for training from scratch: small normal linears, zero biases, residual projections scaled down by
    depth, AdaLN and the head zero-initialised (every block starts with its gated sublayers off, DiT-style)."""
    depth = model.cfg.depth
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if name.endswith(("sa.proj", "ca.proj", "ffn.fc2")):
                m.weight.mul_(1 / math.sqrt(2 * depth))
    nn.init.normal_(model.lvl_embed.weight, std=std)
    for lin in (model.shared_ada_lin[1], model.head_nm.ada_lin[1], model.head):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)
    for block in model.blocks:
        block.ada_gss.zero_()
        block.sa.q_bias.zero_()
        block.sa.v_bias.zero_()
        block.ca.v_bias.zero_()


def param_groups(modules: list[tuple[nn.Module, float]], weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only; (module, lr multiplier) pairs."""
    groups = []
    for module, mult in modules:
        decay, plain = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (plain if p.dim() < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
        groups += [{"params": decay, "weight_decay": weight_decay, "lr_mult": mult},
                   {"params": plain, "weight_decay": 0.0, "lr_mult": mult}]
    return [g for g in groups if g["params"]]


# ---- prompts ----------------------------------------------------------------------------------------------------


def prompt_tokens(prompts: list[str], max_length: int, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [N, max_length] (padded with <pad>) and lengths [N] (</s> included)."""
    ids = tokenizer.token_ids(prompts)
    out = np.full((len(ids), max_length), tokenizer.pad_id, np.int16)
    lengths = np.array([len(s) for s in ids], np.int64)
    if lengths.max(initial=0) > max_length:
        raise ValueError(f"a prompt is {lengths.max()} tokens long, over {max_length}")
    for i, seq in enumerate(ids):
        out[i, : len(seq)] = seq
    return out, lengths


def text_features(text_model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """T5 last hidden state [B, Lt, d_model] in float32 (padding rows are garbage; the mask hides them)."""
    return text_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()


def with_uncond(model: Infinity, features: Tensor, drop: Tensor) -> Tensor:
    """Rows of `drop` replaced by the learned unconditional text (its first Lt rows; padding stays masked)."""
    uncond = model.cfg_uncond[: features.shape[1]].to(features.dtype)
    return torch.where(drop[:, None, None], uncond[None], features)


# ---- training loop ----------------------------------------------------------------------------------------------


@dataclass
class TransformerTrainConfig:
    minutes: float = 11.0
    batch_size: int = 64
    lr: float = 1e-3
    text_lr_mult: float = 0.3  # the encoder arrives warmed up (text_train.py)
    weight_decay: float = 0.05
    warmup: float = 0.03
    grad_clip: float = 1.0
    cfg_drop: float = 0.1
    max_flip: float = 0.1  # bitwise self-correction: per image p ~ U(0, max_flip) on `flip_share` of each batch
    flip_share: float = 0.5
    scale_weight_power: float = 0.5
    train_text_encoder: bool = True
    image_size: int = 512
    compile: bool = True
    log_every: int = 50
    checkpoint_every_s: float = 150.0
    seed: int = 0


@dataclass
class TrainState:
    step: int = 0
    images: int = 0
    loss: float = float("nan")
    seconds: float = 0.0
    stopped: str = ""


def train_transformer(
    model: Infinity, text: TextEncoder, vae: BSQVAE, encoder: Encoder, scenes: Scenes, scales: tuple[Hw, ...],
    rope_grid: Hw, cfg: TransformerTrainConfig, device: torch.device, checkpoint: Path | None = None,
) -> TrainState:
    """Train `model` (and the text encoder unless frozen) for `cfg.minutes` of wall clock. Saves `checkpoint` now
    and then."""
    text_model = text.model
    model.train().requires_grad_(True)
    text_model.train().requires_grad_(cfg.train_text_encoder)
    if not cfg.train_text_encoder:
        text_model.eval()
    vae.eval().requires_grad_(False)
    encoder.eval().requires_grad_(False)
    layout = make_layout(model.cfg, scales, rope_grid, device)
    weights = scale_weights(layout, cfg.scale_weight_power, device)
    ids_np, lens_np = prompt_tokens(scenes.prompts, model.cfg.text_maxlen, text.tokenizer)
    ids_all = torch.from_numpy(ids_np.astype(np.int64)).to(device)
    lens_all = torch.from_numpy(lens_np).to(device)
    positions = torch.arange(model.cfg.text_maxlen, device=device)
    groups = param_groups([(model, 1.0)] + ([(text_model, cfg.text_lr_mult)] if cfg.train_text_encoder else []),
                          cfg.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    params = [p for g in groups for p in g["params"]]
    rng = np.random.default_rng(cfg.seed + 1)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    block_fn = block_math
    if cfg.compile and device.type == "cuda":
        block_fn = torch.compile(block_math, dynamic=False)
    log(f"transformer: {param_count(model) / 1e6:.2f} M params, text encoder {param_count(text_model) / 1e6:.2f} M "
        f"({'trained' if cfg.train_text_encoder else 'frozen'}); {layout.total} tokens/image in {len(scales)} scales; "
        f"batch {cfg.batch_size}; budget {cfg.minutes:.1f} min")
    budget = Budget(cfg.minutes)
    state = TrainState()
    last_ckpt = budget.elapsed
    ema, ema_acc = None, None
    window, skipped = (0.0, 0), 0
    while not budget.over():
        lr = lr_at(budget.fraction, cfg.lr, warmup=cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        idx = rng.integers(0, len(scenes), cfg.batch_size)
        with torch.no_grad():
            f = encode(encoder, render(scenes[idx], cfg.image_size, device), device)
            flip = torch.rand(cfg.batch_size, device=device, generator=gen) * cfg.max_flip
            flip = flip * (torch.rand(cfg.batch_size, device=device, generator=gen) < cfg.flip_share)
            q = multiscale_quantize(vae, f, scales, flip, gen)
            tokens = torch.cat(q.inputs, dim=1)
            bits = torch.cat(q.bits, dim=1)
            idx_t = torch.from_numpy(idx).to(device)
            ids, mask = ids_all[idx_t], positions[None] < lens_all[idx_t, None]
            drop = torch.rand(cfg.batch_size, device=device, generator=gen) < cfg.cfg_drop
        opt.zero_grad(set_to_none=True)
        try:
            with autocast(device):
                with torch.set_grad_enabled(cfg.train_text_encoder):
                    feats = text_features(text_model, ids, mask)
                feats = with_uncond(model, feats, drop)
                logits = forward_train(model, layout, tokens, feats, mask, block_fn)
            loss, acc = bit_loss(logits, bits, weights)
            loss.backward()
        except Exception as err:
            if block_fn is block_math or state.step > 0:
                raise
            log(f"transformer: torch.compile failed ({type(err).__name__}: {err}); running eagerly")
            block_fn = block_math
            continue
        value = loss.item()
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        if not (math.isfinite(value) and math.isfinite(norm)):  # skip the step; give up after a run of them
            skipped += 1
            log(f"transformer: non-finite loss or gradient at step {state.step} (skipped {skipped} in a row)")
            if skipped >= 20:
                state.stopped = f"non-finite loss or gradients at step {state.step}"
                break
            continue
        skipped = 0
        opt.step()
        state.step += 1
        state.images += cfg.batch_size
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        per_scale = torch.stack([acc[:, o:o + n].mean() for o, n in zip(layout.offsets, layout.lengths)])
        ema_acc = per_scale if ema_acc is None else 0.98 * ema_acc + 0.02 * per_scale
        state.loss, state.seconds = ema, budget.elapsed
        if state.step % cfg.log_every == 0 or state.step == 1:
            accs = " ".join(f"{a:.3f}" for a in ema_acc.tolist())
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            rate = (state.images - window[1]) / max(budget.elapsed - window[0], 1e-9)
            window = (budget.elapsed, state.images)
            log(f"transformer step {state.step} images {state.images} loss {ema:.4f} lr {lr:.2e} "
                f"{rate:.0f} img/s, peak {mem:.1f} GiB; bit acc per scale {accs}")
        if checkpoint is not None and budget.elapsed - last_ckpt > cfg.checkpoint_every_s:
            save_checkpoint(checkpoint, model, text_model, state)
            last_ckpt = budget.elapsed
    model.eval().requires_grad_(False)
    text_model.eval().requires_grad_(False)
    state.seconds = budget.elapsed
    if checkpoint is not None and not state.stopped:  # a stopped run keeps its last good checkpoint
        save_checkpoint(checkpoint, model, text_model, state)
    return state


def save_checkpoint(path: Path, model: nn.Module, text_model: nn.Module, state: TrainState) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "text_encoder": text_model.state_dict(), "state": vars(state)}, tmp)
    tmp.replace(path)
