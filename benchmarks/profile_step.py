"""Where a step's time goes: runs a few engine steps under torch.profiler and prints the top device
kernels and host functions. Diagnostic only (no JSON): numbers to quote come from `varserve bench`.

    python benchmarks/profile_step.py --model infinity-2b --random-weights --requests 8 --steps 13
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from varserve import Engine, SamplingParams
from varserve.benchmark import bench_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--kv-policy", default="full")
    ap.add_argument("--kv-budget", type=float, default=1.0)
    ap.add_argument("--trace", default=None, help="write a chrome trace here")
    args = ap.parse_args()
    engine = Engine(args.model, random_weights=args.random_weights, kv_policy=args.kv_policy, kv_budget=args.kv_budget)
    engine.generate(bench_prompts(1), SamplingParams(size=args.size, seed=0), use_tqdm=False)  # warm-up
    for i, prompt in enumerate(bench_prompts(args.requests)):
        engine.add_request(prompt, SamplingParams(size=args.size, seed=i))
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - start)
    print("step wall times (s):", " ".join(f"{w:.3f}" for w in walls), f"total {sum(walls):.2f}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
