"""BSQ VAE of Infinity, generation side: bits -> codes, code accumulation across scales, decoder -> RGB.

Latent layout: `[B, codebook_dim, H', W']` float32. A scale of `h x w` tokens covers `H' x W' = h x w` latent
cells, or `2h x 2w` with `patchify` (Infinity-8B: each token carries the 2x2 cells of a pixel-unshuffle, so
`token_bits = 4 * codebook_dim`). Bit `c*4 + 2*i + j` of a patchified token is channel `c` of cell `(i, j)`.

Official checkpoint layout (infinity_vae_d32reg.pth, infinity_vae_d56_f8_14_patchify.pth)
---------------------------------------------------------------------------------------
`torch.load(file, weights_only=True)` gives a dict whose entry "vae" is the state dict of the official
`AutoEncoder` (infinity/models/bsq_vae/vae.py `vae_model`: `load_cnn(vae, state_dict["vae"], prefix="")`; the
"ema" entry is read only with `args.ema == "yes"`, which inference never sets). Every conv of that model is a
`Conv` wrapper holding `self.conv = nn.Conv2d` and every norm a `Normalize` holding `self.norm = nn.GroupNorm`
(bsq_vae/conv.py, bsq_vae/flux_vqgan.py; the BitVAE trainer that produced the files uses the same wrappers), so
with L = len(ch_mult), R = num_res_blocks, C_i = channels * ch_mult[i], d = codebook_dim the decoder keys are:

    decoder.conv_in.conv.{weight [C_{L-1}, d, 3, 3], bias}
    decoder.mid.block_{1,2}.{norm1.norm, conv1.conv, norm2.norm, conv2.conv}.{weight, bias}
    decoder.up.{i}.block.{j}.{norm1.norm, conv1.conv, norm2.norm, conv2.conv}.{weight, bias}   i < L, j <= R
    decoder.up.{i}.block.0.nin_shortcut.conv.{weight, bias}   where the level's input width C_{i+1} != C_i
    decoder.up.{i}.upsample.conv.conv.{weight, bias}           1 <= i <= log2(stride)
    decoder.norm_out.norm.{weight, bias}
    decoder.conv_out.conv.{weight [3, C_0, 3, 3], bias}

`load_cnn` also accepts each of these without its wrapper level (`X.weight` for `X.conv.weight` /
`X.norm.weight`); so does `load_vae`. Recognised and ignored: `encoder.*` (the image encoder), `quantizer.*` and
`quantize.*` (the BSQ quantizer, registered under both names by the official AutoEncoder; its only state in these
configs is the `lfq.mask` bit-weight buffer), and `perceptual_model.*` (the BitVAE trainer's LPIPS network,
should a file carry it). Anything else is an error. A .safetensors file holds the state dict itself (the
vae.safetensors of the models trained in varserve/training/, in this key layout) and is checked the same way.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from varserve.models.fused import conv2d, group_norm_swish

Hw = tuple[int, int]

IGNORED_PREFIXES = ("encoder.", "quantizer.", "quantize.", "perceptual_model.")
_WRAPPER_LEVELS = (".conv.", ".norm.")


@dataclass(frozen=True)
class VAEConfig:
    name: str
    codebook_dim: int  # latent channels d; a code is +-1/sqrt(d) per channel
    channels: int  # base width (official base_ch)
    ch_mult: tuple[int, ...]  # width multiplier per resolution level, finest level first
    num_res_blocks: int  # official value; the decoder has num_res_blocks + 1 blocks per level
    stride: int  # decoder upsampling factor (official patch_size)
    patchify: bool  # 2x2 pixel-unshuffle between the latent and the transformer tokens
    # The reference generation loop uses the quantizer's z_interplote_up ("trilinear") both to upsample codes
    # into the sum and to downsample the sum into the next scale's input.
    upsample_mode: str = "trilinear"
    downsample_mode: str = "trilinear"

    def __post_init__(self) -> None:
        levels = math.log2(self.stride)
        if not levels.is_integer() or not 1 <= levels < len(self.ch_mult):
            raise ValueError(f"{self.name}: stride {self.stride} needs a power of 2 below 2**len(ch_mult)")
        for width in self.widths:
            if width % 32 and width % 24:
                raise ValueError(f"{self.name}: width {width} fits no GroupNorm of 32 or 24 groups")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.ch_mult)

    @property
    def upsample_levels(self) -> range:
        return range(1, int(math.log2(self.stride)) + 1)

    @property
    def token_bits(self) -> int:
        return self.codebook_dim * 4 if self.patchify else self.codebook_dim

    @property
    def token_stride(self) -> int:
        """Image pixels per token side."""
        return self.stride * 2 if self.patchify else self.stride

    @property
    def code_scale(self) -> float:
        return 1 / math.sqrt(self.codebook_dim)

    def latent_hw(self, scale_hw: Hw) -> Hw:
        """Latent grid of a scale of `scale_hw` tokens."""
        h, w = scale_hw
        return (2 * h, 2 * w) if self.patchify else (h, w)


VAE_PRESETS: dict[str, VAEConfig] = {
    "d32": VAEConfig("d32", codebook_dim=32, channels=128, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=2,
                     stride=16, patchify=False),
    "d56": VAEConfig("d56", codebook_dim=14, channels=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                     stride=8, patchify=True),
    "tiny": VAEConfig("tiny", codebook_dim=16, channels=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1,
                      stride=16, patchify=False),
    "shapes": VAEConfig("shapes", codebook_dim=16, channels=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1,
                        stride=16, patchify=False),
}


class _Conv(nn.Module):
    """`Conv` of the official code: the nn.Conv2d sits one level down, under `.conv`."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(x, self.conv.weight, self.conv.bias, self.conv.padding[0])


class _Norm(nn.Module):
    """`Normalize` of the official code: GroupNorm under `.norm`, 32 groups, else 24."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(32 if channels % 32 == 0 else 24, channels, eps=1e-6)

    def swish(self, x: Tensor) -> Tensor:
        """swish(norm(x)) in the dtype the next conv computes in (autocast's, else x's)."""
        autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
        return group_norm_swish(x, self.norm.weight, self.norm.bias, self.norm.num_groups, self.norm.eps, dtype)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _Norm(c_in)
        self.conv1 = _Conv(c_in, c_out, 3)
        self.norm2 = _Norm(c_out)
        self.conv2 = _Conv(c_out, c_out, 3)
        self.nin_shortcut = _Conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.norm1.swish(x))
        h = self.conv2(self.norm2.swish(h))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _Conv(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        # Nearest copies values: in x's dtype, not the fp32 CUDA autocast picks (4x the map, cast back by the conv).
        with torch.autocast("cuda", enabled=False) if x.is_cuda else contextlib.nullcontext():
            up = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(up)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = cfg.widths
        self.conv_in = _Conv(cfg.codebook_dim, widths[-1], 3)
        self.mid = nn.Module()
        self.mid.block_1 = _ResBlock(widths[-1], widths[-1])
        self.mid.block_2 = _ResBlock(widths[-1], widths[-1])
        self.up = nn.ModuleList()
        c_in = widths[-1]
        for level in reversed(range(len(widths))):  # coarsest first; self.up stays indexed by level
            up = nn.Module()
            up.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(_ResBlock(c_in, widths[level]))
                c_in = widths[level]
            if level in cfg.upsample_levels:
                up.upsample = _Upsample(c_in)
            self.up.insert(0, up)
        self.norm_out = _Norm(widths[0])
        self.conv_out = _Conv(widths[0], 3, 3)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(self.norm_out.swish(h))


def _resize(x: Tensor, hw: Hw, mode: str) -> Tensor:
    # The reference interpolates [B, d, 1, h, w] over (1, h, w): the same 5D call keeps every backend bit-identical.
    return F.interpolate(x.unsqueeze(2), size=(1, *hw), mode=mode).squeeze(2)


class BSQVAE(nn.Module):
    """The decoder of an official BSQ VAE plus the latent-space steps of the generation loop.

    Every `hw` argument is a token grid (h, w) of the scale schedule; latent grids follow from `config.latent_hw`.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)

    def bits_to_codes(self, bits: Tensor, hw: Hw) -> Tensor:
        """bits [B, h*w, token_bits] in {0, 1} -> codes [B, codebook_dim, H', W'] float32."""
        cfg, (h, w) = self.config, hw
        if bits.dim() != 3 or bits.shape[1:] != (h * w, cfg.token_bits):
            raise ValueError(f"bits of shape {tuple(bits.shape)}; expected [B, {h * w}, {cfg.token_bits}]")
        grid = bits.reshape(bits.shape[0], h, w, cfg.token_bits)
        if cfg.patchify:
            grid = F.pixel_shuffle(grid.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        codes = (grid.to(torch.float32) * 2 - 1) * cfg.code_scale
        # Normalising channels-last, as the reference does, keeps its exact rounding of the norm.
        return F.normalize(codes, dim=-1).permute(0, 3, 1, 2)

    def accumulate(self, summed: Tensor | None, codes: Tensor, final_hw: Hw, is_last: bool) -> Tensor:
        """Add one scale's codes to the running sum at the final latent size (None starts a sum)."""
        final = self.config.latent_hw(final_hw)
        if is_last:
            if tuple(codes.shape[-2:]) != final:
                raise ValueError(f"last-scale codes of grid {tuple(codes.shape[-2:])}; expected {final}")
            up = codes
        else:
            up = _resize(codes, final, self.config.upsample_mode)
        return up if summed is None else summed + up

    def next_input(self, summed: Tensor, next_hw: Hw) -> Tensor:
        """The next scale's input tokens [B, h*w, token_bits] from the running sum."""
        x = _resize(summed, self.config.latent_hw(next_hw), self.config.downsample_mode)
        if self.config.patchify:
            x = F.pixel_unshuffle(x, 2)
        return x.flatten(2).transpose(1, 2).contiguous()

    @torch.no_grad()
    def decode(self, summed: Tensor) -> Tensor:
        """Summed codes [B, d, H', W'] -> uint8 RGB [B, H'*stride, W'*stride, 3].

        Arithmetic runs in the decoder's output dtype, as in the reference (bf16 there, under autocast).
        """
        # Channels-last on CUDA (as `load_vae` puts the weights): cuDNN's convs and the GroupNorm kernels read it
        # without transposes.
        layout = torch.channels_last if summed.is_cuda else torch.contiguous_format
        x = self.decoder(summed.to(self.decoder.conv_in.conv.weight.dtype, memory_format=layout))
        x = (x.clamp(-1, 1) + 1) / 2
        return x.mul(255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _unwrapped(key: str) -> str:
    """`a.b.conv.weight` -> `a.b.weight`: the same key without its wrapper level."""
    for level in _WRAPPER_LEVELS:
        head, sep, leaf = key.rpartition(level)
        if sep and "." not in leaf:
            return f"{head}.{leaf}"
    return key


def _read_file(path: Path) -> object:
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _vae_state(raw: object, path: str) -> Mapping[str, object]:
    if isinstance(raw, Mapping) and isinstance(raw.get("vae"), Mapping):
        return raw["vae"]
    if isinstance(raw, Mapping) and any(str(k).startswith("decoder.") for k in raw):
        return raw
    keys = list(raw)[:10] if isinstance(raw, Mapping) else type(raw).__name__
    raise ValueError(f"{path}: neither a 'vae' entry nor decoder.* keys; found {keys}")


def _match_state(model: BSQVAE, state: Mapping[str, object], path: str) -> dict[str, Tensor]:
    """The model's state from an official VAE state dict; one ValueError listing every problem."""
    expected = model.state_dict()
    aliases = {_unwrapped(k): k for k in expected}
    found: dict[str, Tensor] = {}
    misshaped: dict[str, str] = {}
    unexpected = []
    for key, value in state.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        name = key if key in expected else aliases.get(key)
        if name is None or name in found or name in misshaped or not isinstance(value, Tensor):
            unexpected.append(key)
        elif value.shape != expected[name].shape:
            misshaped[name] = f"{key}: file {tuple(value.shape)}, model {tuple(expected[name].shape)}"
        else:
            found[name] = value
    missing = [k for k in expected if k not in found and k not in misshaped]
    sections = {"missing": missing, "unexpected": unexpected, "wrong shape": list(misshaped.values())}
    report = [f"{label} ({len(keys)}):\n  " + "\n  ".join(keys) for label, keys in sections.items() if keys]
    if report:
        raise ValueError(f"{path} does not fit VAE preset {model.config.name!r}:\n" + "\n".join(report))
    return found


def load_vae(config: VAEConfig | str, path: str | Path | None = None, *, seed: int = 0,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> BSQVAE:
    """A VAE file (an official .pth, or a .safetensors state dict) loaded strictly, or a seeded random init when
    `path` is None."""
    cfg = VAE_PRESETS[config] if isinstance(config, str) else config
    if path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BSQVAE(cfg)
    else:
        raw = _read_file(Path(path))
        with torch.device("meta"):
            model = BSQVAE(cfg)
        model.load_state_dict(_match_state(model, _vae_state(raw, str(path)), str(path)), assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else model
