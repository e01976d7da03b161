"""Configs of the shipped small model: the `tiny` model preset, with the `shapes` VAE and text encoder presets.

The transformer is Infinity's architecture at depth 7, width 256 (4 heads of 64), 16 bits per token (depth 7 keeps
the three weight files under 20 MB in bf16); the VAE decoder has the `tiny` VAE preset's shape (stride 16, 16 bits);
the text encoder is a `SmallTextEncoder` of width 64 over the prompts' words (trained here, see train.py). Images are
512x512: the 1:1 schedule of the 512 budget, 10 scales, 2521 tokens, last grid 32x32.

They are registered in `varserve.models.config.PRESETS`, `vae.VAE_PRESETS` and `text_encoder.TEXT_ENCODER_PRESETS`
(the lines `preset_lines()` prints), with the weights in the package folder varserve/weights/tiny/; a registered
entry of the same name must equal the one here (`registered_or_local` checks).
"""

from __future__ import annotations

from dataclasses import asdict, replace

from varserve.models.config import PRESETS, ModelConfig
from varserve.models.schedule import ScaleSchedule, get_schedule
from varserve.models.text_encoder import TEXT_ENCODER_PRESETS, TextEncoderConfig
from varserve.models.vae import VAE_PRESETS, VAEConfig

NAME = "tiny"

VAE = VAEConfig("shapes", codebook_dim=16, channels=32, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1, stride=16,
                patchify=False)
TEXT_ENCODER = TextEncoderConfig(name="shapes", d_model=64, max_length=40, num_layers=4, num_heads=4, d_ff=256,
                                 architecture="small")
MODEL = ModelConfig(
    name=NAME, depth=7, width=256, num_heads=4, d_vae=16, text_dim=64, text_maxlen=40, block_chunks=7,
    pool_head_dim=16, vae="shapes", text_encoder="shapes",
)
IMAGE_SIZE = "512x512"


def schedule() -> ScaleSchedule:
    return get_schedule(1.0, 512)


def _pick(registry: dict, local, what: str):
    if local.name not in registry:
        return local
    registered = registry[local.name]
    if isinstance(registered, ModelConfig):  # where its weights live and how it samples are not architecture
        registered = replace(registered, weights=local.weights, sampling=local.sampling)
    if registered != local:
        raise ValueError(f"{what} preset {local.name!r} is registered with other values: "
                         f"{registry[local.name]} != {local}")
    return registry[local.name]


def registered_or_local(model: ModelConfig = MODEL, vae: VAEConfig = VAE, text: TextEncoderConfig = TEXT_ENCODER):
    """(model, vae, text encoder) configs: the registered presets where they exist (checked equal), else these."""
    return _pick(PRESETS, model, "model"), _pick(VAE_PRESETS, vae, "VAE"), _pick(TEXT_ENCODER_PRESETS, text, "text")


def config_dict(model: ModelConfig, vae: VAEConfig, text: TextEncoderConfig) -> dict:
    m = asdict(model)
    m.pop("weights", None)
    return {"model": m, "vae": asdict(vae), "text_encoder": asdict(text)}


def preset_lines(model: ModelConfig = MODEL, vae: VAEConfig = VAE, text: TextEncoderConfig = TEXT_ENCODER) -> str:
    """The lines that register these configs with the serving presets."""
    return "\n".join([
        "# varserve/models/config.py, in PRESETS:",
        f'    "{model.name}": ModelConfig(',
        f'        name="{model.name}", depth={model.depth}, width={model.width}, num_heads={model.num_heads}, '
        f'd_vae={model.d_vae}, text_dim={model.text_dim},',
        f'        text_maxlen={model.text_maxlen}, block_chunks={model.block_chunks}, '
        f'pool_head_dim={model.pool_head_dim}, vae="{model.vae}", text_encoder="{model.text_encoder}",',
        f'        weights=WeightFiles("{model.name}", "transformer.safetensors", "vae.safetensors", "text_encoder", '
        "in_package=True),",
        "    ),",
        "# varserve/models/vae.py, in VAE_PRESETS:",
        f'    "{vae.name}": VAEConfig("{vae.name}", codebook_dim={vae.codebook_dim}, channels={vae.channels}, '
        f"ch_mult={vae.ch_mult}, num_res_blocks={vae.num_res_blocks},",
        " " * len(f'    "{vae.name}": VAEConfig(') + f"stride={vae.stride}, patchify={vae.patchify}),",
        "# varserve/models/text_encoder.py, in TEXT_ENCODER_PRESETS:",
        f'    "{text.name}": TextEncoderConfig(name="{text.name}", d_model={text.d_model}, '
        f"max_length={text.max_length}, num_layers={text.num_layers},",
        " " * len(f'    "{text.name}": TextEncoderConfig(') + f"num_heads={text.num_heads}, d_ff={text.d_ff}, "
        f'architecture="{text.architecture}"),',
    ])
