"""BSQ VAE training: a training-only encoder, the multi-scale residual BSQ quantizer, and the training loop.

The quantizer is Infinity's: at every scale the residual (encoder output minus the codes so far) is downsampled to
the scale's grid (area), binary-quantized (bit = residual > 0, code = +-1/sqrt(d)), and the codes are added to the
running sum at the final grid. It does this with the generation loop's OWN latent steps
(`BSQVAE.bits_to_codes`, `BSQVAE.accumulate`, `BSQVAE.next_input`), so the running sums, and therefore the
transformer's teacher-forced inputs (`next_input` of the sum) and targets (the bits), are exactly those of
inference. Gradients reach the encoder through a straight-through estimator on the whole sum, plus a commitment
loss. Optional bit flips (Infinity's bitwise self-correction) corrupt a scale's bits before they enter the sum; the
later scales' bits then correct the error, and the target of the corrupted scale stays its clean bits.

The decoder trained here is `BSQVAE.decoder` itself, so its state dict has the official key layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from varserve.models.vae import BSQVAE, Hw
from varserve.training.common import Budget, autocast, log, lr_at, no_autocast, param_count
from varserve.training.data import PALETTE_RGB, Scenes, render


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(32, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        return self.skip(x) + self.conv2(_swish(self.norm2(h)))


class Encoder(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] -> latent [B, d, H/stride, W/stride] (training only, never shipped).

    A pixel-unshuffle by 4 first keeps the full-resolution work small (the pictures are flat colours). The output is
    soft-clamped to +-`bound`: the sum of 10 scales' codes (+-1/4 each at d = 16) reaches +-2.5, so the latent stays
    where the quantizer can follow it (an unbounded one drifts out, and the straight-through gradient then lies)."""

    def __init__(self, codebook_dim: int, stride: int = 16, widths: tuple[int, ...] = (64, 128, 128),
                 bound: float = 2.0) -> None:
        super().__init__()
        self.bound = bound
        self.unshuffle = 4
        downs = int(np.log2(stride // self.unshuffle))
        if self.unshuffle * 2**downs != stride or len(widths) != downs + 1:
            raise ValueError(f"stride {stride} needs {downs + 1} widths and a power of 2 over 4")
        self.conv_in = nn.Conv2d(3 * self.unshuffle**2, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            layers.append(_ResBlock(c, w))
            c = w
            if i < downs:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers.append(_ResBlock(c, c))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(32, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, codebook_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(self.conv_in(F.pixel_unshuffle(x, self.unshuffle)))
        return self.bound * torch.tanh(self.conv_out(_swish(self.norm_out(h))).float() / self.bound)


@dataclass
class Quantized:
    """Multi-scale quantization of a batch.
    bits: per scale [B, h*w, d] uint8, the targets (clean bits);
    inputs: per scale s >= 1, [B, h*w, d] float32 = vae.next_input(sum of codes of scales < s): the transformer's
            teacher-forced inputs (with flips: of the corrupted sum);
    summed: [B, d, H, W] float32, the sum of all scales' codes (what vae.decode takes);
    sums: with keep_sums, the running sum after every scale."""

    bits: list[Tensor]
    inputs: list[Tensor]
    summed: Tensor
    sums: list[Tensor] | None = None


def multiscale_quantize(
    vae: BSQVAE, f: Tensor, scales: tuple[Hw, ...] | list[Hw], flip_prob: Tensor | None = None,
    generator: torch.Generator | None = None, downsample_mode: str = "area", keep_sums: bool = False,
) -> Quantized:
    """Residual-quantize the latent f [B, d, H, W] (H, W = the last scale's grid) over `scales`.

    flip_prob: [B] per-image probability of flipping each bit of every scale but the last before it enters the sum.
    The sum is float32 as in generation; the residual is float32 (float64 for a float64 f), whatever autocast says."""
    if tuple(f.shape[-2:]) != vae.config.latent_hw(scales[-1]):
        raise ValueError(f"latent of grid {tuple(f.shape[-2:])}; the last scale is {scales[-1]}")
    with no_autocast(f.device):
        f = f.float() if f.dtype != torch.float64 else f
        summed: Tensor | None = None
        bits_out, inputs, sums = [], [], []
        for s, hw in enumerate(scales):
            last = s == len(scales) - 1
            residual = f if summed is None else f - summed
            r = residual if last else F.interpolate(residual, size=hw, mode=downsample_mode)
            bits = (r > 0).flatten(2).transpose(1, 2).to(torch.uint8)  # [B, h*w, d], channel-last like the model
            bits_out.append(bits)
            used = bits
            if flip_prob is not None and not last:
                u = torch.rand(bits.shape, generator=generator, device=bits.device, dtype=torch.float32)
                used = bits ^ (u < flip_prob.view(-1, 1, 1).float()).to(torch.uint8)
            codes = vae.bits_to_codes(used, hw)  # float32, as in generation (the sum stays float32)
            summed = vae.accumulate(summed, codes, scales[-1], last)
            if keep_sums:
                sums.append(summed)
            if not last:
                inputs.append(vae.next_input(summed, scales[s + 1]))
    return Quantized(bits_out, inputs, summed, sums if keep_sums else None)


def straight_through(f: Tensor, summed: Tensor) -> Tensor:
    """The sum's values with the identity's gradient to f."""
    return f + (summed.to(f.dtype) - f).detach()


def vae_loss(recon: Tensor, target: Tensor, f: Tensor, summed: Tensor, commit: float = 0.1,
             edge: float = 0.5, weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """weight: [B, 1, H, W] per-pixel weights of the L1 and L2 terms (None: all 1)."""
    recon, target = recon.float(), target.float()
    weight = torch.ones_like(target[:, :1]) if weight is None else weight
    norm = weight.sum() * target.shape[1]
    l1 = (weight * (recon - target).abs()).sum() / norm
    l2 = (weight * (recon - target).square()).sum() / norm
    grad = recon.new_zeros(())
    for dim in (-1, -2):
        grad = grad + (recon.diff(dim=dim) - target.diff(dim=dim)).abs().mean()
    commitment = F.mse_loss(f.float(), summed.float().detach())
    loss = l1 + l2 + edge * grad + commit * commitment
    return loss, {"l1": l1.item(), "l2": l2.item(), "edge": grad.item(), "commit": commitment.item()}


def psnr(recon: Tensor, target: Tensor) -> float:
    """PSNR in dB of pictures in [-1, 1]."""
    mse = F.mse_loss((recon.float().clamp(-1, 1) + 1) / 2, (target.float() + 1) / 2).item()
    return float(10 * np.log10(1 / max(mse, 1e-12)))


@dataclass
class VAETrainConfig:
    minutes: float = 3.0
    batch_size: int = 32
    lr: float = 2e-3
    image_size: int = 512
    # 0: the decoder trains on whole pictures. n > 0: on random n x n crops of the latent (n * stride pixels), 3-4x
    # faster, but a decoder that never saw a cell farther than n/2 cells from a border paints artefacts in the
    # middle of whole 32x32 latents (seen on an H100 with n = 16); so whole pictures are the default.
    crop: int = 0
    # L1/L2 weight of object pixels (background pixels weigh 1): objects cover ~4% of the pixels, and with equal
    # weights an H100 run's decoder painted red objects orange (checker: 22% of reconstructions right).
    object_weight: float = 10.0
    max_flip: float = 0.03  # per image, bits of every scale but the last flip with p ~ U(0, max_flip)
    flip_share: float = 0.5  # share of each batch that gets flips
    log_every: int = 50
    seed: int = 0
    compile: bool = True


def train_vae(
    vae: BSQVAE, encoder: Encoder, scenes: Scenes, scales: tuple[Hw, ...], cfg: VAETrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """Train encoder + decoder for `cfg.minutes` of wall clock on pictures of `scenes`. Returns final stats.

    The encoder sees whole pictures and the quantizer whole latents (its scales span the picture); the decoder sees
    the whole summed latent, or with `cfg.crop` a random crop of it (the same crop for a batch)."""
    vae.train().requires_grad_(True)
    encoder.train().requires_grad_(True)
    if device.type == "cuda":
        encoder.to(memory_format=torch.channels_last)
        vae.decoder.to(memory_format=torch.channels_last)
    stride = vae.config.stride
    params = list(encoder.parameters()) + list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0,
                            fused=device.type == "cuda")
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    enc_fn, dec_fn = encoder, vae.decoder
    if cfg.compile and device.type == "cuda":
        enc_fn, dec_fn = torch.compile(encoder), torch.compile(vae.decoder)
    log(f"VAE: encoder {param_count(encoder) / 1e6:.2f} M, decoder {param_count(vae.decoder) / 1e6:.2f} M params; "
        f"batch {cfg.batch_size} at {cfg.image_size}px; budget {cfg.minutes:.1f} min")
    budget = Budget(cfg.minutes)
    step, seen, stats, ema = 0, 0, {}, None
    window = (0.0, 0)
    while not budget.over():
        lr = lr_at(budget.fraction, cfg.lr, warmup=0.05)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = rng.integers(0, len(scenes), cfg.batch_size)
        with torch.no_grad():
            images = render(scenes[idx], cfg.image_size, device) * 2 - 1
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
        lat_h, lat_w = vae.config.latent_hw(scales[-1])
        ch, cw = (min(cfg.crop, lat_h), min(cfg.crop, lat_w)) if cfg.crop else (lat_h, lat_w)
        oy, ox = int(rng.integers(0, lat_h - ch + 1)), int(rng.integers(0, lat_w - cw + 1))
        target = images[:, :, oy * stride:(oy + ch) * stride, ox * stride:(ox + cw) * stride]
        weight = pixel_weights(scenes[idx], target, cfg.object_weight)
        flip = torch.rand(cfg.batch_size, device=device, generator=gen) * cfg.max_flip
        flip = flip * (torch.rand(cfg.batch_size, device=device, generator=gen) < cfg.flip_share)
        opt.zero_grad(set_to_none=True)
        try:
            with autocast(device):
                f = enc_fn(images).float()
            q = multiscale_quantize(vae, f.detach(), scales, flip, gen)
            z = straight_through(f, q.summed)[:, :, oy:oy + ch, ox:ox + cw]
            with autocast(device):
                recon = dec_fn(z)
            loss, parts = vae_loss(recon, target, f, q.summed, weight=weight)
            loss.backward()
        except Exception as err:  # a compile failure: go on eagerly
            if enc_fn is encoder or step > 0:
                raise
            log(f"VAE: torch.compile failed ({type(err).__name__}: {err}); running eagerly")
            enc_fn, dec_fn = encoder, vae.decoder
            continue
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        seen += cfg.batch_size
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % cfg.log_every == 0 or step == 1:
            rate = (seen - window[1]) / max(budget.elapsed - window[0], 1e-9)
            window = (budget.elapsed, seen)
            stats = {"step": step, "images": seen, "loss": ema, "psnr": psnr(recon.detach(), target), **parts,
                     "lr": lr, "images_per_s": rate}
            log("VAE " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
    vae.eval().requires_grad_(False)
    encoder.eval().requires_grad_(False)
    stats.update(step=step, images=seen, seconds=budget.elapsed)
    return stats


@torch.no_grad()
def pixel_weights(scenes: Scenes, images: Tensor, object_weight: float) -> Tensor:
    """[B, 1, H, W]: `object_weight` where a picture (in [-1, 1]) differs from its background colour, else 1."""
    background = torch.from_numpy(PALETTE_RGB[scenes.background.astype(np.int64)]).to(images) / 127.5 - 1
    is_object = (images - background[:, :, None, None]).abs().amax(1, keepdim=True) > 1 / 255
    return 1 + (object_weight - 1) * is_object.to(images.dtype)


@torch.no_grad()
def encode(encoder: Encoder, images: Tensor, device: torch.device) -> Tensor:
    """Pictures [B, 3, H, W] in [0, 1] -> latents f [B, d, h, w] float32."""
    with autocast(device):
        return encoder(images * 2 - 1).float()
