"""Host time of the block manager planning one step (`BlockManager.plan_step`), without a model or a GPU.

    python benchmarks/bench_block_manager.py --model infinity-2b --policy full --requests 16 64

N requests of one size are spread over the scales (request i starts i mod 13 steps late), as continuous
batching mixes them, then the median of `--repeats` plannings of the next step is timed (every repeat plans the
same step again on a copy of the manager's state), with the engine's page size for the policy unless
`--page-size` says otherwise. Prints one table and writes JSON (command, device, git commit,
every figure) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import shlex
import statistics
import sys
import time

import torch

from varserve.benchmark import RESULTS_DIR, device_name, git_commit, write_json
from varserve.cache.allocator import BlockAllocator
from varserve.cache.block_manager import BlockManager
from varserve.cache.policy import make_policy
from varserve.model_runner import CUT_PAGE_SIZE, DEFAULT_PAGE_SIZES
from varserve.models.config import get_config
from varserve.models.generation import ScaleSampling
from varserve.models.schedule import parse_size
from varserve.scheduler.request import Request

ROWS = 2  # CFG


def spread_requests(model: str, policy: str, budget: float, size: str, n: int, page_size: int
                    ) -> tuple[BlockManager, list[Request]]:
    """A manager holding n requests at staggered scales, and the requests of its next step."""
    cfg, schedule = get_config(model), parse_size(size)
    plan = make_policy(policy, budget).plan(cfg, schedule)
    held = plan.held_pages(page_size, ROWS)
    blocks = BlockManager(BlockAllocator(n * int(held.max()) + 1), page_size)
    reqs = [Request(f"r{i}", "p", None, schedule, ScaleSampling(4.0, 1.0, 0.97), 0, ROWS, plan, held)
            for i in range(n)]
    for req in reqs:
        blocks.start(req)
    last = schedule.num_scales - 1
    for step in range(last):  # request i runs min(last, i mod num_scales) scales before the timed step
        live = [r for i, r in enumerate(reqs) if i % schedule.num_scales > step]
        if live:
            blocks.plan_step(live)
            for r in live:
                r.scale += 1
    return blocks, reqs


def time_plan(blocks: BlockManager, reqs: list[Request], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        manager, step = copy.deepcopy((blocks, reqs))
        start = time.perf_counter()
        manager.plan_step(step)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="infinity-2b")
    ap.add_argument("--policy", default="full")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--size", default="1024x1024")
    ap.add_argument("--requests", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--page-size", type=int, default=None, help="tokens per page (default: the engine's for the policy)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    page_size = args.page_size or DEFAULT_PAGE_SIZES.get(args.policy, CUT_PAGE_SIZE)
    rows = []
    for n in args.requests:
        blocks, reqs = spread_requests(args.model, args.policy, args.budget, args.size, n, page_size)
        times = time_plan(blocks, reqs, args.repeats)
        rows.append({"requests": n, "scales": sorted(r.scale for r in reqs),
                     "plan_step_ms": 1e3 * statistics.median(times), "plan_step_ms_all": [1e3 * t for t in times]})
    result = {
        "benchmark": "block_manager_plan_step", "model": args.model, "policy": args.policy, "budget": args.budget,
        "size": args.size, "page_size": page_size, "rows_per_request": ROWS, "repeats": args.repeats, "results": rows,
        "device_name": device_name(torch.device("cpu")), "torch_version": torch.__version__,
        "varserve_git_commit": git_commit(), "command": shlex.join([sys.executable, *sys.argv]),
        "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_json(result, args.out or RESULTS_DIR / f"block-manager-{args.model}-{args.policy}-{stamp}.json")
    print(f"{'model / policy / size':24} {args.model} / {args.policy} {args.budget:g} / {args.size}, {page_size}-token pages")
    for row in rows:
        print(f"{row['requests']:>4} requests{'':11} plan_step {row['plan_step_ms']:.1f} ms (median of {args.repeats})")
    print(f"{'json':24} {path}")
    return result


if __name__ == "__main__":
    main()
