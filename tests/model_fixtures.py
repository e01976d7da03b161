"""Models with every parameter random, shared by the numeric tests (the oracles need non-zero everything)."""

import math

import torch

from varserve.models.config import ModelConfig
from varserve.models.infinity import Infinity


def random_model(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float64) -> Infinity:
    """Every parameter random (non-zero biases; some attention scales above the log(100) clamp)."""
    torch.manual_seed(seed)
    model = Infinity(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name.endswith("scale_mul_1H11"):
                value = torch.rand(p.shape, generator=g, dtype=torch.float64) * 5.5
                value.view(-1)[0] = 5.0  # > log(100): clamped
            elif name.endswith(("text_norm.weight", "ca_norm.weight")):
                value = 1 + 0.2 * noise
            elif p.dim() == 2 and name != "cfg_uncond" and not name.endswith("lvl_embed.weight"):
                value = noise / math.sqrt(p.shape[1])
            else:
                value = 0.3 * noise
            p.copy_(value.to(dtype))
    return model
