"""One command: procedural data -> BSQ VAE -> transformer -> weights folder -> prompt accuracy of real generations.

    python -m varserve.training.train --out varserve/weights/tiny --minutes 20

Phases (each time-boxed; the transformer gets whatever the total budget leaves after the VAE, minus a reserve for
export and evaluation):
1. scenes: a fixed training set of `--num-scenes` scene specs and `--eval-prompts` held-out ones (other seed,
   prompts never in the training set), rendered on the device on demand (see data.py);
2. VAE: encoder + decoder + multi-scale BSQ (vae_train.py); checkpoint `<work>/vae.pt`;
3. text encoder warm-up (text_train.py): the small word-level encoder learns to parse prompts into scenes;
4. transformer (+ the text encoder unless --freeze-text-encoder): teacher forcing over all scales
   (transformer_train.py); checkpoint `<work>/transformer.pt` every few minutes;
5. export `<out>/{transformer.safetensors, vae.safetensors, text_encoder/, config.json}` (bf16 weights);
6. evaluation: the exported folder is loaded back with varserve's loaders and `reference.generate_dense` (full KV
   cache) draws the held-out prompts; the analytic checker scores the pictures (and, for scale, the ground-truth
   renders and their VAE reconstructions). A sample sheet goes to `<work>/samples_*.png`.

Why the text encoder is trained, and why it is not a T5: a random encoder's features hardly depend on word order
(swapping "red" and "blue" between two objects changes a token's features by ~1%), so a frozen one cannot tell which
colour goes with which region; and a small T5 trained from scratch learnt that binding too slowly (see
`SmallTextEncoder`). The shipped encoder is a `SmallTextEncoder` over a `WordTokenizer` of the prompts' 28 words;
it loads with `TextEncoder.load(config, folder)`.

Measured on one H100 (torch 2.11): the VAE at ~320 whole 512x512 pictures/s (batch 32; the first step compiles
for ~70 s); the text warm-up parses all held-out prompts after ~600 steps (10 s); the transformer at ~510 images/s
(batch 64, 2521 tokens each, peak 17.4 GiB); dense generation for the evaluation 0.2-0.5 s per image. With the
default 20 minutes: ~6.6 min of VAE, ~11 min of transformer (~5000 steps), ~1 min of export and evaluation.

`--resume` reuses `<work>/vae.pt` (skipping the VAE phase) and starts the transformer from `<work>/transformer.pt`.
`--eval-only` evaluates an existing `<out>` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from varserve.models.checkpoint import ResolvedWeights
from varserve.models.config import ModelConfig
from varserve.models.generation import ScaleSampling
from varserve.models.infinity import Infinity
from varserve.models.loader import load_files
from varserve.models.reference import generate_dense
from varserve.models.schedule import get_schedule
from varserve.models.text_encoder import TextEncoder, TextEncoderConfig, WordTokenizer
from varserve.models.vae import BSQVAE, VAEConfig
from varserve.training import presets
from varserve.training.common import Budget, autocast, log, param_count
from varserve.training.data import VOCABULARY, Scenes, check_images, image_grid, render, sample_scenes, to_uint8
from varserve.training.text_train import TextPretrainConfig, pretrain_text_encoder
from varserve.training.transformer_train import TransformerTrainConfig, init_weights, prompt_tokens, train_transformer
from varserve.training.vae_train import Encoder, VAETrainConfig, encode, multiscale_quantize, psnr, train_vae

EVAL_SEED_OFFSET = 1_000_003


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="varserve/weights/tiny", help="weights folder to write")
    p.add_argument("--work", default="out/train_tiny", help="checkpoints, scenes, logs, sample sheets")
    p.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget of the whole run")
    p.add_argument("--vae-minutes", type=float, default=None, help="default: 33%% of --minutes")
    p.add_argument("--transformer-minutes", type=float, default=None,
                   help="default: what --minutes leaves after the VAE and the reserve")
    p.add_argument("--reserve-minutes", type=float, default=1.5, help="kept for export and evaluation")
    p.add_argument("--num-scenes", type=int, default=200_000)
    p.add_argument("--eval-prompts", type=int, default=50)
    p.add_argument("--eval-settings", nargs="+", default=["4:1", "3:0.5"],
                   help="CFG:TAU pairs to evaluate (the first is the headline; 4:1 is SamplingParams' default)")
    p.add_argument("--eval-top-p", type=float, default=0.97)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-crop", type=int, default=0,
                   help="decoder trains on crops of this many latent cells (0: whole pictures; see vae_train.py)")
    p.add_argument("--pixel-budget", type=int, default=512, choices=[256, 512],
                   help="512: 10 scales, 2521 tokens, 512x512 (the shipped model); 256: 7 scales (smoke tests)")
    p.add_argument("--text-minutes", type=float, default=0.75, help="text encoder warm-up (ends early when done)")
    p.add_argument("--freeze-text-encoder", action="store_true",
                   help="keep the warmed-up text encoder fixed while the transformer trains")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--depth", type=int, default=None, help="override the preset (not the shipped model)")
    p.add_argument("--width", type=int, default=None, help="override the preset (not the shipped model)")
    return p.parse_args(argv)


# ---- export / load ----------------------------------------------------------------------------------------------


def _bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in state.items()}


def export(out: Path, model: Infinity, vae: BSQVAE, text: TextEncoder, extra: dict) -> dict[str, int]:
    """Write the weights folder; returns file sizes in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(_bf16(model.state_dict()), str(out / "transformer.safetensors"))
    save_file(_bf16(vae.state_dict()), str(out / "vae.safetensors"))
    text_dir = out / "text_encoder"
    text_model = text.model
    dtype = next(text_model.parameters()).dtype
    text_model.to(torch.bfloat16)
    text.save_pretrained(text_dir)
    text_model.to(dtype)
    meta = {**presets.config_dict(model.cfg, vae.config, text.config), **extra}
    (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    files = [p for p in out.rglob("*") if p.is_file()]
    return {str(p.relative_to(out)): p.stat().st_size for p in files}


def load_trained(folder: Path, device: torch.device, dtype: torch.dtype | None = None):
    """(model config, transformer, vae, text encoder) of a weights folder of any config.json, loaded by varserve's
    loader (bf16 transformer and fp16 text encoder on CUDA, fp32 on CPU; the VAE in fp32)."""
    meta = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig(**meta["model"])
    vcfg = VAEConfig(**{**meta["vae"], "ch_mult": tuple(meta["vae"]["ch_mult"])})
    tcfg = TextEncoderConfig(**meta["text_encoder"])
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    files = ResolvedWeights(folder / "transformer.safetensors", folder / "vae.safetensors", folder / "text_encoder")
    loaded = load_files(cfg, vcfg, tcfg, files, device, dtype)
    return cfg, loaded.transformer.requires_grad_(False), loaded.vae, loaded.text_encoder


# ---- evaluation -------------------------------------------------------------------------------------------------


def _settings(pairs: list[str]) -> list[tuple[float, float]]:
    out = []
    for pair in pairs:
        cfg, _, tau = pair.partition(":")
        out.append((float(cfg), float(tau or 1.0)))
    return out


def evaluate_folder(folder: Path, scenes: Scenes, pixel_budget: int, device: torch.device, settings: list[str],
                    top_p: float, seed: int, work: Path | None, budget: Budget | None = None) -> dict:
    """Prompt accuracy of full-cache dense generations of `scenes`' prompts with the exported weights."""
    _, model, vae, text = load_trained(folder, device)
    schedule = get_schedule(1.0, pixel_budget)
    specs = scenes.specs()
    results = {}
    for cfg, tau in _settings(settings):
        name = f"cfg{cfg:g}_tau{tau:g}"
        images, t0 = [], time.monotonic()
        params = ScaleSampling(cfg=cfg, tau=tau, top_p=top_p)
        for i, prompt in enumerate(scenes.prompts):
            if budget is not None and budget.over() and images:
                log(f"eval: out of time after {len(images)} prompts at {name}")
                break
            image, _ = generate_dense(model, vae, text, prompt, schedule, params, seed=seed + i)
            images.append(image.cpu().numpy())
        seconds = time.monotonic() - t0
        images = np.stack(images)
        checks, summary = check_images(images, specs[: len(images)])
        summary.update(prompts=len(images), seconds_per_image=seconds / len(images), cfg=cfg, tau=tau, top_p=top_p)
        results[name] = summary
        log(f"eval {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float)))
        if work is not None:
            image_grid(images[:32], 8).save(work / f"samples_{name}.png")
            with open(work / f"samples_{name}.txt", "w") as fh:
                for i, (p, c) in enumerate(zip(scenes.prompts, checks)):
                    fh.write(f"{i}\t{'OK ' if c.ok else 'BAD'}\t{p}\n")
        if budget is not None and budget.over():
            break
    return results


@torch.no_grad()
def reference_accuracy(scenes: Scenes, vae: BSQVAE, encoder: Encoder, scales, image_size: int,
                       device: torch.device, work: Path | None) -> dict:
    """Checker accuracy on ground-truth renders and on their VAE reconstructions (the ceiling for generations)."""
    out = {}
    gt = render(scenes, image_size, device)
    out["ground_truth"] = check_images(to_uint8(gt), scenes.specs())[1]
    recons = []
    for i in range(0, len(scenes), 16):
        f = encode(encoder, gt[i:i + 16], device)
        q = multiscale_quantize(vae, f, scales)
        with autocast(device):
            recons.append(vae.decode(q.summed).cpu())
    recon = torch.cat(recons).numpy()
    out["vae_reconstruction"] = check_images(recon, scenes.specs())[1]
    out["vae_psnr"] = psnr(torch.from_numpy(recon).permute(0, 3, 1, 2).float() / 127.5 - 1, gt.cpu() * 2 - 1)
    if work is not None:
        image_grid(np.concatenate([to_uint8(gt[:8]), recon[:8]]), 8).save(work / "vae_reconstructions.png")
    return out


# ---- phases -----------------------------------------------------------------------------------------------------


def _load_checkpoint(path: Path, model: Infinity, text_model: torch.nn.Module, device: torch.device) -> dict:
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    text_model.load_state_dict(state["text_encoder"])
    return state


def warm_up_text_encoder(text: TextEncoder, scenes: Scenes, eval_scenes: Scenes, max_length: int,
                         args: argparse.Namespace, device: torch.device) -> dict:
    def tokens(s: Scenes) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lengths = prompt_tokens(s.prompts, max_length, text.tokenizer)
        width = int(lengths.max())
        mask = np.arange(width)[None] < lengths[:, None]
        return torch.from_numpy(ids[:, :width].astype(np.int64)).to(device), torch.from_numpy(mask).to(device)

    cfg = TextPretrainConfig(minutes=args.text_minutes, seed=args.seed)
    stats = pretrain_text_encoder(text.model, *tokens(scenes), scenes, *tokens(eval_scenes), eval_scenes, cfg)
    log(f"text encoder: {stats['steps']} steps in {stats['seconds']:.0f} s, held-out prompts parsed "
        f"{stats['held_out_parse_accuracy']:.3f}")
    return stats


# ---- main -------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    total = Budget(args.minutes)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes throughout
    model_cfg, vae_cfg, text_cfg = presets.registered_or_local()
    if args.depth or args.width:
        depth = args.depth or model_cfg.depth
        chunks = depth if depth % model_cfg.block_chunks else model_cfg.block_chunks
        model_cfg = replace(model_cfg, name=f"{model_cfg.name}-custom", depth=depth,
                            width=args.width or model_cfg.width, block_chunks=chunks)
    schedule = get_schedule(1.0, args.pixel_budget)
    scales, image_size = schedule.scales, schedule.image_size[0]
    log(f"device {device}; {image_size}x{image_size}, {len(scales)} scales, {schedule.total_tokens} tokens; "
        f"budget {args.minutes:.1f} min")

    # 1. scenes
    t0 = time.monotonic()
    eval_scenes = sample_scenes(args.eval_prompts, args.seed + EVAL_SEED_OFFSET)
    train_scenes = sample_scenes(args.num_scenes, args.seed)
    held_out = set(eval_scenes.prompts)
    keep = np.array([p not in held_out for p in train_scenes.prompts])
    train_scenes = train_scenes[np.flatnonzero(keep)]
    train_scenes.save(work / "train_scenes.npz")
    eval_scenes.save(work / "eval_scenes.npz")
    counts = np.bincount(train_scenes.count, minlength=4)[1:]
    log(f"scenes: {len(train_scenes)} training ({counts.tolist()} with 1/2/3 objects; {(~keep).sum()} dropped as "
        f"held-out prompts), {len(eval_scenes)} held out; {time.monotonic() - t0:.1f} s")
    image_grid(to_uint8(render(train_scenes[:16], image_size, device)), 8).save(work / "data_examples.png")

    if args.eval_only:
        results = evaluate_folder(out, eval_scenes, args.pixel_budget, device, args.eval_settings,
                                  args.eval_top_p, args.seed, work)
        print(json.dumps(results, indent=2))
        return results

    # 2. VAE
    torch.manual_seed(args.seed)
    vae = BSQVAE(vae_cfg).to(device)
    encoder = Encoder(vae_cfg.codebook_dim, vae_cfg.stride).to(device)
    vae_ckpt = work / "vae.pt"
    if args.resume and vae_ckpt.is_file():
        state = torch.load(vae_ckpt, map_location=device, weights_only=True)
        vae.load_state_dict(state["vae"])
        encoder.load_state_dict(state["encoder"])
        vae_stats = state.get("stats", {})
        log(f"VAE: resumed from {vae_ckpt}")
    else:
        vae_minutes = args.vae_minutes if args.vae_minutes is not None else 0.33 * args.minutes
        vcfg = VAETrainConfig(minutes=vae_minutes, batch_size=args.vae_batch_size, lr=args.vae_lr,
                              image_size=image_size, crop=args.vae_crop, seed=args.seed, compile=not args.no_compile)
        vae_stats = train_vae(vae, encoder, train_scenes, scales, vcfg, device)
        torch.save({"vae": vae.state_dict(), "encoder": encoder.state_dict(), "stats": vae_stats}, vae_ckpt)
        log(f"VAE: saved {vae_ckpt}")
    vae.eval().requires_grad_(False)
    encoder.eval().requires_grad_(False)
    refs = reference_accuracy(eval_scenes, vae, encoder, scales, image_size, device, work)
    log(f"VAE reconstructions: PSNR {refs['vae_psnr']:.2f} dB, "
        f"prompt acc {refs['vae_reconstruction']['prompt_acc']:.3f} "
        f"(ground truth {refs['ground_truth']['prompt_acc']:.3f})")

    # 3. text encoder warm-up, 4. transformer
    torch.manual_seed(args.seed)
    model = Infinity(model_cfg).to(device)
    init_weights(model)
    text = TextEncoder.load(text_cfg, device=device, tokenizer=WordTokenizer(VOCABULARY))
    text_model = text.model.float()
    ckpt = work / "transformer.pt"
    text_stats = {}
    if args.resume and ckpt.is_file():
        state = _load_checkpoint(ckpt, model, text_model, device)
        log(f"transformer: resumed from {ckpt} (step {state['state']['step']})")
    else:
        text_stats = warm_up_text_encoder(text, train_scenes, eval_scenes, model_cfg.text_maxlen, args, device)
    t_minutes = args.transformer_minutes
    if t_minutes is None:
        t_minutes = total.left() / 60 - args.reserve_minutes
    tcfg = TransformerTrainConfig(minutes=max(t_minutes, 0.05), batch_size=args.batch_size, lr=args.lr,
                                  train_text_encoder=not args.freeze_text_encoder, image_size=image_size,
                                  compile=not args.no_compile, seed=args.seed)
    try:
        tstate = train_transformer(model, text, vae, encoder, train_scenes, scales, schedule.rope_grid, tcfg, device,
                                   ckpt)
    except Exception as err:  # keep what was learned: export the last checkpoint's weights
        log(f"transformer: training failed ({type(err).__name__}: {err})")
        if not ckpt.is_file():
            raise
        from varserve.training.transformer_train import TrainState
        tstate = TrainState(**_load_checkpoint(ckpt, model, text_model, device)["state"])
        tstate.stopped = f"{type(err).__name__}: {err}"
    if tstate.stopped and ckpt.is_file():  # a non-finite loss: go back to the last good checkpoint
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()):
            _load_checkpoint(ckpt, model, text_model, device)

    # 5. export
    training = {
        "data": {"train_scenes": len(train_scenes), "eval_scenes": len(eval_scenes), "seed": args.seed,
                 "image_size": image_size, "scales": [list(s) for s in scales], "tokens": schedule.total_tokens},
        "vae": vae_stats, "text_encoder": text_stats, "transformer": asdict(tstate), "transformer_config": asdict(tcfg),
        "params": {"transformer": param_count(model), "vae_decoder": param_count(vae.decoder),
                   "text_encoder": param_count(text_model), "vae_encoder_not_shipped": param_count(encoder)},
        "reference_accuracy": refs,
    }
    sizes = export(out, model, vae, text, {"training": training})
    log(f"exported {out}: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(sizes.items())))

    # 6. evaluation with the real generation path, from the exported files
    del model, text_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        results = evaluate_folder(out, eval_scenes, args.pixel_budget, device, args.eval_settings,
                                  args.eval_top_p, args.seed, work, budget=total)
    except Exception as err:  # the weights are written; say what failed and go on to the summary
        log(f"eval: failed ({type(err).__name__}: {err})")
        results = {"error": {"prompt_acc": float("nan"), "object_acc": float("nan"), "message": str(err)}}
    meta = json.loads((out / "config.json").read_text())
    meta["evaluation"] = results
    (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    summary = {
        "out": str(out), "minutes": total.elapsed / 60,
        "params_M": {k: round(v / 1e6, 3) for k, v in training["params"].items()},
        "weights_MiB": round(sum(sizes.values()) / 2**20, 2),
        "vae": {"psnr_db": round(refs["vae_psnr"], 2), "steps": vae_stats.get("step"),
                "images": vae_stats.get("images")},
        "transformer": {"steps": tstate.step, "images": tstate.images, "loss": tstate.loss,
                        "stopped": tstate.stopped or None},
        "prompt_accuracy": {k: v["prompt_acc"] for k, v in results.items()},
        "object_accuracy": {k: v["object_acc"] for k, v in results.items()},
        "ceiling": {"ground_truth": refs["ground_truth"]["prompt_acc"],
                    "vae_reconstruction": refs["vae_reconstruction"]["prompt_acc"]},
    }
    print("SUMMARY " + json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
