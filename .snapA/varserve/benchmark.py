"""Offline throughput benchmark (like `vllm bench throughput`): the measurement behind `varserve bench`.

`run_benchmark(engine, ...)` drives an engine through `add_request` / `step` and measures wall time,
throughput (images and scale tokens per second), per-image latency, KV pages and device memory. It returns
a flat, JSON-ready dict; `format_table` renders it and `write_json` saves it. Every key is described in
benchmarks/README.md. A data-parallel engine (`Engine(..., data_parallel_size=N)`) is measured the same way,
with the figures of each replica under `replicas`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import logging
import platform
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from varserve.engine import Engine
from varserve.model_runner import STAGES, StageTimer
from varserve.models.generation import num_rows
from varserve.outputs import ImageOutput
from varserve.parallel import DataParallelEngine
from varserve.params import MAX_SEED, SamplingParams

logger = logging.getLogger("varserve")

BATCHING_MODES = ("continuous", "static")
RESULTS_DIR = Path("benchmarks") / "results"

# Varied prompts (subjects, styles, lengths), cycled to make `num_prompts` requests.
BENCH_PROMPTS: tuple[str, ...] = (  # <= 60 bytes each: the test models' byte-level text encoder takes 128
    "a red fox sitting in fresh snow at dawn",
    "isometric floating island with a lighthouse",
    "portrait of an old fisherman, dramatic light, 85mm",
    "a bowl of ramen with a soft-boiled egg, steam rising",
    "neon cyberpunk street market at night in the rain",
    "watercolor painting of a lavender field",
    "a retro poster that says 'VISIT MARS'",
    "macro photo of a dewdrop on a spider web",
    "an astronaut riding a horse on the moon, oil painting",
    "a cat asleep on a pile of books in a cozy nook",
    "aerial view of a river through an autumn forest",
    "minimalist flat vector logo of a mountain and sun",
    "a medieval castle on a cliff above a stormy sea",
    "a glass teapot with blooming tea on a wooden table",
    "pixel art of a knight fighting a dragon",
    "a golden retriever puppy in a field of sunflowers",
)


@dataclass(frozen=True)
class _Job:
    index: int
    prompt: str
    params: SamplingParams


def bench_prompts(num_prompts: int) -> list[str]:
    """The first `num_prompts` of the built-in prompts, cycled (deterministic)."""
    return [BENCH_PROMPTS[i % len(BENCH_PROMPTS)] for i in range(num_prompts)]


def run_benchmark(
    engine: Engine, *, num_prompts: int = 64, params: SamplingParams | None = None, batching: str = "continuous",
    warmup: int = 1, exclude_text_encoder: bool = False, seed: int = 0, command: str | None = None,
    use_tqdm: bool = True,
) -> dict:
    """Generate `num_prompts` images of the built-in prompts and measure them.

    params: sampling parameters of every image (size, cfg, ...); image i gets seed `seed + i`.
    batching: 'continuous' submits every request at once and lets the engine admit them as pages and
        tokens allow; 'static' submits waves of `engine.config.max_num_seqs` requests, the next wave only
        after the previous one has fully finished.
    warmup: images generated (and discarded) before timing starts.
    exclude_text_encoder: the text encoder always runs inside the engine and is timed on its own; this
        only chooses whether the headline throughput (`throughput_time_s`) counts its time.
    Data parallel (N replicas): `warmup` images per replica, static waves of N * max_num_seqs, and the text
        encoder's time is the longest replica's (replicas encode at the same time).
    The engine should be idle: the benchmark steps it and consumes every output.
    Raises ValueError for bad arguments and RuntimeError if any image failed.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    params = params if params is not None else engine.default_params
    jobs = [_Job(i, p, params.updated(seed=seed + i)) for i, p in enumerate(bench_prompts(num_prompts))]
    replicas = engine.config.data_parallel_size
    _warmup(engine, params, warmup * replicas, seed)

    _on_replicas(engine, _start_measuring)
    wave = len(jobs) if batching == "continuous" else engine.config.max_num_seqs * replicas
    start = time.perf_counter()
    outputs, stats = _drive(engine, jobs, wave, use_tqdm)
    measured = _on_replicas(engine, _stop_measuring)
    elapsed = time.perf_counter() - start
    failed = [o for o in outputs if o.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outputs)} benchmark images failed; first: {failed[0].error}")
    return _report(engine, jobs, outputs, stats, elapsed, measured, batching, warmup * replicas, exclude_text_encoder,
                   seed, command)


def _warmup(engine: Engine, params: SamplingParams, n: int, seed: int) -> None:
    if n == 0:
        return
    t0 = time.perf_counter()
    prompts = [BENCH_PROMPTS[-1 - i % len(BENCH_PROMPTS)] for i in range(n)]
    engine.generate(prompts, [params.updated(seed=(seed + 10**9 + i) % MAX_SEED) for i in range(n)], use_tqdm=False)
    logger.info("warmup: %d image(s) in %.2f s", n, time.perf_counter() - t0)


def _start_measuring(engine: Engine) -> None:
    """In the engine's process: reset the KV and CUDA peaks and start timing the stages of every step."""
    device = engine.runner.device
    engine.allocator.reset_peak()
    if engine.runner.graphs is not None:
        engine.runner.graphs.steps = 0
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.runner.timer = StageTimer(device)


def _stop_measuring(engine: Engine) -> dict:
    """In the engine's process: wait for the device, stop timing, return this engine's figures."""
    runner = engine.runner
    _sync(runner.device)
    timed, runner.timer = runner.timer.report(), None
    return {
        "device": str(runner.device), "device_name": device_name(runner.device),
        "dtype": str(runner.dtype).removeprefix("torch."), "attention_backend": runner.backend,
        "max_num_batched_tokens": runner.max_num_batched_tokens, **timed,
        "text_encoder_time_s": timed["stage_time_s"]["text_encoder"],
        "peak_kv_pages": engine.allocator.peak_used,
        "cuda_graph_steps": None if runner.graphs is None else runner.graphs.steps,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(runner.device) if runner.device.type == "cuda"
        else None,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _on_replicas(engine: Engine, fn) -> dict[int, object]:
    """fn(engine) in every replica's process ({0: fn(engine)} for a single engine)."""
    return engine.run_on_replicas(fn) if isinstance(engine, DataParallelEngine) else {0: fn(engine)}


def _drive(engine: Engine, jobs: list[_Job], wave: int, use_tqdm: bool) -> tuple[list[ImageOutput], dict]:
    """Submit `jobs` in waves of `wave` (a wave only when the engine is idle) and step until all are done.
    In flight during a step = the requests it ran: those still running or decoding after it, or, when none runs
    on (then every image comes back at once), the images it returned."""
    pending, done = list(jobs), {}
    ids: dict[str, int] = {}
    served_by: dict[int, int] = {}  # job index -> replica index
    max_in_flight = steps = 0
    bar = tqdm(total=len(jobs), desc="bench", unit="img", disable=None if use_tqdm else True)
    while pending or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests():
            for job in pending[:wave]:
                rid = engine.add_request(job.prompt, job.params, request_id=f"bench-{job.index}")
                ids[rid] = job.index
                served_by[job.index] = engine.replica_of(rid) if isinstance(engine, DataParallelEngine) else 0
            pending = pending[wave:]
        outs = [o for o in engine.step() if o.request_id in ids]
        steps += 1
        stats = engine.cache_stats()
        max_in_flight = max(max_in_flight, stats["running"] + stats["decoding"] or len(outs))
        for out in outs:
            done[ids[out.request_id]] = out
        bar.update(len(outs))
    bar.close()
    return [done[j.index] for j in jobs], {"num_steps": steps, "max_in_flight": max_in_flight, "served_by": served_by}


def _report(
    engine: Engine, jobs: list[_Job], outputs: list[ImageOutput], stats: dict, elapsed: float,
    measured: dict[int, dict], batching: str, warmup: int, exclude_text_encoder: bool, seed: int, command: str | None,
) -> dict:
    cache, env = engine.cache_stats(), next(iter(measured.values()))
    rows = [num_rows(j.params.cfg, j.params.negative_prompt is not None) for j in jobs]
    image_tokens = sum(j.params.schedule.total_tokens for j in jobs)
    scale_tokens = sum(r * j.params.schedule.total_tokens for r, j in zip(rows, jobs))
    latencies = np.array([o.metrics.latency_s for o in outputs])
    runs = latencies - np.array([o.metrics.queue_s for o in outputs])
    t5_time = max(m["text_encoder_time_s"] for m in measured.values())
    throughput_time = elapsed - t5_time if exclude_text_encoder else elapsed
    n = len(outputs)
    peaks_gpu = [m["peak_gpu_memory_bytes"] for m in measured.values() if m["peak_gpu_memory_bytes"] is not None]
    first = jobs[0].params
    return {
        # vLLM `bench throughput` keys
        "elapsed_time": elapsed,
        "num_requests": n,
        "total_num_tokens": scale_tokens,
        "requests_per_second": n / throughput_time,
        "tokens_per_second": scale_tokens / throughput_time,
        # throughput
        "images_per_second": n / throughput_time,
        "scale_tokens_per_second": scale_tokens / throughput_time,
        "image_tokens": image_tokens,
        "image_tokens_per_second": image_tokens / throughput_time,
        "throughput_time_s": throughput_time,
        "text_encoder_included": not exclude_text_encoder,
        "text_encoder_time_s": t5_time,
        "images_per_second_with_text_encoder": n / elapsed,
        "images_per_second_without_text_encoder": n / (elapsed - t5_time),
        # latency
        "latency_mean_s": float(latencies.mean()),
        "latency_p50_s": float(np.percentile(latencies, 50)),
        "latency_p95_s": float(np.percentile(latencies, 95)),
        "latency_max_s": float(latencies.max()),
        "queue_mean_s": float(np.mean([o.metrics.queue_s for o in outputs])),
        "run_p50_s": float(np.percentile(runs, 50)),
        "run_p95_s": float(np.percentile(runs, 95)),
        "num_steps": stats["num_steps"],
        "max_images_in_flight": stats["max_in_flight"],
        "num_preemptions": sum(o.metrics.num_preemptions for o in outputs),
        # device time by stage (sums over data-parallel replicas)
        **_stage_figures(measured.values()),
        # memory (sums over data-parallel replicas, but peak GPU memory: the largest replica's)
        "peak_gpu_memory_bytes": max(peaks_gpu, default=None),
        "peak_kv_pages": cache["peak_used_pages"],
        "peak_kv_bytes": cache["peak_used_pages"] * cache["page_bytes"],
        "kv_pages_per_image_mean": float(np.mean([o.metrics.mean_kv_pages for o in outputs])),
        "kv_pages_per_image_peak": max(o.metrics.peak_kv_pages for o in outputs),
        "nominal_kv_bytes_per_image": max(o.metrics.nominal_kv_bytes for o in outputs),
        "kv_pool_pages": cache["total_pages"],
        "kv_pool_bytes": cache["kv_pool_bytes"],
        "page_size": cache["page_size"],
        "page_bytes": cache["page_bytes"],
        # configuration
        "model": engine.config.model,
        "size": first.schedule.name,
        "num_scales": first.schedule.num_scales,
        "rows_per_image": rows[0],
        "cfg": first.cfg,
        "tau": first.tau,
        "top_p": first.top_p,
        "seed": seed,
        "kv_policy": cache["kv_policy"],
        "kv_budget": cache["kv_budget"],
        "batching": batching,
        "max_num_seqs": engine.config.max_num_seqs,
        "max_num_batched_tokens": env["max_num_batched_tokens"],
        "warmup_images": warmup,
        "dtype": env["dtype"],
        # data parallel: one entry per replica (one for a single engine)
        "data_parallel_size": engine.config.data_parallel_size,
        "replicas": _replica_figures(measured, stats["served_by"], throughput_time),
        # environment
        "attention_backend": env["attention_backend"],
        "cuda_graph_steps": None if env["cuda_graph_steps"] is None
        else sum(m["cuda_graph_steps"] for m in measured.values()),
        "device": ",".join(m["device"] for m in measured.values()),
        "device_name": env["device_name"],
        "torch_version": torch.__version__,
        "varserve_git_commit": git_commit(),
        "command": command if command is not None else shlex.join(sys.argv),
        "timestamp_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _stage_figures(measured) -> dict:
    """Device seconds per stage, and the transformer's per scale, summed over replicas."""
    stages, by_scale, mixed = dict.fromkeys(STAGES, 0.0), Counter(), 0.0
    for m in measured:
        stages = {k: stages[k] + m["stage_time_s"][k] for k in STAGES}
        by_scale.update(m["transformer_time_s_by_scale"])
        mixed += m["transformer_time_s_mixed_steps"]
    return {"stage_time_s": stages, "device_time_s": sum(stages.values()),
            "transformer_time_s_by_scale": dict(sorted(by_scale.items(), key=lambda kv: int(kv[0]))),
            "transformer_time_s_mixed_steps": mixed}


def _replica_figures(measured: dict[int, dict], served_by: dict[int, int], throughput_time: float) -> list[dict]:
    served = Counter(served_by.values())
    return [{"replica": i, "device": m["device"], "images": served[i], "images_per_second": served[i] / throughput_time,
             "text_encoder_time_s": m["text_encoder_time_s"], "peak_kv_pages": m["peak_kv_pages"],
             "peak_gpu_memory_bytes": m["peak_gpu_memory_bytes"]} for i, m in measured.items()]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def git_commit() -> str:
    """$VARSERVE_GIT_COMMIT when set (a tree copied elsewhere: inside another checkout git would name that
    one's HEAD); else HEAD of the checkout varserve runs from ('-dirty' appended with uncommitted changes), or
    'unknown' outside any checkout."""
    if os.environ.get("VARSERVE_GIT_COMMIT"):
        return os.environ["VARSERVE_GIT_COMMIT"]
    cwd = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha or "unknown"


def default_output_path(model: str, kv_policy: str, batching: str) -> Path:
    """benchmarks/results/bench-<model>-<policy>-<batching>-<utc timestamp>.json (relative to the cwd)."""
    return results_path("bench", model, kv_policy, batching)


def results_path(kind: str, model: str, *parts: str) -> Path:
    """benchmarks/results/<kind>-<model>-<parts>-<utc timestamp>.json (relative to the cwd), names made safe."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model).name).strip("-") or "model"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return RESULTS_DIR / "-".join([kind, name, *parts, stamp + ".json"])


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def format_table(r: dict) -> str:
    """One table of the headline numbers of a `run_benchmark` result."""
    gib = 2**30
    t5 = "included" if r["text_encoder_included"] else "excluded"
    per_replica = [("  per replica", ", ".join(f"#{p['replica']} {p['images_per_second']:.3f} ({p['images']} images)"
                                               for p in r["replicas"]))] if r["data_parallel_size"] > 1 else []
    peak_gpu = "n/a (not CUDA)" if r["peak_gpu_memory_bytes"] is None else f"{r['peak_gpu_memory_bytes'] / gib:.2f} GiB"
    lines = [
        ("model / size / cfg", f"{r['model']} / {r['size']} ({r['num_scales']} scales) / {r['cfg']:g} "
                               f"({r['rows_per_image']} rows)"),
        ("kv policy / budget", f"{r['kv_policy']} / {r['kv_budget']:g}"),
        ("batching", f"{r['batching']} (max_num_seqs {r['max_num_seqs']}, "
                     f"max_num_batched_tokens {r['max_num_batched_tokens']})"),
        ("device / dtype / attention", f"{r['device_name']} / {r['dtype']} / {r['attention_backend']}"),
        ("images", f"{r['num_requests']} (after {r['warmup_images']} warmup)"),
        ("wall time", f"{r['elapsed_time']:.2f} s (text encoder {r['text_encoder_time_s']:.2f} s, {t5})"),
        ("throughput", f"{r['images_per_second']:.3f} images/s (text encoder {t5})"),
        *per_replica,
        ("  with / without text encoder", f"{r['images_per_second_with_text_encoder']:.3f} / "
                                          f"{r['images_per_second_without_text_encoder']:.3f} images/s"),
        ("scale tokens/s (all rows)", f"{r['scale_tokens_per_second']:,.0f}"),
        ("image tokens/s (no CFG rows)", f"{r['image_tokens_per_second']:,.0f}"),
        ("latency p50 / p95 / max", f"{r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} / "
                                    f"{r['latency_max_s']:.2f} s (mean queue {r['queue_mean_s']:.2f} s)"),
        ("  from first step p50 / p95", f"{r['run_p50_s']:.3f} / {r['run_p95_s']:.3f} s"),
        ("device time by stage", ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in r["stage_time_s"].items())),
        ("max images in flight", f"{r['max_images_in_flight']} ({r['num_steps']} steps, "
                                 f"{r['num_preemptions']} preemptions)"),
        ("CUDA graphs", "off" if r["cuda_graph_steps"] is None
         else f"{r['cuda_graph_steps']} of {r['num_steps']} steps replayed"),
        ("peak KV", f"{r['peak_kv_pages']:,} pages = {r['peak_kv_bytes'] / gib:.3f} GiB "
                    f"of {r['kv_pool_pages']:,} pages"),
        ("KV pages per image mean / peak", f"{r['kv_pages_per_image_mean']:,.1f} / {r['kv_pages_per_image_peak']:,}"),
        ("peak GPU memory", peak_gpu),
    ]
    width = max(len(k) for k, _ in lines)
    rule = "=" * (width + 3 + max(len(v) for _, v in lines))
    body = [f"{k:<{width}} | {v}" for k, v in lines]
    return "\n".join([rule, *body, rule])
