"""Model configurations (gpt-fast style: one dataclass, named presets)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class WeightFiles:
    """Where a preset's weights live: a Hugging Face Hub repo, or (`in_package`) the folder
    varserve/weights/{repo_id}/ shipped inside the installed package, never downloaded."""

    repo_id: str  # with in_package: the folder's name under varserve/weights/
    transformer: str  # a .pth/.safetensors file, or a folder of shards
    vae: str
    text_encoder_repo: str  # with in_package: the text encoder's subfolder
    in_package: bool = False


@dataclass(frozen=True)
class ModelConfig:
    name: str
    depth: int
    width: int
    num_heads: int
    d_vae: int  # bits per token: the head predicts 2 * d_vae logits
    text_dim: int = 2048  # T5 hidden size
    text_maxlen: int = 512
    block_chunks: int = 8  # checkpoint layout: blocks live under block_chunks.{c}.module.{j}
    num_levels: int = 15  # rows of the level (scale index) embedding
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    pool_head_dim: int = 128  # head size of the text attentive pooling
    vae: str = "d32"  # preset name in varserve.models.vae.VAE_PRESETS
    text_encoder: str = "flan-t5-xl"  # preset name in varserve.models.text_encoder.TEXT_ENCODER_PRESETS
    weights: WeightFiles | None = None
    # SamplingParams defaults this model's own evaluation chose, as (field, value) pairs; () keeps SamplingParams'
    # (Infinity's). Not architecture: a retrained model may recommend others.
    sampling: tuple[tuple[str, float | str], ...] = ()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return round(self.width * 4 / 256) * 256

    @property
    def pool_heads(self) -> int:
        return self.text_dim // self.pool_head_dim

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"{self.name}: width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"{self.name}: head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.depth % self.block_chunks:
            raise ValueError(f"{self.name}: depth {self.depth} is not a multiple of block_chunks {self.block_chunks}")
        if self.width % self.pool_heads:
            raise ValueError(f"{self.name}: width {self.width} is not a multiple of pool heads {self.pool_heads}")

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V bytes of one token of one row over all layers."""
        return 2 * self.depth * self.width * dtype_bytes


_HF_REPO = "FoundationVision/Infinity"

PRESETS: dict[str, ModelConfig] = {
    "infinity-2b": ModelConfig(
        name="infinity-2b", depth=32, width=2048, num_heads=16, d_vae=32, vae="d32",
        weights=WeightFiles(_HF_REPO, "infinity_2b_reg.pth", "infinity_vae_d32reg.pth", "google/flan-t5-xl"),
    ),
    "infinity-8b": ModelConfig(
        name="infinity-8b", depth=40, width=3584, num_heads=28, d_vae=56, vae="d56",
        weights=WeightFiles(_HF_REPO, "infinity_8b_weights", "infinity_vae_d56_f8_14_patchify.pth", "google/flan-t5-xl"),
    ),
    # The small model trained on procedural shapes (varserve/training/), shipped inside the package.
    "tiny": ModelConfig(
        name="tiny", depth=7, width=256, num_heads=4, d_vae=16, text_dim=64,
        text_maxlen=40, block_chunks=7, pool_head_dim=16, vae="shapes", text_encoder="shapes",
        weights=WeightFiles("tiny", "transformer.safetensors", "vae.safetensors", "text_encoder", in_package=True),
        # 200 held-out prompts (benchmarks/results/fidelity-tiny-512x512-200prompts-h100-20261124.json): the
        # checker passed 85.5% at cfg 2, tau 0.5; 72% of 50 at SamplingParams' cfg 4, tau 1.
        sampling=(("cfg", 2.0), ("tau", 0.5), ("size", "512x512")),  # it was trained at 512x512
    ),
    # Small random-weight configs of the same architecture that run fast on a CPU (tests, benchmarks).
    "test-small": ModelConfig(
        name="test-small", depth=4, width=128, num_heads=4, d_vae=16, text_dim=64, text_maxlen=128,
        block_chunks=2, pool_head_dim=16, vae="tiny", text_encoder="tiny",
    ),
    "test-deep": ModelConfig(
        name="test-deep", depth=8, width=128, num_heads=4, d_vae=16, text_dim=64, text_maxlen=128,
        block_chunks=4, pool_head_dim=16, vae="tiny", text_encoder="tiny",
    ),
}


def get_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
