"""Where the device idles and what the host does meanwhile: runs requests through the engine under torch.profiler,
the steps unsynchronised as the engine runs them, and prints per step the device's busy and idle time (kernel
intervals between one step's start and the next's), the largest gaps with the engine functions the host was in
during each, then the top kernels. Diagnostic only (no JSON): numbers to quote come from `varserve bench`.

    python benchmarks/profile_step.py --model infinity-2b --random-weights --requests 64

Profiling slows the host a little, so gaps are somewhat longer than in an unprofiled run; the run is also timed
once without the profiler first.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from varserve import Engine, SamplingParams
from varserve.benchmark import bench_prompts
from varserve.cache.block_manager import BlockManager
from varserve.model_runner import ModelRunner

HOST_LABEL = "host:"
TRACED = {  # the host functions a gap is attributed to
    Engine: ("_schedule", "_collect", "_advance"),
    ModelRunner: ("_encode", "plan", "_forward", "_sample", "_decode", "collect"),
    BlockManager: ("plan_step",),
}


def merge_intervals(spans: list[tuple[float, float]]) -> np.ndarray:
    """Disjoint, sorted `[n, 2]` union of (start, end) intervals."""
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return np.asarray(merged, dtype=np.float64).reshape(-1, 2)


def busy_between(merged: np.ndarray, start: float, end: float) -> float:
    """Length of the union `merged` (from merge_intervals) inside [start, end]."""
    clipped = np.clip(merged, start, end)
    return float((clipped[:, 1] - clipped[:, 0]).sum())


def largest_gaps(merged: np.ndarray, count: int) -> list[tuple[float, float]]:
    """(start, length) of the `count` longest gaps between consecutive busy intervals, longest first."""
    lengths = merged[1:, 0] - merged[:-1, 1]
    order = np.argsort(-lengths, kind="stable")[:count]
    return [(float(merged[i, 1]), float(lengths[i])) for i in order]


def spans_during(spans: list[tuple[float, float, str]], start: float, end: float) -> list[tuple[str, float]]:
    """(name, overlap) of the spans overlapping [start, end], in start order."""
    return [(name, min(e, end) - max(s, start)) for s, e, name in sorted(spans) if s < end and e > start]


def _traced(fn):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        with record_function(HOST_LABEL + fn.__name__):
            return fn(*args, **kwargs)
    return inner


def trace_host_functions() -> None:
    for cls, names in TRACED.items():
        for name in names:
            setattr(cls, name, _traced(getattr(cls, name)))


def run(engine: Engine, prompts: list[str], params: SamplingParams) -> tuple[float, list[list[int]]]:
    """Run the prompts to the end, each step labelled; (seconds, the scales each step ran)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params.updated(seed=i))
    torch.cuda.synchronize()
    start, scales, step = time.perf_counter(), [], 0
    while engine.has_unfinished_requests():
        scales.append(sorted({r.scale for r in engine.scheduler.running}))
        with record_function(f"step {step}"):
            engine.step()
        step += 1
    torch.cuda.synchronize()
    return time.perf_counter() - start, scales


def is_device_work(event) -> bool:
    """Kernels, copies and memsets. Device-side ranges of record_function labels (the steps, the traced host
    functions) span their kernels and the gaps between them, so counting them hid most of the idle time; CUPTI's
    "Command Buffer Full" marks the host waiting for room in the launch queue."""
    return event.device_type.name == "CUDA" and not event.is_user_annotation and event.name != "Command Buffer Full"


def gap_histogram(merged: np.ndarray) -> str:
    """Idle time between busy intervals by gap length: many short gaps mean kernels outran their launches."""
    gaps = merged[1:, 0] - merged[:-1, 1]
    edges = [0, 20, 100, 1000, 10000, np.inf]  # microseconds
    bins = [(lo, hi, gaps[(gaps >= lo) & (gaps < hi)]) for lo, hi in zip(edges[:-1], edges[1:])]
    parts = [f"{lo:g}-{hi:g} us: {len(g)} gaps, {g.sum() / 1e6:.3f} s" for lo, hi, g in bins]
    return "idle by gap length: " + "; ".join(parts)


def report(prof: profile, scales: list[list[int]], top_gaps: int) -> None:
    events = prof.events()
    kernels = merge_intervals([(e.time_range.start, e.time_range.end) for e in events if is_device_work(e)])
    cpu = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type.name == "CPU"]
    steps = sorted((s, e) for s, e, name in cpu if name.startswith("step "))
    bounds = [s for s, _ in steps] + [float(kernels[-1, 1])]
    print(f"{'step':>4} {'scales':28} {'host ms':>8} {'window ms':>9} {'busy ms':>8} {'idle ms':>8}")
    idle = 0.0
    for i, ((s, e), ran) in enumerate(zip(steps, scales)):
        window, busy = bounds[i + 1] - bounds[i], busy_between(kernels, bounds[i], bounds[i + 1])
        idle += window - busy
        print(f"{i:>4} {str(ran)[:28]:28} {(e - s) / 1e3:8.1f} {window / 1e3:9.1f} {busy / 1e3:8.1f} "
              f"{(window - busy) / 1e3:8.1f}")
    print(f"device idle {idle / 1e6:.3f} s of {(bounds[-1] - bounds[0]) / 1e6:.3f} s")
    print(gap_histogram(kernels))
    host = [span for span in cpu if span[2].startswith(HOST_LABEL)]
    for start, length in largest_gaps(kernels, top_gaps):
        inside = ", ".join(f"{name[len(HOST_LABEL):]} {overlap / 1e3:.0f} ms"
                           for name, overlap in spans_during(host, start, start + length))
        at = (start - bounds[0]) / 1e6
        print(f"gap {length / 1e3:7.1f} ms at {at:6.2f} s: host in {inside or '(untraced code)'}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--kv-policy", default="full")
    ap.add_argument("--kv-budget", type=float, default=1.0)
    ap.add_argument("--kv-calibration", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--top-gaps", type=int, default=12)
    ap.add_argument("--trace", default=None, help="write a chrome trace here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py measures device idle time: it needs a CUDA device")
    engine = Engine(args.model, random_weights=args.random_weights, kv_policy=args.kv_policy,
                    kv_budget=args.kv_budget, kv_calibration=args.kv_calibration, max_num_seqs=args.max_num_seqs)
    params = SamplingParams(size=args.size, cfg=4.0, tau=1.0)
    engine.generate(bench_prompts(2), params.updated(seed=99), use_tqdm=False)  # warm-up
    prompts = bench_prompts(args.requests)
    seconds, _ = run(engine, prompts, params)
    print(f"unprofiled: {seconds:.2f} s, {len(prompts) / seconds:.3f} images/s")
    trace_host_functions()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds, scales = run(engine, prompts, params)
    print(f"profiled: {seconds:.2f} s")
    report(prof, scales, args.top_gaps)
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
