"""Training a small model (varserve/training): procedural data and its checker, the multi-scale quantizer against
the generation loop's latent steps, the batched training forward against the unchanged inference forward (float64),
a few optimisation steps, and the exported weights loading into varserve's modules by key name."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from varserve.models.checkpoint import load_into, load_transformer_state_dict
from varserve.models.config import ModelConfig, WeightFiles, get_config
from varserve.models.generation import ScaleSampling, advance
from varserve.models.infinity import Infinity, make_batch
from varserve.models.reference import DenseKV, generate_dense
from varserve.models.schedule import get_schedule
from varserve.models.text_encoder import (
    TEXT_ENCODER_PRESETS, ByteTokenizer, TextEncoder, TextEncoderConfig, WordTokenizer,
)
from varserve.models.vae import BSQVAE, VAE_PRESETS, VAEConfig
from varserve.training import presets
from varserve.training.data import (
    COLOUR_NAMES, MAX_PROMPT_BYTES, REGIONS, SHAPES, SIZES, VOCABULARY, ObjectSpec, SceneSpec, check_image,
    check_images, render, sample_scenes, to_uint8,
)
from varserve.training.text_train import TextPretrainConfig, prompt_accuracy, pretrain_text_encoder, scene_targets
from varserve.training.train import export, load_trained
from varserve.training.transformer_train import (
    TransformerTrainConfig, bit_loss, forward_train, init_weights, make_layout, param_groups, prompt_tokens,
    scale_weights, text_features, train_transformer, with_uncond,
)
from varserve.training.vae_train import (
    Encoder, VAETrainConfig, multiscale_quantize, straight_through, train_vae, vae_loss,
)

from model_fixtures import random_model

TEST_SMALL = get_config("test-small")  # depth 4, width 128, 4 heads of 32, d_vae 16, T5 width 64
TINY_VAE = VAE_PRESETS["tiny"]
SCHEDULE = get_schedule(1.0, 256)  # 7 scales, last 16x16
TOL = dict(rtol=1e-10, atol=1e-10)


# ---- data and checker -------------------------------------------------------------------------------------------


def test_scenes_are_deterministic_and_well_formed():
    a, b, c = sample_scenes(3000, 7), sample_scenes(3000, 7), sample_scenes(3000, 8)
    assert a.prompts == b.prompts and a.prompts != c.prompts
    for name in a._ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert max(len(p.encode()) for p in a.prompts) <= MAX_PROMPT_BYTES
    ids, lens = prompt_tokens(a.prompts, presets.TEXT_ENCODER.max_length, WordTokenizer(VOCABULARY))
    assert lens.max() <= presets.TEXT_ENCODER.max_length and (ids[np.arange(len(a)), lens - 1] == 1).all()  # </s> last
    assert set(np.unique(a.count)) == {1, 2, 3}
    for i in range(len(a)):
        k = a.count[i]
        regions = a.region[i, :k]
        assert len(set(regions)) == k and (a.colour[i, :k] != a.background[i]).all()
        assert (a.colour[i, :k] < 8).all() and (a.region[i, k:] == -1).all()
        assert a.spec(i).prompt == a.prompts[i]
        # every object stays inside its cell
        row, col = regions // 3, regions % 3
        r = a.r[i, :k]
        assert (a.cx[i, :k] - r >= col / 3).all() and (a.cx[i, :k] + r <= (col + 1) / 3).all()
        assert (a.cy[i, :k] - r >= row / 3).all() and (a.cy[i, :k] + r <= (row + 1) / 3).all()
    assert torch.equal(render(a[:4], 64), render(b[:4], 64))


def test_prompt_wording():
    spec = SceneSpec("white", (
        ObjectSpec("red", "circle", "medium", "top left", 0.17, 0.17, 0.08),
        ObjectSpec("blue", "square", "big", "bottom right", 0.83, 0.83, 0.12),
    ))
    assert spec.prompt == "a red circle at the top left and a big blue square at the bottom right on a white background"


def test_checker_accepts_ground_truth_renders():
    scenes = sample_scenes(24, 11)
    images = to_uint8(render(scenes, 512))
    checks, summary = check_images(images, scenes.specs())
    assert summary["prompt_acc"] == 1.0 and summary["strict_prompt_acc"] == 1.0, summary
    fills = {}
    for c in checks:
        for o in c.objects:
            fills.setdefault(o.expected_shape, []).append(o.fill)
    assert abs(np.mean(fills["circle"]) - math.pi / 4) < 0.05  # ~0.81
    assert abs(np.mean(fills["triangle"]) - 0.5) < 0.1 and np.mean(fills["square"]) > 0.97  # ~0.57, 1.0


def test_checker_rejects_wrong_pictures():
    scenes = sample_scenes(24, 12)
    images = to_uint8(render(scenes, 512))
    specs = scenes.specs()
    _, wrong = check_images(images, specs[1:] + specs[:1])  # every picture against another prompt
    assert wrong["object_acc"] < 0.2 and wrong["prompt_acc"] < 0.1, wrong
    blank = np.full_like(images, 245)
    _, none = check_images(blank, specs)
    assert none["object_acc"] == 0.0 and none["prompt_acc"] == 0.0
    # one attribute changed at a time: shape, colour, region
    spec = specs[0]
    obj = spec.objects[0]
    other_shape = {"circle": "square", "square": "triangle", "triangle": "circle"}[obj.shape]
    other_colour = next(c for c in COLOUR_NAMES[:8] if c not in (obj.colour, spec.background))
    free = [r for r in REGIONS if r not in {o.region for o in spec.objects}]
    for change in ({"shape": other_shape}, {"colour": other_colour}, {"region": free[0]}):
        changed = SceneSpec(spec.background, (ObjectSpec(**{**obj.__dict__, **change}),) + spec.objects[1:])
        assert not check_image(images[0], changed).objects[0].ok, change


# ---- quantizer vs the generation loop ---------------------------------------------------------------------------


def test_quantizer_sums_and_inputs_equal_the_generation_path():
    torch.manual_seed(0)
    vae = BSQVAE(TINY_VAE)
    model = random_model(TEST_SMALL, 1, torch.float32)
    scales = SCHEDULE.scales
    f = torch.randn(3, TINY_VAE.codebook_dim, *scales[-1]) * 0.8
    q = multiscale_quantize(vae, f, scales)
    assert [b.shape[1] for b in q.bits] == [h * w for h, w in scales]
    summed = None
    for s in range(len(scales)):
        # the real generation step, for the 3 images at once: bits -> codes -> sum -> next input -> word_embed
        summed, x = advance(model, vae, summed, q.bits[s], SCHEDULE, s, rows=1)
        if x is not None:
            assert torch.equal(x, model.embed_tokens(q.inputs[s]))
            assert torch.equal(vae.next_input(summed, scales[s + 1]), q.inputs[s])
    assert torch.equal(summed, q.summed)
    # targets are the signs of the residual (area-downsampled but at the last scale)
    prev = None
    for s, hw in enumerate(scales):
        resid = f if prev is None else f - prev
        if s < len(scales) - 1:
            resid = torch.nn.functional.interpolate(resid, size=hw, mode="area")
        assert torch.equal(q.bits[s], (resid > 0).flatten(2).transpose(1, 2).to(torch.uint8))
        codes = vae.bits_to_codes(q.bits[s], hw)
        prev = vae.accumulate(prev, codes, scales[-1], s == len(scales) - 1)
    # residual quantization makes progress
    assert (f - q.summed).norm() < 0.7 * f.norm()  # white noise: the hardest latent


def test_quantizer_flips_feed_corrupted_sums_and_keep_clean_targets():
    """Bitwise self-correction: a scale's flipped bits enter the sum; its target stays the clean bits, and the
    later scales' targets are the signs of the residual against the corrupted sum (they correct the error)."""
    vae = BSQVAE(TINY_VAE)
    scales = SCHEDULE.scales
    f = torch.randn(2, 16, *scales[-1], generator=torch.Generator().manual_seed(3))
    clean = multiscale_quantize(vae, f, scales, keep_sums=True)
    q = multiscale_quantize(vae, f, scales, torch.tensor([0.0, 0.3]), torch.Generator().manual_seed(4), keep_sums=True)
    for s, hw in enumerate(scales):  # row 0 (p = 0) is the clean run
        assert torch.equal(q.bits[s][0], clean.bits[s][0]) and torch.equal(q.sums[s][0], clean.sums[s][0])
    assert torch.equal(q.bits[0][1], clean.bits[0][1]) and not torch.equal(q.sums[0][1], clean.sums[0][1])
    for s, hw in enumerate(scales):
        prev = q.sums[s - 1] if s else torch.zeros_like(f)
        resid = f - prev
        if s < len(scales) - 1:
            resid = torch.nn.functional.interpolate(resid, size=hw, mode="area")
            assert torch.equal(q.inputs[s], vae.next_input(q.sums[s], scales[s + 1]))
        assert torch.equal(q.bits[s], (resid > 0).flatten(2).transpose(1, 2).to(torch.uint8))
        if 0 < s < len(scales) - 1:  # about 30% of the bits entered flipped
            added = vae.bits_to_codes(q.bits[s], hw)
            up = vae.accumulate(None, added, scales[-1], False)
            assert not torch.equal(q.sums[s][1] - prev[1], up[0])


# ---- training forward == inference forward (float64) ------------------------------------------------------------


@pytest.mark.parametrize("num_scales", [4, 7])
def test_training_forward_equals_inference_forward(num_scales):
    model = random_model(TEST_SMALL, 5)
    vae = BSQVAE(TINY_VAE)
    scales = SCHEDULE.scales[:num_scales]
    lens, Lt = [9, 14, 5], 16
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(len(lens), Lt, TEST_SMALL.text_dim, generator=g, dtype=torch.float64) * 0.5
    mask = torch.arange(Lt)[None] < torch.tensor(lens)[:, None]
    f = torch.randn(len(lens), 16, *scales[-1], generator=g, dtype=torch.float64)
    q = multiscale_quantize(vae, f, scales, torch.tensor([0.0, 0.1, 0.2]), torch.Generator().manual_seed(7))
    drop = torch.tensor([False, False, True])  # row 2: CFG's unconditional text
    feats = with_uncond(model, feats, drop)
    layout = make_layout(TEST_SMALL, scales, SCHEDULE.rope_grid, "cpu", torch.float64)
    logits = forward_train(model, layout, torch.cat(q.inputs, 1), feats, mask)
    assert logits.dtype == torch.float64 and logits.shape == (3, layout.total, 2 * TEST_SMALL.d_vae)
    for row, n in enumerate(lens):
        # inference: the unchanged model code, one row, dense KV, scale by scale
        row_feats = model.uncond_text(n) if drop[row] else feats[row, :n]
        text = model.encode_text(row_feats, [n])
        kv = DenseKV(1, TEST_SMALL.depth)
        x = model.start_tokens(text.cond)
        for s, hw in enumerate(scales):
            kv.begin([hw[0] * hw[1]])
            out = model(x, make_batch(model, text, [(s, hw, SCHEDULE.rope_grid)]), kv)
            a, b = layout.offsets[s], layout.offsets[s] + layout.lengths[s]
            torch.testing.assert_close(logits[row, a:b], out, **TOL)
            if s + 1 < len(scales):
                x = model.embed_tokens(q.inputs[s][row])


def test_block_causal_mask_holds():
    """Changing the input of scale s leaves the logits of scales < s alone and changes scale s."""
    model = random_model(TEST_SMALL, 8)
    vae = BSQVAE(TINY_VAE)
    scales = SCHEDULE.scales[:5]
    layout = make_layout(TEST_SMALL, scales, SCHEDULE.rope_grid, "cpu", torch.float64)
    f = torch.randn(1, 16, *scales[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    tokens = torch.cat(multiscale_quantize(vae, f, scales).inputs, 1)
    feats = torch.randn(1, 6, TEST_SMALL.text_dim, dtype=torch.float64)
    mask = torch.ones(1, 6, dtype=torch.bool)
    base = forward_train(model, layout, tokens, feats, mask)
    s = 3
    changed = tokens.clone()
    changed[:, layout.offsets[s] - 1] += 1.0  # token 0 of scale s (tokens start at scale 1)
    out = forward_train(model, layout, changed, feats, mask)
    torch.testing.assert_close(out[:, : layout.offsets[s]], base[:, : layout.offsets[s]], **TOL)
    assert (out[:, layout.offsets[s]:] - base[:, layout.offsets[s]:]).abs().max() > 1e-3


# ---- optimisation smoke ------------------------------------------------------------------------------------------

SMALL = ModelConfig(name="train-smoke", depth=2, width=64, num_heads=2, d_vae=16, text_dim=64, text_maxlen=128,
                    block_chunks=2, pool_head_dim=16, vae="tiny", text_encoder="tiny")
SMALL_SCALES = ((1, 1), (2, 2), (4, 4))  # 64x64 pictures with stride 16


def test_a_few_steps_reduce_the_losses():
    torch.manual_seed(0)
    scenes = sample_scenes(8, 21)
    # VAE: encoder + decoder + quantizer, on 32x32 pictures (a 2x2 latent)
    images = render(scenes[:4], 32) * 2 - 1
    vae, encoder = BSQVAE(TINY_VAE), Encoder(16, 16)
    opt = torch.optim.Adam(list(encoder.parameters()) + list(vae.decoder.parameters()), lr=3e-3)
    vae_losses = []
    for _ in range(15):
        f = encoder(images)
        q = multiscale_quantize(vae, f.detach(), ((1, 1), (2, 2)))
        loss, _ = vae_loss(vae.decoder(straight_through(f, q.summed)), images, f, q.summed)
        opt.zero_grad()
        loss.backward()
        opt.step()
        vae_losses.append(loss.item())
    assert np.mean(vae_losses[-3:]) < 0.9 * np.mean(vae_losses[:3]), vae_losses
    # transformer + T5 on fixed targets
    model = Infinity(SMALL)
    init_weights(model)
    t5 = TextEncoder.load(TEXT_ENCODER_PRESETS["tiny"]).model.requires_grad_(True)
    ids, lens = prompt_tokens(scenes.prompts, 128, ByteTokenizer())
    ids = torch.from_numpy(ids.astype(np.int64))[:, :lens.max()]
    mask = torch.arange(ids.shape[1])[None] < torch.from_numpy(lens)[:, None]
    f = torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(23))
    q = multiscale_quantize(vae, f, SMALL_SCALES)
    layout = make_layout(SMALL, SMALL_SCALES, (4, 4), "cpu")
    weights = scale_weights(layout, 0.5, "cpu")
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    opt = torch.optim.AdamW(param_groups([(model, 1.0), (t5, 1.0)], 0.01), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = forward_train(model, layout, torch.cat(q.inputs, 1), text_features(t5, ids, mask), mask)
        loss, acc = bit_loss(logits, torch.cat(q.bits, 1), weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # zero-initialised head
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


def test_training_loops_run_and_respect_their_budget(tmp_path):
    scenes = sample_scenes(64, 22)
    vae, encoder = BSQVAE(TINY_VAE), Encoder(16, 16)
    stats = train_vae(vae, encoder, scenes, SMALL_SCALES,
                      VAETrainConfig(minutes=0.03, batch_size=4, image_size=64, log_every=1000), torch.device("cpu"))
    assert stats["step"] >= 1 and stats["seconds"] < 10
    model = Infinity(SMALL)
    init_weights(model)
    text = TextEncoder.load(TEXT_ENCODER_PRESETS["tiny"])
    cfg = TransformerTrainConfig(minutes=0.03, batch_size=4, image_size=64, log_every=1000)
    state = train_transformer(model, text, vae, encoder, scenes, SMALL_SCALES, (4, 4), cfg, torch.device("cpu"),
                              tmp_path / "ckpt.pt")
    assert state.step >= 1 and math.isfinite(state.loss) and state.seconds < 10 and not state.stopped
    assert (tmp_path / "ckpt.pt").is_file()


# ---- text encoder warm-up --------------------------------------------------------------------------------------


def test_scene_targets_put_each_object_in_its_region():
    scenes = sample_scenes(200, 5)
    t = scene_targets(scenes)
    for i in range(len(scenes)):
        spec = scenes.spec(i)
        assert COLOUR_NAMES[t["background"][i]] == spec.background
        named = {REGIONS.index(o.region): o for o in spec.objects}
        for r in range(len(REGIONS)):
            if r in named:
                o = named[r]
                assert (COLOUR_NAMES[t["colour"][i, r]], SHAPES[t["shape"][i, r]], SIZES[t["size"][i, r]]) == (
                    o.colour, o.shape, o.size)
            else:  # 'nothing' is the last class of each
                assert (t["colour"][i, r], t["shape"][i, r], t["size"][i, r]) == (8, 3, 3)
    exact = {k: torch.from_numpy(v) for k, v in t.items()}
    one_hot = {k: torch.nn.functional.one_hot(v, 11 if k == "background" else 9).float() for k, v in exact.items()}
    assert prompt_accuracy(one_hot, exact) == 1.0
    one_hot["shape"][3] = one_hot["shape"][3].roll(1, dims=-1)  # one prompt wrong in every region
    assert prompt_accuracy(one_hot, exact) == pytest.approx(1 - 1 / len(scenes))


def test_text_warm_up_learns_to_parse_prompts():
    torch.manual_seed(0)
    text = TextEncoder.load(presets.TEXT_ENCODER, tokenizer=WordTokenizer(VOCABULARY))
    scenes, held_out = sample_scenes(2000, 31), sample_scenes(200, 32)

    def tokens(s):
        ids, lens = prompt_tokens(s.prompts, presets.TEXT_ENCODER.max_length, text.tokenizer)
        mask = torch.arange(int(lens.max()))[None] < torch.from_numpy(lens)[:, None]
        return torch.from_numpy(ids[:, :int(lens.max())].astype(np.int64)), mask

    cfg = TextPretrainConfig(minutes=5, batch_size=64, eval_every=50, target_accuracy=0.3)
    stats = pretrain_text_encoder(text.model, *tokens(scenes), scenes, *tokens(held_out), held_out, cfg)
    # a random parse gets the background and 9 regions all right with probability ~0; 30% needs word order
    assert stats["held_out_parse_accuracy"] >= 0.3, stats


# ---- export and load --------------------------------------------------------------------------------------------


def test_exported_weights_load_into_varserve_by_key_name(tmp_path):
    model_cfg, vae_cfg, text_cfg = presets.MODEL, presets.VAE, presets.TEXT_ENCODER
    torch.manual_seed(0)
    model = Infinity(model_cfg)
    init_weights(model)
    with torch.no_grad():  # non-zero everywhere, so a mixed-up key shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    vae = BSQVAE(vae_cfg)
    text = TextEncoder.load(text_cfg, tokenizer=WordTokenizer(VOCABULARY))
    sizes = export(tmp_path, model, vae, text, {"training": {"note": "test"}})
    assert sum(sizes.values()) < 20e6  # weights of the shipped size: under 20 MB
    # transformer: varserve's strict loader, official key layout
    state = load_transformer_state_dict(tmp_path / "transformer.safetensors")
    fresh = Infinity(model_cfg)
    load_into(fresh, state)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a.to(torch.bfloat16).float(), b, rtol=0, atol=0, msg=name)
    # VAE: the whole BSQVAE state, read back strictly by varserve's VAE loader in fp32
    vae_state = load_transformer_state_dict(tmp_path / "vae.safetensors")
    assert set(vae_state) == set(BSQVAE(vae_cfg).state_dict())
    _, loaded, loaded_vae, loaded_text = load_trained(tmp_path, torch.device("cpu"))
    for a, b in zip(vae.state_dict().values(), loaded_vae.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.to(torch.bfloat16).float(), b)
    # text encoder: same features as the saved (bf16-rounded) one
    text.model.to(torch.bfloat16).float()
    prompt = "a red circle at the top left on a white background"
    torch.testing.assert_close(loaded_text.encode([prompt]).features, text.encode([prompt]).features)
    # and the real generation path runs on it
    image, bits = generate_dense(loaded, loaded_vae, loaded_text, prompt, get_schedule(1.0, 256),
                                 ScaleSampling(cfg=4.0, tau=1.0, top_p=0.97), seed=0)
    assert image.shape == (256, 256, 3) and image.dtype == torch.uint8 and len(bits) == 7


def test_preset_lines_build_the_shipped_configs():
    text = presets.preset_lines()
    scope = {"ModelConfig": ModelConfig, "VAEConfig": VAEConfig, "TextEncoderConfig": TextEncoderConfig,
             "WeightFiles": WeightFiles}
    found = [eval("{" + section + "}", scope) for section in re.split(r"^# .*\n", text, flags=re.M)[1:]]
    # the lines are what the serving registries hold: the tiny model, its weights in the package
    model = found[0]["tiny"]
    shipped = get_config("tiny")  # plus the sampling its evaluation chose, which training does not set
    assert replace(model, sampling=shipped.sampling) == shipped and replace(model, weights=None) == presets.MODEL
    assert model.weights == WeightFiles("tiny", "transformer.safetensors", "vae.safetensors", "text_encoder",
                                        in_package=True)
    assert found[1:] == [{"shapes": VAE_PRESETS["shapes"]}, {"shapes": TEXT_ENCODER_PRESETS["shapes"]}]
    assert found[1:] == [{"shapes": presets.VAE}, {"shapes": presets.TEXT_ENCODER}]
    assert presets.registered_or_local() == (shipped, presets.VAE, presets.TEXT_ENCODER)
    with pytest.raises(ValueError, match="model preset 'tiny' is registered with other values"):
        presets.registered_or_local(replace(presets.MODEL, width=512))
    sched = presets.schedule()
    assert sched.num_scales == 10 and sched.total_tokens == 2521 and sched.scales[-1] == (32, 32)
    assert sched.image_size == (512, 512) and presets.VAE.stride == 16
    assert presets.MODEL.d_vae == presets.VAE.token_bits and presets.MODEL.text_dim == presets.TEXT_ENCODER.d_model
