"""Seconds per image of the dense reference path at batch 1 (one request at a time, contiguous K/V).

    python benchmarks/bench_dense.py --model infinity-2b --random-weights --size 1024x1024 --images 3

Prints one table and writes JSON (command, device, git commit, every figure) to benchmarks/results/.
Text encoding is timed separately and reported both ways (the public reference's 1.14 s excludes T5).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import time

import torch

from varserve.benchmark import RESULTS_DIR, device_name, git_commit, write_json
from varserve.models.generation import ScaleSampling
from varserve.models.loader import load_model
from varserve.models.reference import generate_dense
from varserve.params import SamplingParams


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    m = load_model(args.model, device=device, dtype=dtype, random_weights=args.random_weights)
    params = SamplingParams(size=args.size, cfg=args.cfg)
    sampling = ScaleSampling(params.cfg, params.tau, params.top_p)
    prompt = "a red fox sitting in fresh snow at dawn"

    def one(seed: int) -> None:
        generate_dense(m.transformer, m.vae, m.text_encoder, prompt, params.schedule, sampling, seed)

    one(0)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    totals = [timed(device, lambda i=i: one(i + 1)) for i in range(args.images)]
    text = [timed(device, lambda: m.text_encoder.encode([prompt])) for _ in range(args.images)]
    result = {
        "benchmark": "dense_reference_batch1", "model": args.model, "random_weights": args.random_weights,
        "size": args.size, "cfg": args.cfg, "dtype": str(dtype).removeprefix("torch."), "images": args.images,
        "seconds_per_image": statistics.median(totals), "seconds_per_image_all": totals,
        "text_encoder_seconds": statistics.median(text),
        "seconds_per_image_without_text_encoder": statistics.median(totals) - statistics.median(text),
        "peak_extra_gpu_memory_bytes": (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else None,
        "device_name": device_name(device), "torch_version": torch.__version__, "varserve_git_commit": git_commit(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(result, args.out or RESULTS_DIR / f"dense-{args.model}-{stamp}.json")
    print(f"{'model / size':28} {args.model} / {args.size} (cfg {args.cfg:g}, {dtype})")
    print(f"{'seconds per image':28} {result['seconds_per_image']:.3f} s (all: {', '.join(f'{t:.3f}' for t in totals)})")
    print(f"{'  of which text encoder':28} {result['text_encoder_seconds']:.3f} s")
    print(f"{'  without text encoder':28} {result['seconds_per_image_without_text_encoder']:.3f} s (public reference 1.14 s)")
    if result["peak_extra_gpu_memory_bytes"] is not None:
        print(f"{'peak extra GPU memory':28} {result['peak_extra_gpu_memory_bytes'] / 2**30:.2f} GiB")
    print(f"{'json':28} {path}")
    return result


if __name__ == "__main__":
    main()
