"""`varserve eval-fidelity`: how far each KV policy's images drift from the full-cache image, and what they cost.

Prompts and their structured specs come from `varserve.training.data.sample_scenes(N, EVAL_SEED_OFFSET)`
(varserve.training.train's offset: the held-out scenes of the training run, `examples/train_tiny.py`, at its
default --seed), so the analytic checker `check_images` can score every image. Image i uses sampling seed
SEED+i under every policy. The full-cache image (kv_policy=full) is generated once per prompt; then, for each
(policy, budget), the same prompts and seeds are generated again and compared with it:

- PSNR on the RGB uint8 pixels (MSE over all pixels and channels, peak 255). Identical images have an infinite
  PSNR; it is reported as PSNR_CAP (99.0 dB), and every PSNR is capped there, so means stay finite.
- SSIM (Wang et al. 2004) on the luma Y = 0.299 R + 0.587 G + 0.114 B (0..255): an 11x11 Gaussian window of
  sigma 1.5, C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, 'valid' filtering (no padding), the mean of the SSIM map.
  Identical images give exactly 1.0.
- prompt accuracy: `summarize(...)["prompt_acc"]` of the checker (every object's colour and shape in its region
  and the right background); the checker's other accuracies are in the JSON too. Also for the full cache.
- measured KV: each image's `metrics.peak_kv_pages` (the most pages it held at once, all rows, layers and
  heads), averaged over the images, and the same in MiB (pages x page bytes).

Policies run one engine at a time (each engine sizes its own page pool; two at once would not fit on a GPU).
`heatkv` needs a calibration file (`--kv-calibration`, from `varserve calibrate --policy heatkv`) unless the model
ships one (`tiny` does): without either it is skipped, with the reason printed and recorded under `skipped`. A calibration file is passed only to
the policy it was made for (its "policy" key). The `full` policy has one row, at budget 1.0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import math
import re
import shlex
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger("varserve")

PSNR_CAP = 99.0  # dB, reported for identical images (and the cap of every PSNR)
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
DEFAULT_POLICIES = "full,scalekv,heatkv,window,streaming"
DEFAULT_BUDGETS = "0.2,0.1,0.04"
_LUMA = (0.299, 0.587, 0.114)


# ---- metrics --------------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 pictures [H, W, 3] (peak 255), capped at PSNR_CAP (identical: PSNR_CAP)."""
    if a.shape != b.shape:
        raise ValueError(f"pictures differ in shape: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return PSNR_CAP
    return min(PSNR_CAP, 10.0 * math.log10(255.0**2 / mse))


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g)[None, None]  # [1, 1, size, size]


def _luma(image: np.ndarray) -> torch.Tensor:
    rgb = torch.from_numpy(image.astype(np.float64))  # a copy: PIL arrays are read-only
    return (rgb * torch.tensor(_LUMA, dtype=torch.float64)).sum(-1)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 pictures [H, W, 3] on their luma (see the module docstring); in [-1, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"pictures differ in shape: {a.shape} vs {b.shape}")
    if a.shape[0] < SSIM_WINDOW or a.shape[1] < SSIM_WINDOW:
        raise ValueError(f"pictures smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window: {a.shape}")
    if np.array_equal(a, b):
        return 1.0
    x, y = _luma(a)[None, None], _luma(b)[None, None]
    w = _gaussian_window()
    mu_x, mu_y = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mu_x * mu_x
    syy = F.conv2d(y * y, w) - mu_y * mu_y
    sxy = F.conv2d(x * y, w) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    return float(smap.mean().clamp(-1.0, 1.0))


# ---- the run --------------------------------------------------------------------------------------------
def _calibration_policy(path: str | None) -> str | None:
    from varserve.cache.calibration import load_calibration

    return None if path is None else load_calibration(path)["policy"]


def plan_runs(policies: Sequence[str], budgets: Sequence[float], kv_calibration: str | None,
              shipped: Sequence[str] = ()) -> tuple[list[tuple[str, float, str | None]], list[dict]]:
    """(policy, budget, calibration) runs after the full reference, and the skipped policies with reasons.
    `shipped`: the policies whose calibration ships with the model (they run without --kv-calibration)."""
    from varserve.cache.policy import POLICIES

    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r} in --policies; available: {', '.join(POLICIES)}")
    for b in budgets:
        if not 0.0 < b <= 1.0:
            raise ValueError(f"--budgets must be in (0, 1], got {b:g}")
    calib_policy = _calibration_policy(kv_calibration)
    if calib_policy is not None and calib_policy not in policies:
        logger.warning("--kv-calibration is a %r calibration but %r is not in --policies: unused",
                       calib_policy, calib_policy)
    runs, skipped = [], []
    for p in dict.fromkeys(policies):  # in order, once each
        if p == "full":
            continue  # the reference, always run
        calib = kv_calibration if calib_policy == p else None
        if p == "heatkv" and calib is None and p not in shipped:
            reason = ("needs a heatkv calibration: give --kv-calibration PATH from `varserve calibrate --policy heatkv`"
                      if calib_policy is None else
                      f"--kv-calibration is a {calib_policy!r} calibration, not a heatkv one")
            skipped.append({"policy": p, "reason": reason})
            continue
        runs.extend((p, b, calib) for b in dict.fromkeys(budgets))
    return runs, skipped


def _shipped_calibrations(model: str) -> list[str]:
    from varserve.cache.calibration import POLICIES, calibration_for
    from varserve.models.config import PRESETS

    cfg = PRESETS.get(model)
    return [] if cfg is None else [p for p in POLICIES if calibration_for(p, cfg, None) is not None]


def _release_memory() -> None:
    """Give a finished engine's KV pool back to the device before the next engine sizes its own (the engine holds
    reference cycles, so dropping the last name is not enough)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_fidelity(
    model: str, *, size: str, num_prompts: int = 200, policies: Sequence[str] = DEFAULT_POLICIES.split(","),
    budgets: Sequence[float] = (0.2, 0.1, 0.04), kv_calibration: str | None = None, seed: int = 0,
    sampling: dict | None = None, engine_kwargs: dict | None = None, command: str | None = None,
    use_tqdm: bool = False, log=print,
) -> dict:
    """Run the evaluation (see the module docstring) and return a JSON-ready dict."""
    from varserve.benchmark import device_name, git_commit
    from varserve.engine import Engine
    from varserve.params import default_params
    from varserve.training.data import check_images, sample_scenes
    from varserve.training.train import EVAL_SEED_OFFSET

    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    runs, skipped = plan_runs(list(policies), list(budgets), kv_calibration, _shipped_calibrations(model))
    for s in skipped:
        log(f"skipping {s['policy']}: {s['reason']}")
    scenes = sample_scenes(num_prompts, EVAL_SEED_OFFSET)
    prompts, specs = scenes.prompts, scenes.specs()
    sampling = dict(sampling or {})
    params = [default_params(model, size=size, seed=seed + i, **sampling) for i in range(num_prompts)]
    engine_kwargs = dict(engine_kwargs or {})

    def run_engine(kwargs: dict) -> tuple[list, dict]:
        engine = Engine(model, **kwargs)
        outs = engine.generate(prompts, params, use_tqdm=use_tqdm)
        return outs, {"page_bytes": engine.runner.page_bytes, "page_size": engine.runner.page_size,
                      "device": engine.runner.device, "dtype": str(engine.runner.dtype).removeprefix("torch.")}

    def generate(policy: str, budget: float, calib: str | None) -> tuple[list[np.ndarray], list, dict]:
        kwargs = dict(engine_kwargs, kv_policy=policy, kv_budget=budget)
        if calib is not None:
            kwargs["kv_calibration"] = calib
        try:
            outs, info = run_engine(kwargs)
        finally:
            _release_memory()
        return [np.asarray(o.image.convert("RGB")) for o in outs], [o.metrics for o in outs], info

    def row(policy: str, budget: float, images: list[np.ndarray], metrics: list, page_bytes: int,
            reference: list[np.ndarray]) -> dict:
        _, acc = check_images(images, specs)
        p = [psnr(im, ref) for im, ref in zip(images, reference)]
        s = [ssim(im, ref) for im, ref in zip(images, reference)]
        pages = [m.peak_kv_pages for m in metrics]
        return {
            "policy": policy, "kv_budget": budget,
            "psnr_mean_db": float(np.mean(p)), "ssim_mean": float(np.mean(s)),
            "prompt_acc": acc["prompt_acc"], "checker": acc,
            "peak_kv_pages_mean": float(np.mean(pages)),
            "peak_kv_mib_mean": float(np.mean(pages)) * page_bytes / 2**20,
            "nominal_kv_mib_mean": float(np.mean([m.nominal_kv_bytes for m in metrics])) / 2**20,
            "identical_images": int(sum(np.array_equal(im, ref) for im, ref in zip(images, reference))),
            "psnr_db": p, "ssim": s, "peak_kv_pages": pages,
        }

    log(f"full cache: {num_prompts} images at {size}")
    ref_images, ref_metrics, info = generate("full", 1.0, None)
    rows = [row("full", 1.0, ref_images, ref_metrics, info["page_bytes"], ref_images)]
    for policy, budget, calib in runs:
        log(f"{policy} at budget {budget:g}: {num_prompts} images")
        images, metrics, run_info = generate(policy, budget, calib)
        rows.append(row(policy, budget, images, metrics, run_info["page_bytes"], ref_images))
    device = info["device"]
    return {
        "command": command, "device": str(device), "device_name": device_name(device), "git_commit": git_commit(),
        "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model, "size": size, "num_prompts": num_prompts, "seed": seed, "scene_seed": EVAL_SEED_OFFSET,
        "sampling": sampling, "engine": {k: v for k, v in engine_kwargs.items()}, "dtype": info["dtype"],
        "page_bytes": info["page_bytes"], "page_size": info["page_size"],
        "policies": list(policies), "budgets": list(budgets), "kv_calibration": kv_calibration,
        "psnr_cap_db": PSNR_CAP,
        "ssim_definition": f"luma (BT.601), {SSIM_WINDOW}x{SSIM_WINDOW} Gaussian sigma {SSIM_SIGMA}, "
                           f"K1={SSIM_K1}, K2={SSIM_K2}, L=255, valid filtering, mean of the map",
        "prompts": prompts, "skipped": skipped, "results": rows,
    }


def format_table(result: dict) -> str:
    header = ("policy", "budget", "PSNR dB", "SSIM", "accuracy", "peak KV MiB/img")
    body = [(r["policy"], f"{r['kv_budget']:g}", f"{r['psnr_mean_db']:.2f}", f"{r['ssim_mean']:.4f}",
             f"{r['prompt_acc']:.3f}", f"{r['peak_kv_mib_mean']:.2f}") for r in result["results"]]
    body += [(s["policy"], "-", "skipped", "", "", "") for s in result["skipped"]]
    widths = [max(len(x[i]) for x in (header, *body)) for i in range(len(header))]
    fmt = lambda cells: " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-+-".join("-" * w for w in widths)
    title = (f"fidelity vs full cache: {result['model']} {result['size']}, {result['num_prompts']} prompts, "
             f"seed {result['seed']} (PSNR of identical images = {result['psnr_cap_db']:g})")
    return "\n".join([title, fmt(header), rule, *map(fmt, body)])


def default_output_path(model: str, size: str) -> Path:
    from varserve.benchmark import results_path

    return results_path("fidelity", model, re.sub(r"[^A-Za-z0-9]+", "-", size))


# ---- command line ---------------------------------------------------------------------------------------
_ENGINE_OPTS = ("device", "dtype", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "page_size",
                "num_pages", "random_weights", "weights", "attention_backend", "cuda_graphs")
_SAMPLING_OPTS = ("cfg", "tau", "top_p")


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def _names(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def add_parser(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Register `varserve eval-fidelity` (cli.py's subcommands)."""
    p = subparsers.add_parser(
        "eval-fidelity", parents=parents, help="PSNR/SSIM/prompt accuracy of KV policies against the full cache",
        description="Generate procedural-scene prompts with the full cache, then with each KV policy and budget "
                    "(same prompts and seeds); print one table (PSNR, SSIM against the full-cache image, the "
                    "analytic checker's prompt accuracy, measured peak KV per image) and write a JSON file.")
    p.add_argument("--model", default="tiny", help="preset (tiny, infinity-2b, infinity-8b, ...) or weights path")
    p.add_argument("--weights", help="local folder or file of official weights (else downloaded)")
    p.add_argument("--random-weights", action="store_true", default=None, help="random weights, no download")
    p.add_argument("--size", default="1024x1024", help="image size (default: 1024x1024)")
    p.add_argument("--num-prompts", type=int, default=200, help="scene prompts (default: 200)")
    p.add_argument("--policies", type=_names, default=_names(DEFAULT_POLICIES),
                   help=f"comma-separated KV policies (default: {DEFAULT_POLICIES}); full is always run")
    p.add_argument("--budgets", type=_floats, default=_floats(DEFAULT_BUDGETS),
                   help=f"comma-separated kv budgets of the non-full policies (default: {DEFAULT_BUDGETS})")
    p.add_argument("--kv-calibration",
                   help="calibration JSON (varserve calibrate); without one heatkv uses the model's shipped one (tiny "
                        "has one) or is skipped")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i under every policy (default: 0)")
    p.add_argument("--output-json", type=Path,
                   help="result file (default: benchmarks/results/fidelity-<model>-<size>-<utc>.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("sampling and engine (defaults: the model's sampling, else SamplingParams / Engine)")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    g.add_argument("--tau", type=float, help="sampling temperature of the bits")
    g.add_argument("--top-p", type=float, help="top-p of the bits (0 disables)")
    from varserve.cli import engine_resource_args  # imported here: cli.py imports this module

    engine_resource_args(g)
    p.set_defaults(func=cmd_eval_fidelity)


def _command_line(args: argparse.Namespace) -> str:
    """The command as a canonical `varserve eval-fidelity ...` line, rebuilt from the parsed options."""
    parts = ["varserve", "eval-fidelity", "--model", args.model, "--size", args.size,
             "--num-prompts", str(args.num_prompts), "--policies", ",".join(args.policies),
             "--budgets", ",".join(f"{b:g}" for b in args.budgets), "--seed", str(args.seed)]
    for key in ("weights", "kv_calibration", *_SAMPLING_OPTS, *_ENGINE_OPTS):
        value = getattr(args, key, None)
        if value is None or value is False:
            continue
        parts += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    if args.output_json:
        parts += ["--output-json", str(args.output_json)]
    return shlex.join(parts)


def cmd_eval_fidelity(args: argparse.Namespace) -> int:
    from varserve.benchmark import write_json

    engine_kwargs = {k: getattr(args, k) for k in _ENGINE_OPTS if getattr(args, k, None) is not None}
    sampling = {k: getattr(args, k) for k in _SAMPLING_OPTS if getattr(args, k, None) is not None}
    result = run_fidelity(
        args.model, size=args.size, num_prompts=args.num_prompts, policies=args.policies, budgets=args.budgets,
        kv_calibration=args.kv_calibration, seed=args.seed, sampling=sampling, engine_kwargs=engine_kwargs,
        command=_command_line(args), use_tqdm=not args.no_progress,
    )
    path = write_json(result, args.output_json or default_output_path(args.model, args.size))
    print(format_table(result))
    print(f"results: {path}")
    return 0
