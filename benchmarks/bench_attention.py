"""Paged attention kernels vs dense cuDNN SDPA at Infinity-2B shapes (16 heads x 128, bf16, non-causal).

    python benchmarks/bench_attention.py                      # H100: every shape, page sizes 16,64,256
    python benchmarks/bench_attention.py --page-sizes 64 --triton-tiles 128x64x8x3,128x128x8x2
    python benchmarks/bench_attention.py --smoke              # CPU: tiny shapes, checks the code path

Every backend is checked against dense SDPA on the same data before it is timed. Prints one table and writes
JSON (default benchmarks/results/attention-<date>.json; --smoke writes only with --out).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from varserve.benchmark import git_commit  # noqa: E402
from varserve.attention import TritonTiles, available_backends, paged_attention, write_kv  # noqa: E402
from varserve.attention.paged import paged_attention_triton, triton  # noqa: E402
from varserve.cache.allocator import BlockAllocator  # noqa: E402
from varserve.cache.block_table import BlockTables, pages_for  # noqa: E402

# (rows, Lq, Lk) groups per case: Lq = tokens of a scale, Lk = all tokens up to and including it (1024^2).
SHAPES = {
    "4096x10521": [(16, 4096, 10521)],
    "2304x6425": [(16, 2304, 6425)],
    "1024x2521": [(16, 1024, 2521)],
    "256x521": [(64, 256, 521)],
    "mixed": [(2, 4096, 10521), (2, 2304, 6425), (4, 1024, 2521), (8, 256, 521), (8, 64, 121), (8, 4, 5)],
}
SMOKE_SHAPES = {"64x121": [(3, 64, 121)], "mixed": [(2, 36, 57), (3, 4, 5), (2, 16, 21)]}
PAGED_BACKENDS = ("sdpa_gather", "triton", "varlen_fa2", "hybrid", "cudnn")


@dataclass
class Case:
    """One shape: packed q, dense K/V per group (for the dense baseline), and the same K/V in a paged pool."""

    groups: list[tuple[int, int, int]]
    q: torch.Tensor  # [total_q, H, d]
    dense: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per group q, k, v as [rows, H, L, d]
    paged: dict | None = None  # paged_attention arguments for the current page size

    @property
    def flops(self) -> float:
        return sum(4 * rows * lq * lk * self.q.shape[1] * self.q.shape[2] for rows, lq, lk in self.groups)


def make_case(groups: list[tuple[int, int, int]], heads: int, dim: int, dtype: torch.dtype,
              device: torch.device) -> Case:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    dense = [(randn(rows, heads, lq, dim), randn(rows, heads, lk, dim), randn(rows, heads, lk, dim))
             for rows, lq, lk in groups]
    q = torch.cat([gq.transpose(1, 2).reshape(-1, heads, dim) for gq, _, _ in dense])
    return Case(groups, q, dense)


def page_case(case: Case, page_size: int, softmax_scale: float) -> None:
    """Write the case's K/V into a fresh pool whose pages are handed out in shuffled order."""
    heads, dim = case.q.shape[1:]
    lq, lk = (np.repeat([g[i] for g in case.groups], [g[0] for g in case.groups]) for i in (1, 2))
    lens = np.repeat(lk[:, None], heads, axis=1).astype(np.int32)
    alloc = BlockAllocator(int(pages_for(lens, page_size).sum()) + 1)
    alloc.free(np.random.default_rng(0).permutation(alloc.allocate(alloc.num_free)))
    tables = BlockTables(len(lk), 1, heads, int(pages_for(lens, page_size).max()), page_size)
    assert tables.grow(0, lens, alloc)
    k_pages, v_pages = (torch.empty(alloc.num_total, page_size, dim, device=case.q.device, dtype=case.q.dtype)
                        for _ in range(2))
    k, v = (torch.cat([x[i].transpose(1, 2).reshape(-1, heads, dim) for x in case.dense]) for i in (1, 2))
    write_kv(k_pages, v_pages, k, v, torch.from_numpy(tables.slots(0, 0, lens)).to(case.q.device).view(-1, heads))
    case.paged = dict(k_pages=k_pages, v_pages=v_pages, seqlens_k=torch.from_numpy(lens),
                      block_table=torch.from_numpy(tables.table(0).copy()).to(case.q.device),
                      cu_seqlens_q=torch.from_numpy(np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)),
                      max_seqlen_q=int(lq.max()), max_seqlen_k=int(lk.max()), softmax_scale=softmax_scale)


def dense_fn(case: Case, softmax_scale: float) -> Callable[[], list[torch.Tensor]]:
    """Dense SDPA per group (outputs [rows, H, Lq, d], not repacked: the baseline is the kernel alone). On CUDA
    cuDNN first; flash/efficient only for a shape that cuDNN turns down, so one tiny group cannot stop the run."""
    fallbacks = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    def run() -> list[torch.Tensor]:
        with sdpa_kernel(fallbacks, set_priority=True) if case.q.is_cuda else contextlib.nullcontext():
            return [F.scaled_dot_product_attention(q, k, v, scale=softmax_scale) for q, k, v in case.dense]

    return run


def paged_fns(case: Case, backends: list[str], tiles: list[TritonTiles]) -> dict[str, Callable[[], torch.Tensor]]:
    fns = {name: lambda name=name: paged_attention(case.q, **case.paged, backend=name)
           for name in backends if name != "triton"}
    for t in tiles if "triton" in backends else []:
        label = "triton" if t == TritonTiles() else f"triton[{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}]"
        fns[label] = lambda t=t: paged_attention_triton(case.q, **case.paged, tiles=t)
    return fns


def median_ms(fn: Callable[[], object], cuda: bool) -> float:
    if cuda and triton is not None:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_shape(name: str, groups: list, args: argparse.Namespace, device: torch.device) -> list[dict]:
    scale = args.dim ** -0.5
    case = make_case(groups, args.heads, args.dim, args.dtype, device)
    reference = dense_fn(case, scale)
    expected = torch.cat([o.transpose(1, 2).reshape(-1, args.heads, args.dim) for o in reference()])
    dense_ms = median_ms(reference, device.type == "cuda")
    row = dict(shape=name, groups=groups, backend="dense_cudnn" if device.type == "cuda" else "dense_sdpa")
    results = [dict(row, page_size=None, ms=dense_ms, tflops=case.flops / dense_ms / 1e9, pct_of_dense=100.0,
                    rel_error=0.0)]
    for page_size in args.page_sizes:
        page_case(case, page_size, scale)
        for label, fn in paged_fns(case, args.backends, args.triton_tiles).items():
            error = rel_error(fn(), expected)
            if error > 2e-2:
                raise SystemExit(f"{name} {label} page {page_size}: relative error {error:.3g} vs dense")
            ms = median_ms(fn, device.type == "cuda")
            if args.profile:
                print_kernels(f"{name} {label} page {page_size}", fn)
            results.append(dict(row, backend=label, page_size=page_size, ms=ms, tflops=case.flops / ms / 1e9,
                                pct_of_dense=100 * dense_ms / ms, rel_error=error))
        case.paged = None
    return results


def print_kernels(title: str, fn: Callable[[], object], calls: int = 5) -> None:
    """The device kernels of a few calls, most time first: where a backend loses to dense."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"-- kernels of {calls} calls: {title}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=70))


def print_table(results: list[dict]) -> None:
    print(f"{'shape':<12} {'backend':<26} {'page':>5} {'ms':>9} {'TFLOP/s':>8} {'% dense':>8}")
    for r in results:
        print(f"{r['shape']:<12} {r['backend']:<26} {r['page_size'] or '-':>5} {r['ms']:>9.3f} "
              f"{r['tflops']:>8.1f} {r['pct_of_dense']:>7.1f}%")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--page-sizes", default="16,64,256", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--backends", default=",".join(PAGED_BACKENDS), type=lambda s: s.split(","))
    parser.add_argument("--shapes", default=None, type=lambda s: s.split(","), help="subset of the case names")
    parser.add_argument("--triton-tiles", default="128x64x8x3", help="BLOCK_MxBLOCK_NxWARPSxSTAGES, comma list",
                        type=lambda s: [TritonTiles(*map(int, t.split("x"))) for t in s.split(",")])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU")
    parser.add_argument("--profile", action="store_true", help="print each paged backend's top device kernels")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.heads, args.dim, args.dtype = (2, 64, torch.float32) if args.smoke else (16, 128, torch.bfloat16)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU code path")
    args.backends = [b for b in args.backends if b in available_backends(device)]
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    results = [r for name, groups in shapes.items() if args.shapes is None or name in args.shapes
               for r in bench_shape(name, groups, args, device)]
    print_table(results)
    out = args.out or (None if args.smoke else
                       Path(__file__).parent / "results" / f"attention-{datetime.date.today().isoformat()}.json")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        report = dict(command=" ".join(sys.argv), device=torch.cuda.get_device_name() if device.type == "cuda"
                      else "cpu", torch=torch.__version__, triton=getattr(triton, "__version__", None),
                      git_commit=git_commit(), heads=args.heads, head_dim=args.dim, dtype=str(args.dtype),
                      triton_tiles=[asdict(t) for t in args.triton_tiles], results=results)
        out.write_text(json.dumps(report, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
