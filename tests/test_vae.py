import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from varserve.models.config import PRESETS
from varserve.models.schedule import VAE_STRIDE, get_schedule
from varserve.models.vae import VAE_PRESETS, BSQVAE, VAEConfig, load_vae

SCHEDULES = [get_schedule(1.0, 256), get_schedule(0.5, 256), get_schedule(1.333, 512)]


def meta_vae(cfg: VAEConfig) -> BSQVAE:
    """Parameters on the meta device: the latent-space steps never touch them."""
    with torch.device("meta"):
        return BSQVAE(cfg)


def official_decoder_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Decoder keys of the official AutoEncoder (bsq_vae/flux_vqgan.py Decoder, Conv/Normalize wrappers)."""
    widths = [cfg.channels * m for m in cfg.ch_mult]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_in: int, c_out: int, k: int) -> None:
        shapes[f"{name}.conv.weight"] = (c_out, c_in, k, k)
        shapes[f"{name}.conv.bias"] = (c_out,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.norm.weight"] = shapes[f"{name}.norm.bias"] = (c,)

    def block(name: str, c_in: int, c_out: int) -> None:
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    conv("decoder.conv_in", cfg.codebook_dim, widths[-1], 3)
    block("decoder.mid.block_1", widths[-1], widths[-1])
    block("decoder.mid.block_2", widths[-1], widths[-1])
    c_in = widths[-1]
    for i in reversed(range(len(widths))):
        for j in range(cfg.num_res_blocks + 1):
            block(f"decoder.up.{i}.block.{j}", c_in, widths[i])
            c_in = widths[i]
        if 1 <= i <= math.log2(cfg.stride):
            conv(f"decoder.up.{i}.upsample.conv", widths[i], widths[i], 3)
    norm("decoder.norm_out", widths[0])
    conv("decoder.conv_out", widths[0], 3, 3)
    return shapes


def official_file_state(vae: BSQVAE) -> dict[str, torch.Tensor]:
    """What the official .pth holds under "vae" for this decoder: encoder, decoder and quantizer buffers."""
    cfg = vae.config
    d, c0, c_top = cfg.codebook_dim, cfg.widths[0], cfg.widths[-1]
    encoder = {
        "encoder.conv_in.conv.weight": torch.randn(c0, 3, 3, 3),
        "encoder.conv_in.conv.bias": torch.randn(c0),
        "encoder.down.0.block.0.norm1.norm.weight": torch.ones(c0),
        "encoder.down.0.downsample.conv.conv.weight": torch.randn(c0, c0, 3, 3),
        "encoder.mid.block_1.conv1.conv.weight": torch.randn(c_top, c_top, 3, 3),
        "encoder.norm_out.norm.bias": torch.zeros(c_top),
        "encoder.conv_out.conv.weight": torch.randn(d, c_top, 3, 3),
    }
    mask = 2 ** torch.arange(d - 1, -1, -1)
    return {**encoder, **vae.state_dict(), "quantizer.lfq.mask": mask, "quantize.lfq.mask": mask}


# ---------------------------------------------------------------- configs and key layout

@pytest.mark.parametrize("name", sorted(VAE_PRESETS))
def test_decoder_keys_match_official_layout(name):
    cfg = VAE_PRESETS[name]
    ours = {k: tuple(v.shape) for k, v in meta_vae(cfg).state_dict().items()}
    assert ours == official_decoder_shapes(cfg)


def test_official_sizes_spot_checks():
    # Counts and shapes of the official AutoEncoder's decoder.* keys for d32 / d56.
    d32 = meta_vae(VAE_PRESETS["d32"]).state_dict()
    assert len(d32) == 154
    assert d32["decoder.conv_in.conv.weight"].shape == (512, 32, 3, 3)
    assert d32["decoder.up.0.block.0.nin_shortcut.conv.weight"].shape == (128, 256, 1, 1)
    assert d32["decoder.up.1.block.0.nin_shortcut.conv.weight"].shape == (256, 512, 1, 1)
    assert d32["decoder.up.4.upsample.conv.conv.weight"].shape == (512, 512, 3, 3)
    assert d32["decoder.conv_out.conv.weight"].shape == (3, 128, 3, 3)
    d56 = meta_vae(VAE_PRESETS["d56"]).state_dict()
    assert len(d56) == 128
    assert d56["decoder.conv_in.conv.weight"].shape == (512, 14, 3, 3)
    assert "decoder.up.3.upsample.conv.conv.weight" in d56 and "decoder.up.0.upsample.conv.conv.weight" not in d56


@pytest.mark.parametrize("model", sorted(PRESETS))
def test_token_bits_match_model_configs(model):
    cfg = VAE_PRESETS[PRESETS[model].vae]
    assert cfg.token_bits == PRESETS[model].d_vae
    assert cfg.token_stride == VAE_STRIDE


def test_config_rejects_bad_stride_and_widths():
    with pytest.raises(ValueError, match="stride"):
        replace(VAE_PRESETS["tiny"], stride=12)
    with pytest.raises(ValueError, match="stride"):
        replace(VAE_PRESETS["d56"], stride=16)  # 4 levels upsample at most 3 times
    with pytest.raises(ValueError, match="GroupNorm"):
        replace(VAE_PRESETS["tiny"], channels=20)


# ---------------------------------------------------------------- loading

def test_official_checkpoint_loads_and_decodes_identically(tmp_path):
    source = load_vae("tiny", seed=1)
    decoy = load_vae("tiny", seed=2)
    path = tmp_path / "vae.pth"
    torch.save({"vae": official_file_state(source), "ema": official_file_state(decoy)}, path)
    loaded = load_vae("tiny", path)
    z = torch.randn(2, 16, 8, 12)
    assert torch.equal(loaded.decode(z), source.decode(z))
    assert all(not p.requires_grad for p in loaded.parameters())


def test_unwrapped_key_layout_loads(tmp_path):
    # The official load_cnn also maps `X.weight` onto `X.conv.weight` / `X.norm.weight`.
    source = load_vae("tiny", seed=4)
    state = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
             .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v
             for k, v in source.state_dict().items()}
    assert "decoder.up.1.upsample.conv.weight" in state and "decoder.norm_out.weight" in state
    path = tmp_path / "raw.pth"
    torch.save(state, path)
    loaded = load_vae("tiny", path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_wrong_shape_and_unexpected_keys_in_one_error(tmp_path):
    state = official_file_state(load_vae("tiny"))
    del state["decoder.mid.block_2.conv1.conv.bias"]
    state["decoder.conv_out.conv.weight"] = torch.zeros(3, 16, 3, 3)
    state["decoder.mid.attn_1.q.conv.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save({"vae": state}, path)
    with pytest.raises(ValueError) as err:
        load_vae("tiny", path)
    text = str(err.value)
    assert "missing (1)" in text and "decoder.mid.block_2.conv1.conv.bias" in text
    assert "wrong shape (1)" in text and "decoder.conv_out.conv.weight: file (3, 16, 3, 3), model (3, 32, 3, 3)" in text
    assert "unexpected (1)" in text and "decoder.mid.attn_1.q.conv.weight" in text
    assert "encoder." not in text and "quantize" not in text


def test_safetensors_file_loads_as_fp32_and_is_checked_as_strictly(tmp_path):
    """A vae.safetensors (a BSQVAE state dict in bf16, as models trained here ship it) loads into an fp32 VAE."""
    source = load_vae("tiny", seed=5)
    state = {k: v.to(torch.bfloat16) for k, v in source.state_dict().items()}
    path = tmp_path / "vae.safetensors"
    save_file(state, path)
    loaded = load_vae("tiny", path)
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[key].float()), key
    del state["decoder.conv_in.conv.bias"]
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, path)
    with pytest.raises(ValueError) as err:
        load_vae("tiny", path)
    text = str(err.value)
    assert "missing (1)" in text and "decoder.conv_in.conv.bias" in text
    assert "unexpected (1)" in text and "decoder.extra.weight" in text


def test_wrong_preset_is_reported(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"vae": official_file_state(load_vae("tiny"))}, path)
    with pytest.raises(ValueError, match="does not fit VAE preset 'd32'"):
        load_vae("d32", path)


def test_file_without_vae_state(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="neither a 'vae' entry nor decoder"):
        load_vae("tiny", path)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    before = torch.random.get_rng_state()
    a, b, c = load_vae("tiny", seed=7), load_vae("tiny", seed=7), load_vae("tiny", seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.decoder.conv_in.conv.weight, c.decoder.conv_in.conv.weight)


# ---------------------------------------------------------------- latent-space steps vs the reference math

def reference_generation_latents(cfg: VAEConfig, scales, bits_per_scale):
    """The reference loop (infinity.py autoregressive_infer_cfg, vae_type != 0) in its own 5D layout."""
    scale = 1 / np.sqrt(cfg.codebook_dim)  # BSQ codebook_scale
    vae_scales = [(1, 2 * h, 2 * w) if cfg.patchify else (1, h, w) for h, w in scales]
    summed, codes_list, inputs = 0, [], []
    for si, ((h, w), bits) in enumerate(zip(scales, bits_per_scale)):
        idx = bits.reshape(bits.shape[0], h, w, -1)
        if cfg.patchify:
            idx = F.pixel_shuffle(idx.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        idx = idx.unsqueeze(1)  # [B, 1, h, w, d]
        # indices_to_codes(label_type='bit_label'): bits -> +-scale, l2-normalised, channels first
        codes = idx.unsqueeze(-2) * scale * 2 - scale
        codes = F.normalize(codes, dim=-1).flatten(-2).permute(0, 4, 1, 2, 3)  # [B, d, 1, h, w]
        codes_list.append(codes.squeeze(2))
        if si != len(scales) - 1:
            summed = summed + F.interpolate(codes, size=vae_scales[-1], mode="trilinear")
            nxt = F.interpolate(summed, size=vae_scales[si + 1], mode="trilinear").squeeze(-3)
            if cfg.patchify:
                nxt = F.pixel_unshuffle(nxt, 2)
            inputs.append(nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1))
        else:
            summed = summed + codes
    return codes_list, summed.squeeze(-3), inputs


def run_ours(vae: BSQVAE, scales, bits_per_scale):
    summed, codes_list, inputs = None, [], []
    for si, (hw, bits) in enumerate(zip(scales, bits_per_scale)):
        codes = vae.bits_to_codes(bits, hw)
        codes_list.append(codes)
        last = si == len(scales) - 1
        summed = vae.accumulate(summed, codes, scales[-1], last)
        if not last:
            inputs.append(vae.next_input(summed, scales[si + 1]))
    return codes_list, summed, inputs


@pytest.mark.parametrize("name", ["tiny", "d32", "d56"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_latent_steps_match_reference(name, schedule):
    cfg = VAE_PRESETS[name]
    gen = torch.Generator().manual_seed(0)
    bits = [torch.randint(0, 2, (3, h * w, cfg.token_bits), generator=gen) for h, w in schedule.scales]
    ref_codes, ref_summed, ref_inputs = reference_generation_latents(cfg, schedule.scales, bits)
    codes, summed, inputs = run_ours(meta_vae(cfg), schedule.scales, bits)
    for ours, ref in zip(codes + [summed] + inputs, ref_codes + [ref_summed] + ref_inputs):
        assert ours.shape == ref.shape and ours.dtype == torch.float32
        assert torch.equal(ours, ref)
    h, w = cfg.latent_hw(schedule.scales[-1])
    assert summed.shape == (3, cfg.codebook_dim, h, w)
    assert [x.shape[1:] for x in inputs] == [(h * w, cfg.token_bits) for h, w in schedule.scales[1:]]


def test_code_values_and_bit_dtypes():
    vae = meta_vae(VAE_PRESETS["d56"])
    bits = torch.randint(0, 2, (2, 6, 56))
    codes = vae.bits_to_codes(bits, (2, 3))
    assert codes.shape == (2, 14, 4, 6)
    assert torch.allclose(codes.abs(), torch.full_like(codes, 1 / math.sqrt(14)))
    for other in (bits.float(), bits.bool(), bits.to(torch.int32)):
        assert torch.equal(vae.bits_to_codes(other, (2, 3)), codes)
    # bit c*4 + 2*i + j of a token is channel c of latent cell (2*row + i, 2*col + j)
    one = torch.zeros(1, 6, 56, dtype=torch.long)
    one[0, 4, 5 * 4 + 2 * 1 + 0] = 1  # token (1, 1), channel 5, cell (1, 0)
    positive = (vae.bits_to_codes(one, (2, 3)) > 0).nonzero().tolist()
    assert positive == [[0, 5, 3, 2]]


def test_shape_errors():
    vae = meta_vae(VAE_PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"expected \[B, 4, 16\]"):
        vae.bits_to_codes(torch.zeros(1, 4, 32), (2, 2))
    with pytest.raises(ValueError, match="last-scale codes"):
        vae.accumulate(None, torch.zeros(1, 16, 2, 2), (4, 4), is_last=True)


# ---------------------------------------------------------------- decode and image size

@pytest.mark.parametrize("schedule", SCHEDULES[:2], ids=lambda s: s.name)
def test_tiny_decode_shape_dtype_and_mapping(schedule):
    vae = load_vae("tiny", seed=0)
    h, w = schedule.scales[-1]
    summed = torch.randn(2, 16, h, w) * 0.3
    image = vae.decode(summed)
    width, height = schedule.image_size
    assert image.shape == (2, height, width, 3) and image.dtype == torch.uint8 and image.is_contiguous()
    with torch.no_grad():
        raw = vae.decoder(summed).clamp(-1, 1)
    expected = ((raw + 1) / 2).mul(255).to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(image, expected)


@pytest.mark.parametrize("name", ["d32", "d56"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_image_size_is_last_scale_times_16(name, schedule):
    cfg = VAE_PRESETS[name]
    z = torch.empty(1, cfg.codebook_dim, *cfg.latent_hw(schedule.scales[-1]), device="meta")
    out = meta_vae(cfg).decoder(z)
    width, height = schedule.image_size
    assert out.shape == (1, 3, height, width)
    assert (height, width) == tuple(16 * s for s in schedule.scales[-1])
