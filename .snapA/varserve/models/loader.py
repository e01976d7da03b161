"""Build a servable model: transformer, VAE and text encoder, from a preset (random, official or shipped
weights) or from a local path of such weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from varserve.models.checkpoint import ResolvedWeights, load_into, load_transformer_state_dict, resolve_weights
from varserve.models.config import PRESETS, ModelConfig, get_config
from varserve.models.infinity import Infinity
from varserve.models.text_encoder import TEXT_ENCODER_PRESETS, TextEncoder, TextEncoderConfig
from varserve.models.vae import BSQVAE, VAE_PRESETS, VAEConfig, load_vae

logger = logging.getLogger("varserve")


@dataclass
class LoadedModel:
    config: ModelConfig
    transformer: Infinity
    vae: BSQVAE
    text_encoder: TextEncoder


def load_model(
    model: str, *, device: torch.device, dtype: torch.dtype, random_weights: bool = False,
    weights: str | None = None, seed: int = 0,
) -> LoadedModel:
    """`model` is a preset name, or a local path of a preset's weights (then its preset is detected)."""
    preset = preset_of(model)
    if preset != model:
        weights = model
    cfg = get_config(preset)
    if random_weights or cfg.weights is None:
        return _random(cfg, device, dtype, seed)
    return _official(cfg, weights, device, dtype)


def _random(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> LoadedModel:
    logger.info("building %s with random weights (seed %d)", cfg.name, seed)
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = Infinity(cfg)
    vae = load_vae(cfg.vae, seed=seed, dtype=_vae_dtype(dtype), device=device)
    encoder = TextEncoder.load(_encoder_config(cfg, random=True), device=device, dtype=_text_dtype(dtype))
    return LoadedModel(cfg, transformer.to(device=device, dtype=dtype).eval(), vae, encoder)


def _official(cfg: ModelConfig, weights: str | None, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    files = resolve_weights(cfg, weights)
    return load_files(cfg, VAE_PRESETS[cfg.vae], _encoder_config(cfg, random=False), files, device, dtype)


def load_files(cfg: ModelConfig, vae_cfg: VAEConfig, text_cfg: TextEncoderConfig, files: ResolvedWeights,
               device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The three parts from their files, strictly (the transformer in `dtype`, the VAE and text encoder in theirs)."""
    with torch.device("meta"):
        transformer = Infinity(cfg)
    transformer.to_empty(device="cpu")
    with torch.no_grad():  # rows past a shorter file's cfg_uncond keep the constructor's init, not garbage
        transformer.cfg_uncond.normal_(0.0, 1.2 / cfg.text_dim**0.5)
    load_into(transformer, load_transformer_state_dict(files.transformer))
    vae = load_vae(vae_cfg, files.vae, dtype=_vae_dtype(dtype), device=device)
    encoder = TextEncoder.load(text_cfg, files.text_encoder, device=device, dtype=_text_dtype(dtype))
    return LoadedModel(cfg, transformer.to(device=device, dtype=dtype).eval(), vae, encoder)


def _encoder_config(cfg: ModelConfig, random: bool) -> TextEncoderConfig:
    enc = TEXT_ENCODER_PRESETS[cfg.text_encoder]
    if random and enc.hf_repo is not None:  # a random model gets a random text encoder of the right width
        enc = replace(enc, hf_repo=None, num_layers=2, num_heads=4, d_ff=4 * 64)
    return enc


def _text_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float16 if dtype in (torch.bfloat16, torch.float16) else dtype


def _vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The VAE keeps fp32 weights (fp64 in exactness tests); on GPU it decodes under bf16 autocast."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def preset_of(model: str) -> str:
    """The preset of a preset name or of a local path of a preset's weights; ValueError if neither."""
    if model in PRESETS:
        return model
    if not Path(model).expanduser().exists():
        raise ValueError(f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return _detect_preset(Path(model).expanduser())


def _detect_preset(path: Path) -> str:
    """The preset whose name or official transformer file name matches the path."""
    for name, cfg in PRESETS.items():
        if cfg.weights and (cfg.weights.transformer in path.name or name in str(path)):
            return name
        if cfg.weights and (path / cfg.weights.transformer).exists():
            return name
    raise ValueError(f"cannot tell which model {path} holds; pass model=<preset> and weights={str(path)!r}")
