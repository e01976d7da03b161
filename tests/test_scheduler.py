"""Scheduling and page accounting without a model: admission by the future page profile, page reuse
inside a step, priorities, limits, and preemption as a counted fallback."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from varserve import Engine, SamplingParams
from varserve.cache.allocator import BlockAllocator
from varserve.cache.block_manager import BlockManager, OutOfPagesError
from varserve.cache.policy import FullPolicy, make_policy
from varserve.models.config import get_config
from varserve.models.generation import ScaleSampling
from varserve.models.schedule import parse_size
from varserve.scheduler.request import Request
from varserve.scheduler.scheduler import Scheduler, SchedulerConfig

PAGE = 16
CFG = get_config("test-small")


def make_request(rid: str, size: str = "256x256", rows: int = 2, priority: int = 0, arrival: float = 0.0) -> Request:
    schedule = parse_size(size)
    plan = FullPolicy().plan(CFG, schedule)
    return Request(rid, "p", None, schedule, ScaleSampling(4.0, 1.0, 0.97), 0, rows, plan,
                   plan.held_pages(PAGE, rows), priority=priority, arrival_time=arrival)


def run_step(blocks: BlockManager, reqs: list[Request]) -> None:
    """Grow and cut every layer like a model step does."""
    blocks.plan_step(reqs)
    for req in reqs:
        req.scale += 1


def test_held_profile_matches_what_a_step_really_holds() -> None:
    req = make_request("a", rows=2)
    allocator = BlockAllocator(100_000)
    blocks = BlockManager(allocator, PAGE)
    blocks.start(req)
    for scale in range(req.schedule.num_scales):
        for layer in range(CFG.depth):
            blocks.begin_layer([req], layer)
            assert allocator.num_used == req.held[scale, layer]
            blocks.end_layer([req], layer)
        req.scale += 1
    assert allocator.num_used == 0  # the last scale frees every layer right after it attends


def test_pages_freed_by_one_request_serve_another_in_the_same_step() -> None:
    a, b = make_request("a"), make_request("b")
    last = a.schedule.num_scales - 1  # A's last scale: each layer frees everything once it has attended
    need = int((a.held[last] + b.held[4]).max())
    without_reuse = int(a.held[last, -1] + a.plan.pages_attend(PAGE)[last, :-1].sum() * a.rows + b.held[4].max())
    assert need < without_reuse
    allocator = BlockAllocator(need + 1)  # exactly the layer-resolved peak of the step
    blocks = BlockManager(allocator, PAGE)
    for req, scale in ((a, last), (b, 4)):
        blocks.start(req)
        _fill_history(blocks, req, scale)
    reused, freed_by_a = 0, set()
    for layer in range(CFG.depth):
        b_before = _pages_of(b, layer)
        blocks.begin_layer([b, a], layer)  # B grows first: it can only use what A freed
        if layer:
            reused += len((_pages_of(b, layer) - b_before) & freed_by_a)
        held_by_a = _pages_of(a, layer)
        blocks.end_layer([b, a], layer)
        freed_by_a = held_by_a - _pages_of(a, layer)
    assert reused > 0
    assert allocator.peak_used <= need


def test_a_planned_step_reuses_pages_layer_by_layer_and_fails_before_running_when_short() -> None:
    a, b = make_request("a"), make_request("b")
    last = a.schedule.num_scales - 1
    need = int((a.held[last] + b.held[4]).max())
    for pool, fits in ((need + 1, True), (need, False)):
        allocator = BlockAllocator(pool)
        blocks = BlockManager(allocator, PAGE)
        for req, scale in ((a, last), (b, 4)):
            req.scale = 0
            blocks.start(req)
            _fill_history(blocks, req, scale)
        if not fits:
            with pytest.raises(OutOfPagesError):
                blocks.plan_step([b, a])
            continue
        pages = blocks.plan_step([b, a])
        assert pages.block_tables.shape[:3] == pages.seqlens.shape == (CFG.depth, 4, CFG.num_heads)
        tokens = np.array([b.schedule.tokens[4]] * 2 + [a.schedule.tokens[last]] * 2)[None, :, None]
        np.testing.assert_array_equal(pages.seqlens, pages.history + tokens)
        held = [set(pages.block_tables[layer, 2:].ravel().tolist()) - {0} for layer in range(CFG.depth)]
        took = [set(pages.block_tables[layer, :2].ravel().tolist()) - {0} for layer in range(CFG.depth)]
        assert any(took[layer + 1] & held[layer] for layer in range(CFG.depth - 1))  # B reuses what A freed
        assert allocator.peak_used <= need and allocator.num_used == blocks.pages_held(a) + blocks.pages_held(b)


@pytest.mark.parametrize("model, policy, budget", [("test-small", "full", 1.0), ("test-small", "window", 0.3),
                                                   ("test-small", "scalekv", 0.3), ("tiny", "heatkv", 0.1)])
def test_a_planned_step_does_what_growing_and_cutting_layer_by_layer_does(model: str, policy: str,
                                                                         budget: float) -> None:
    """plan_step (all layers; requests of one plan and scale together) against begin_layer/end_layer one layer at a
    time, for requests of mixed scales and row counts in a shuffled order: plan_step hands out pages group by
    group, so the layer path runs the requests in that order; each request's rows of the step table, its lengths,
    its own tables and peak, and the allocator's state must then be equal. tiny's HeatKV calibration keeps
    different token counts per head."""
    cfg, schedule = get_config(model), parse_size("256x256")
    plan = make_policy(policy, budget).plan(cfg, schedule)
    rng = np.random.default_rng(3)
    made = [Request(f"r{i}", "p", None, schedule, ScaleSampling(4.0, 1.0, 0.97), 0, int(rng.integers(1, 3)), plan,
                    plan.held_pages(PAGE, 2)) for i in range(12)]
    scales = rng.choice([2, 5, schedule.num_scales - 2, schedule.num_scales - 1], size=len(made)).tolist()
    runs = []
    for _ in range(2):
        blocks = BlockManager(BlockAllocator(400_000), PAGE)
        reqs = copy.deepcopy(made)
        for req, scale in zip(reqs, scales):
            blocks.start(req)
            _fill_history(blocks, req, scale)
        runs.append((blocks, reqs))
    (fast, fast_reqs), (slow, slow_reqs) = runs
    planned = fast.plan_step(fast_reqs)
    groups = list(dict.fromkeys((r.rows, r.scale) for r in fast_reqs))
    slow_reqs = sorted(slow_reqs, key=lambda r: groups.index((r.rows, r.scale)))
    grown = []
    for layer in range(cfg.depth):
        grown.append(slow.begin_layer(slow_reqs, layer))
        slow.end_layer(slow_reqs, layer)
    width = planned.block_tables.shape[-1]
    fast_rows, slow_rows = _row_offsets(fast_reqs), _row_offsets(slow_reqs)
    for b in slow_reqs:
        a = next(r for r in fast_reqs if r.request_id == b.request_id)
        mine, theirs = slice(fast_rows[a.request_id], fast_rows[a.request_id] + a.rows), \
            slice(slow_rows[b.request_id], slow_rows[b.request_id] + b.rows)
        for layer, g in enumerate(grown):
            np.testing.assert_array_equal(planned.block_tables[layer, mine], g.block_table[theirs, :, :width])
            np.testing.assert_array_equal(planned.seqlens[layer, mine], g.seqlens[theirs])
            np.testing.assert_array_equal(planned.history[layer, mine], g.history[theirs])
            np.testing.assert_array_equal(a.tables.table(layer), b.tables.table(layer))
            np.testing.assert_array_equal(a.tables.lengths(layer), b.tables.lengths(layer))
        assert (a.peak_pages, a.tables.num_pages()) == (b.peak_pages, b.tables.num_pages())
    assert not any(g.block_table[..., width:].any() for g in grown)
    assert planned.block_tables.any(), "the step grew pages"
    if policy == "heatkv":
        assert (planned.seqlens != planned.seqlens[..., :1]).any(), "heads hold different token counts"
    assert (fast.allocator.num_used, fast.allocator.peak_used) == (slow.allocator.num_used, slow.allocator.peak_used)
    np.testing.assert_array_equal(fast.allocator.refcounts, slow.allocator.refcounts)


def _row_offsets(reqs: list[Request]) -> dict[str, int]:
    starts = np.cumsum([0] + [r.rows for r in reqs])
    return {r.request_id: int(start) for r, start in zip(reqs, starts)}


def test_a_step_stopped_by_shared_pages_leaves_consistent_tables_and_leaks_nothing() -> None:
    """A cut frees only pages no one else holds: with A's pages shared, the step runs short part-way. The tables
    and peaks then stand where the layer-by-layer path stops, and releasing everything returns every page."""
    runs = []
    for _ in range(2):
        a, b = make_request("a"), make_request("b")
        last = a.schedule.num_scales - 1
        allocator = BlockAllocator(int((a.held[last] + b.held[4]).max()) + 1)
        blocks = BlockManager(allocator, PAGE)
        for req, scale in ((a, last), (b, 4)):
            blocks.start(req)
            _fill_history(blocks, req, scale)
        shared = np.concatenate([a.tables.table(layer).ravel() for layer in range(CFG.depth)])
        allocator.fork(shared[shared != 0])
        runs.append((blocks, a, b, shared[shared != 0]))
    (blocks, a, b, shared), (layered, *slow) = runs
    with pytest.raises(OutOfPagesError):
        blocks.plan_step([b, a])
    with pytest.raises(OutOfPagesError):
        for layer in range(CFG.depth):
            layered.begin_layer(slow[1::-1], layer)
            layered.end_layer(slow[1::-1], layer)
    for fast_req, slow_req in zip((a, b), slow):
        assert fast_req.peak_pages == slow_req.peak_pages and fast_req.tables.num_pages() == slow_req.tables.num_pages()
        for layer in range(CFG.depth):
            np.testing.assert_array_equal(fast_req.tables.lengths(layer), slow_req.tables.lengths(layer))
    held = blocks.pages_held(a) + blocks.pages_held(b)
    assert blocks.allocator.num_used == held + len(set(shared.tolist()) - _all_pages(a))
    blocks.release(a)
    blocks.release(b)
    blocks.allocator.free(shared)
    assert blocks.allocator.num_used == 0


def test_a_step_table_must_be_contiguous_int32() -> None:
    """Positions are written through a flat view: a strided or other-typed table would take the pages into a copy."""
    blocks = BlockManager(BlockAllocator(100_000), PAGE)
    req = make_request("a")
    blocks.start(req)
    for empty in (lambda shape: np.empty(shape[:-1] + (2 * shape[-1],), np.int32)[..., ::2],
                  lambda shape: np.empty(shape, np.int64)):
        with pytest.raises(ValueError, match="C-contiguous int32"):
            blocks.plan_step([req], empty)
        assert blocks.allocator.num_used == 0 and blocks.pages_held(req) == 0
    blocks.plan_step([req], lambda shape: np.empty(shape, np.int32))
    assert blocks.pages_held(req) > 0


def _all_pages(req: Request) -> set[int]:
    return set().union(*(_pages_of(req, layer) for layer in range(CFG.depth)))


def _pages_of(req: Request, layer: int) -> set[int]:
    table = req.tables.table(layer)
    return set(table[table != 0].tolist())


def _fill_history(blocks: BlockManager, req: Request, target: int) -> None:
    """Run a request alone up to the start of scale `target`."""
    while req.scale < target:
        run_step(blocks, [req])


def test_admission_keeps_every_future_step_within_the_pool() -> None:
    one = make_request("x").held.max()
    config = SchedulerConfig(num_pages=int(one * 1.5), max_num_seqs=16, max_num_batched_tokens=10**9)
    scheduler = Scheduler(config)
    allocator = BlockAllocator(config.num_pages + 1)
    blocks = BlockManager(allocator, PAGE)
    for i in range(6):
        scheduler.add(make_request(f"r{i}", arrival=float(i)))
    most_in_flight, done = 0, 0
    for _ in range(100):
        reqs = scheduler.schedule()
        if not reqs:
            break
        most_in_flight = max(most_in_flight, len(reqs))
        for req in reqs:
            if req.tables is None:
                blocks.start(req)
        run_step(blocks, reqs)
        assert allocator.peak_used <= config.num_pages
        for req in [r for r in reqs if r.scale == r.schedule.num_scales]:
            blocks.release(req)
            scheduler.finish(req)
            done += 1
    assert done == 6 and allocator.num_used == 0
    assert most_in_flight >= 2  # staggered: a newcomer joins while others run


def test_priority_then_arrival_order_and_strict_fcfs() -> None:
    scheduler = Scheduler(SchedulerConfig(num_pages=10**9, max_num_seqs=2, max_num_batched_tokens=10**9))
    scheduler.add(make_request("late-urgent", priority=-1, arrival=3.0))
    scheduler.add(make_request("first", arrival=1.0))
    scheduler.add(make_request("second", arrival=2.0))
    assert [r.request_id for r in scheduler.schedule()] == ["late-urgent", "first"]


def test_token_budget_limits_admission_and_rejects_oversized() -> None:
    req = make_request("a")
    peak_tokens = int(req.remaining_tokens.max())
    scheduler = Scheduler(SchedulerConfig(num_pages=10**9, max_num_seqs=8, max_num_batched_tokens=peak_tokens))
    scheduler.add(req)
    scheduler.add(make_request("b", arrival=1.0))
    assert [r.request_id for r in scheduler.schedule()] == ["a"]  # b's last scale would coincide with a's
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(SchedulerConfig(10**9, 8, peak_tokens - 1)).add(make_request("c"))


def test_preemption_is_a_counted_fallback_and_recomputes_the_same_image(monkeypatch) -> None:
    engine = Engine("test-small", dtype="float64", num_pages=40000, page_size=PAGE)
    params = {rid: SamplingParams(size="256x256", seed=seed) for rid, seed in (("old", 8), ("victim", 9))}
    expected = {rid: np.asarray(engine.generate("p", p, use_tqdm=False)[0].image) for rid, p in params.items()}
    for rid, p in params.items():
        engine.add_request("p", p, request_id=rid)
    engine.step()
    engine.step()
    real = engine.block_manager.can_run_step  # a pool that does not hold both at once, unlike what admission thinks:
    monkeypatch.setattr(engine.block_manager, "can_run_step", lambda reqs: len(reqs) < 2 and real(reqs))
    outputs = {}
    for _ in range(100):
        outputs.update({o.request_id: o for o in engine.step()})
        if not engine.has_unfinished_requests():
            break
    # once: the victim waits for "old" to end instead of being admitted (and preempted) again every step
    assert outputs["victim"].metrics.num_preemptions == 1 and outputs["old"].metrics.num_preemptions == 0
    for rid, image in expected.items():
        np.testing.assert_array_equal(np.asarray(outputs[rid].image), image)
    assert engine.cache_stats()["used_pages"] == 0


def test_a_step_that_can_never_fit_fails_instead_of_looping(monkeypatch) -> None:
    engine = Engine("test-small", num_pages=4000, page_size=PAGE)
    engine.add_request("p", SamplingParams(size="256x256", seed=1), request_id="stuck")
    monkeypatch.setattr(engine.block_manager, "can_run_step", lambda reqs: False)
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("stuck", "failed")]
    assert "KV page pool" in outputs[0].error
    assert not engine.has_unfinished_requests() and engine.cache_stats()["used_pages"] == 0


def test_admission_is_staggered_by_lifetime_tokens() -> None:
    lifetime = int(make_request("x").remaining_tokens.sum())
    scheduler = Scheduler(SchedulerConfig(num_pages=10**9, max_num_seqs=64, max_num_batched_tokens=3 * lifetime))
    for i in range(8):
        scheduler.add(make_request(f"r{i}", arrival=float(i)))
    admitted = [len(scheduler.schedule())]
    for req in scheduler.running:
        req.scale += 1
    admitted.append(len(scheduler.schedule()))
    assert admitted == [3, 6]  # three per step, not a wave of every request that fits


def test_block_manager_benchmark_plans_a_step_of_spread_requests(tmp_path) -> None:
    """benchmarks/bench_block_manager.py on a test model: the requests it times sit at the scales it says."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_block_manager.py"
    spec = importlib.util.spec_from_file_location("bench_block_manager", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--model", "test-small", "--size", "256x256", "--requests", "9", "--repeats", "2",
                         "--out", str(tmp_path / "bm.json")])
    (row,) = result["results"]
    assert row["scales"] == [0, 0, 1, 1, 2, 3, 4, 5, 6]  # request i at scale i mod 7
    assert len(row["plan_step_ms_all"]) == 2
    assert json.loads((tmp_path / "bm.json").read_text())["results"] == result["results"]
