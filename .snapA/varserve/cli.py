"""Command line: `varserve generate` (prompts to PNG files), `varserve bench` (offline throughput), `varserve
calibrate` and `varserve eval-fidelity` (KV policies against the full cache; varserve/fidelity.py), `varserve
serve` (the HTTP API; varserve/server.py).

Run `varserve <command> --help` for the options. Bad input exits with code 2 and a one-line message; a
failed image exits with code 1.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from varserve.cache.calibration import add_parser as add_calibrate_parser
from varserve.cache.calibration import read_prompts
from varserve.fidelity import add_parser as add_fidelity_parser

logger = logging.getLogger("varserve")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DTYPES = ("float32", "float64", "bfloat16", "float16")


class UsageError(ValueError):
    """Bad command-line input found after parsing (exit code 2)."""


# ---- parsing --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varserve",
                                     description="Serve Infinity next-scale-prediction text-to-image models.")
    common = argparse.ArgumentParser(add_help=False)
    for p, default in ((parser, "INFO"), (common, argparse.SUPPRESS)):  # a subcommand's copy only overrides
        p.add_argument("--log-level", default=default, type=str.upper, choices=LOG_LEVELS,
                       help="logging level of the messages written to stderr (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,bench,calibrate,eval-fidelity,serve}")

    gen = sub.add_parser("generate", parents=[common], help="generate images from prompts into PNG files",
                         description="Generate one image per prompt; writes OUT/<index>_<slug>.png and prints "
                                     "one line per image (path, seed, latency, peak KV pages).")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompts (or use --prompts-file)")
    gen.add_argument("--prompts-file", type=Path, help="a file of prompts, one per line (blank lines skipped)")
    gen.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    gen.add_argument("--seed", type=int, help="image i uses seed SEED+i (default: a random seed per image)")
    gen.add_argument("--negative-prompt", help="text of the unconditional CFG row")
    _sampling_args(gen)
    _engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", parents=[common], help="offline throughput benchmark",
                           description="Offline throughput of built-in prompts (like `vllm bench throughput`): "
                                       "prints one table and writes a JSON file (see benchmarks/README.md).")
    bench.add_argument("--num-prompts", type=int, default=64, help="images to time (default: 64)")
    bench.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                       help="continuous: submit all at once, the engine admits as pages/tokens allow; static: "
                            "waves of max_num_seqs, the next only after the previous fully finishes")
    bench.add_argument("--warmup", type=int, default=1, help="images generated before timing (default: 1)")
    bench.add_argument("--exclude-text-encoder", action="store_true",
                       help="headline throughput without the text encoder's time (both are always reported)")
    bench.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default: 0)")
    bench.add_argument("--output-json", type=Path,
                       help="result file (default: benchmarks/results/bench-<model>-<policy>-<batching>-<utc>.json)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--data-parallel", type=int, default=1, metavar="N",
                       help="N engine replicas in their own processes, one per GPU (cuda:0..N-1; N CPU replicas "
                            "with --device cpu); reports per-replica and total images/s (default: 1)")
    _sampling_args(bench)
    _engine_args(bench, default_model="test-small")  # the built-in prompts are outside tiny's vocabulary
    bench.set_defaults(func=cmd_bench)
    add_calibrate_parser(sub, [common])
    add_fidelity_parser(sub, [common])

    from varserve.server import add_serve_parser  # imported here: varserve.server imports this module

    add_serve_parser(sub, common)
    return parser


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's, else SamplingParams')")
    g.add_argument("--size",
                   help="WIDTHxHEIGHT from the size table (e.g. 256x256, 512x512, 1024x1024, 720x1440) or "
                        "W:H@BUDGET with BUDGET in 256/512/768/1024 (default: the model's, else 1024x1024)")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 disables CFG)")
    g.add_argument("--tau", type=float, help="sampling temperature of the bits")
    g.add_argument("--top-p", type=float, help="top-p of the bits (0 disables)")


def _engine_args(p: argparse.ArgumentParser, default_model: str = "tiny") -> None:
    g = p.add_argument_group("engine (defaults: Engine / EngineConfig)")
    g.add_argument("--model", default=default_model,
                   help=f"preset (tiny, infinity-2b, infinity-8b, test-small, ...) or weights path "
                        f"(default: {default_model})")
    g.add_argument("--weights", help="local folder or file of official weights (else downloaded)")
    g.add_argument("--kv-calibration", help="scalekv/heatkv calibration JSON (varserve calibrate)")
    g.add_argument("--random-weights", action="store_true", default=None, help="random weights, no download")
    g.add_argument("--kv-policy", help="KV cache policy (default: full)")
    g.add_argument("--kv-budget", type=float, help="fraction of the full KV history kept (default: 1.0)")
    engine_resource_args(g)


def engine_resource_args(g: argparse._ArgumentGroup) -> None:
    """Device, dtype, memory and batching limits of an engine (shared by the subcommands that build one)."""
    g.add_argument("--device", type=_device, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--gpu-memory-utilization", type=float, help="share of device memory to use (default: 0.9)")
    g.add_argument("--max-num-seqs", type=int, help="running images at most (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=int, help="query tokens of one step at most")
    g.add_argument("--page-size", type=int, help="tokens per KV page (default: 64 with the full policy, else 32)")
    g.add_argument("--num-pages", type=int, help="fix the KV pool size in pages (default: sized from memory)")
    g.add_argument("--attention-backend", help="paged attention backend (default: automatic)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay small steps from CUDA graphs (default: wherever they can run: CUDA, "
                        "bf16/fp16, attention backend cudnn, hybrid, triton or sdpa_gather)")


def _device(text: str) -> str:
    try:
        torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: {exc}") from None
    return text


_ENGINE_KEYS = ("kv_policy", "kv_budget", "device", "dtype", "gpu_memory_utilization", "max_num_seqs",
                "max_num_batched_tokens", "page_size", "num_pages", "random_weights", "weights", "attention_backend",
                "kv_calibration", "cuda_graphs")
_SAMPLING_KEYS = ("size", "cfg", "tau", "top_p")


def _engine(args: argparse.Namespace, **overrides):
    from varserve.engine import Engine

    kwargs = {k: getattr(args, k) for k in _ENGINE_KEYS if getattr(args, k) is not None}
    return Engine(args.model, **kwargs, **overrides)


def _sampling(args: argparse.Namespace, **extra):
    from varserve.params import default_params

    return default_params(args.model, **{k: getattr(args, k) for k in _SAMPLING_KEYS}, **extra)


# ---- generate -------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    params = [_sampling(args, seed=None if args.seed is None else args.seed + i,
                        negative_prompt=args.negative_prompt) for i in range(len(prompts))]
    engine = _engine(args)
    ids = _add_all(engine, prompts, params)
    args.out.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(prompts) - 1)))
    failures = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            index = ids[out.request_id]
            if out.error:
                failures += 1
                print(f"error: image {index} ({out.prompt!r}) failed: {out.error}", file=sys.stderr)
                continue
            path = args.out / f"{index:0{width}d}_{slugify(out.prompt)}.png"
            out.image.save(path)
            m = out.metrics
            print(f"{path}\tseed={out.seed}\tlatency={m.latency_s:.2f}s\tpeak_kv_pages={m.peak_kv_pages}", flush=True)
    logger.info("%d image(s) in %.2f s", len(prompts) - failures, time.perf_counter() - t0)
    return 1 if failures else 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts and args.prompts_file:
        raise UsageError("give prompts as arguments or --prompts-file, not both")
    if args.prompts_file:
        try:
            return read_prompts(args.prompts_file, "--prompts-file")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not args.prompts:
        raise UsageError("no prompts: give one or more PROMPT arguments or --prompts-file")
    return list(args.prompts)


def _add_all(engine, prompts: list[str], params: list) -> dict[str, int]:
    """Queue every prompt, or none (a prompt the engine refuses aborts the ones already queued)."""
    ids: dict[str, int] = {}
    try:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids[engine.add_request(prompt, p)] = i
    except ValueError as exc:
        for rid in ids:
            engine.abort(rid)
        bad = prompts[len(ids)]
        shown = bad if len(bad) <= 40 else bad[:37] + "..."
        raise UsageError(f"prompt {len(ids)} ({shown!r}): {one_line(exc)}") from None
    return ids


def slugify(text: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].rstrip("-")
    return slug or "image"


# ---- bench ----------------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace, command: str | None = None) -> int:
    from varserve.benchmark import default_output_path, format_table, run_benchmark, write_json

    if args.num_prompts < 1:
        raise UsageError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.data_parallel < 1:
        raise UsageError(f"--data-parallel must be >= 1, got {args.data_parallel}")
    params = _sampling(args)
    engine = _engine(args, data_parallel_size=args.data_parallel)
    try:
        result = run_benchmark(
            engine, num_prompts=args.num_prompts, params=params, batching=args.batching, warmup=args.warmup,
            exclude_text_encoder=args.exclude_text_encoder, seed=args.seed, command=command,
            use_tqdm=not args.no_progress,
        )
    finally:
        if args.data_parallel > 1:
            engine.shutdown()  # stops the replica processes
    path = write_json(result, args.output_json or default_output_path(args.model, result["kv_policy"], args.batching))
    print(format_table(result))
    print(f"Throughput: {result['requests_per_second']:.3f} requests/s, {result['tokens_per_second']:.1f} "
          f"scale tokens/s")
    print(f"results: {path}")
    return 0


# ---- entry point ----------------------------------------------------------------------------------------
def one_line(exc: BaseException) -> str:
    """A ValueError (pydantic's included) as one line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            parts = [f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in errors()]
            return "; ".join(parts)
        except Exception:  # not pydantic's shape: fall back to the text
            pass
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """`varserve` console entry point; returns the exit code (0 ok, 1 failed images, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("varserve").setLevel(args.log_level)
    try:
        if args.command == "bench":
            return cmd_bench(args, command=shlex.join(["varserve", *argv]))
        return args.func(args)
    except ValueError as exc:
        logger.debug("bad input", exc_info=True)
        print(f"varserve {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # failed images (the message names them), out of memory, ...
        logger.debug("failed", exc_info=True)
        print(f"varserve {args.command}: error: {one_line(exc)} (--log-level DEBUG shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
