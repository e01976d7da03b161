"""Steps run from static buffers (what `cuda_graphs` captures), checked on CPU: the same images as eager steps.

On CPU nothing is captured: `StepGraphs(capture=False)` runs the static buffers eagerly. That checks what a graph
replays (inputs, text and block tables copied into buffers built for another step of the same shape); the
capture itself runs in the GPU test. float64, as in test_engine.py, so images agree exactly.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from varserve import Engine, SamplingParams
from varserve.attention import available_backends
from varserve.attention import paged
from varserve.attention.paged import HYBRID_MIN_Q
from varserve.cache import kv_pool, scalekv
from varserve.cli import build_parser, main
from varserve.graphs import TEXT_ROOM, StepGraphs
from varserve.model_runner import graphs_refusal
from varserve.models import infinity

ENGINE = dict(dtype="float64", num_pages=40000, page_size=16, max_num_seqs=8)
SIZES = ["256x256", "1:2@256", "512x512"]
# prompts of different lengths: the text buckets and the packed text lengths differ between steps of one shape
JOBS = [("a red fox", 1, 0), ("a blue square on a green field under a yellow sky", 2, 1), ("a cat", 3, 0),
        ("a tree", 4, 1)]
# the same shapes again (sizes, arrival order, text buckets) with other prompts, seeds and pages
AGAIN = [("a red box", 5, 0), ("a green circle on a blue field under a white sky", 6, 1), ("a dog", 7, 0),
         ("a bush", 8, 1)]


def run(engine: Engine, staggered: bool, jobs: list = JOBS) -> dict[str, np.ndarray]:
    """Images by prompt; staggered: the requests arrive one step apart, so steps mix scales."""
    pending = [(p, SamplingParams(size=SIZES[s], seed=seed)) for p, seed, s in jobs]
    images: dict[str, np.ndarray] = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(1 if staggered else len(pending)):
            if pending:
                engine.add_request(*pending.pop(0), request_id=f"r{len(pending)}")
        for out in engine.step():
            images[out.prompt] = np.asarray(out.image)
    return images


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    engine = Engine("test-small", **ENGINE)
    return {**run(engine, staggered=True), **run(engine, staggered=True, jobs=AGAIN)}


def with_static_steps(backend: str | None = None, **options) -> Engine:
    engine = Engine("test-small", attention_backend=backend, **(options or ENGINE))
    runner = engine.runner
    runner.graphs = StepGraphs(runner.model, runner.pool, runner.backend, capture=False)
    return engine


@pytest.mark.parametrize("staggered", [True, False])
def test_static_steps_draw_what_eager_steps_draw(expected: dict[str, np.ndarray], staggered: bool) -> None:
    engine = with_static_steps()
    images = run(engine, staggered)
    built = len(engine.runner.graphs.graphs)
    held = engine.allocator.allocate(engine.allocator.num_free - 5000)  # every page of the first pass (LIFO)
    pool = engine.runner.pool
    pool.k_pages[held] = torch.nan  # the second pass must not write there: its tables are its own
    images.update(run(engine, staggered, AGAIN))
    assert pool.k_pages[held].isnan().all()
    engine.allocator.free(held)
    assert images.keys() == expected.keys()
    for prompt, image in images.items():
        np.testing.assert_array_equal(image, expected[prompt], err_msg=prompt)
    graphs = engine.runner.graphs
    assert len(graphs.graphs) == built and graphs.steps == 2 * built  # the second pass only replayed
    assert engine.cache_stats()["used_pages"] == 0 and not engine.has_unfinished_requests()


def test_growing_the_shared_text_buffer_drops_the_graphs_that_used_the_old_one() -> None:
    engine = Engine("test-small", **ENGINE)
    graphs = StepGraphs(engine.runner.model, engine.runner.pool, "reference", capture=False)
    first = graphs._text_buffers(10, torch.float64)
    graphs.graphs[("a shape",)] = None
    assert graphs._text_buffers(TEXT_ROOM, torch.float64) is first and graphs.graphs
    assert graphs._text_buffers(TEXT_ROOM + 1, torch.float64).ca_kv.shape[2] >= TEXT_ROOM + 1 and not graphs.graphs


def test_large_steps_run_eagerly_and_each_backend_has_its_route_per_layer() -> None:
    engine = Engine("test-small", kv_policy="scalekv", kv_budget=0.3, **ENGINE)
    runner = engine.runner
    depth = runner.model.cfg.depth
    graphs = {b: StepGraphs(runner.model, runner.pool, b, capture=False) for b in ("hybrid", "triton", "reference")}
    graphs["hybrid"].capture = True  # eligible() then also asks for a route (nothing is captured here)
    engine.add_request("a red fox", SamplingParams(size="512x512", seed=1))
    engine.add_request("a blue box", SamplingParams(size="256x256", seed=2))
    cuts, routes = [], set()
    while engine.has_unfinished_requests():
        reqs = engine.scheduler.schedule()
        cuts.append(any(r.plan.cut(r.scale, layer) is not None for r in reqs for layer in range(depth)))
        small = all(r.schedule.tokens[r.scale] < HYBRID_MIN_Q for r in reqs)
        one_shape = len({(r.schedule.name, r.scale) for r in reqs}) == 1
        route = "triton" if small else "sdpa_gather" if one_shape else None  # ScaleKV's heads hold equal counts
        assert graphs["hybrid"].route(reqs) == (route and (route,) * depth)
        assert graphs["hybrid"].eligible(reqs) == (route is not None)  # mixed shapes of gathered rows: eager
        assert not graphs["hybrid"].eligible(reqs * 5)  # 10 rows: too many
        assert graphs["triton"].route(reqs) == ("triton",) * depth and graphs["reference"].route(reqs) is None
        routes.add(route)
        engine.step()
    assert True in cuts and False in cuts and routes == {"triton", "sdpa_gather"}


@pytest.fixture(scope="module")
def heat_calibration(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("calibration")
    (folder / "prompts.txt").write_text("a red fox\na blue square on a green field\na cat\na tree\n")
    out = folder / "heat.json"
    assert main(["calibrate", "--model", "test-small", "--policy", "heatkv", "--prompts", str(folder / "prompts.txt"),
                 "--size", "256x256", "--seed", "5", "--dtype", "float64", "--out", str(out), "--log-level",
                 "WARNING"]) == 0
    return str(out)


@pytest.mark.parametrize("policy", ["scalekv", "heatkv"])
def test_static_steps_with_cuts_draw_what_eager_steps_draw(policy: str, heat_calibration: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps whose layers move tokens (ScaleKV's scored cuts, HeatKV's static ones) from static buffers: the
    second pass of each shape reuses the first pass's buffers and cut indices with other requests."""
    options = dict(ENGINE, kv_policy=policy, kv_budget=0.2,
                   kv_calibration=heat_calibration if policy == "heatkv" else None)
    jobs, again = [j for j in JOBS if j[2] == 0], [j for j in AGAIN if j[2] == 0]  # 256x256: the calibrated size
    eager = Engine("test-small", **options)
    want = {**run(eager, staggered=False, jobs=jobs), **run(eager, staggered=False, jobs=again)}
    engine = with_static_steps(**options)
    graphs, depth, cut_steps = engine.runner.graphs, engine.runner.model.cfg.depth, []
    static_run = graphs.run

    def recorded(reqs, *args):
        cut_steps.append(any(r.plan.cut(r.scale, layer) is not None for r in reqs for layer in range(depth)))
        return static_run(reqs, *args)

    monkeypatch.setattr(graphs, "run", recorded)
    images = {**run(engine, staggered=False, jobs=jobs), **run(engine, staggered=False, jobs=again)}
    for prompt, image in images.items():
        np.testing.assert_array_equal(image, want[prompt], err_msg=prompt)
    assert graphs.steps == len(cut_steps) == 2 * len(graphs.graphs) and True in cut_steps


@pytest.mark.skipif("triton" not in available_backends("cpu") or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="feeds the Triton kernel from device copies on CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("policy", ["full", "scalekv", "heatkv"])
def test_static_steps_on_the_graph_routes_read_nothing_from_the_host(policy: str, heat_calibration: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What a capture needs, on both routes (Triton for the small scales, gathered SDPA for 512x512's 32x32) and
    with cuts: no tensor read on the host inside a step replayed from its buffers (a shape's first step, the
    warm-up before a capture, may upload its cuts' indices), and the eager step's images."""
    fp32 = {**ENGINE, "dtype": "float32", "kv_policy": policy, "kv_budget": 1.0 if policy == "full" else 0.2,
            "kv_calibration": heat_calibration if policy == "heatkv" else None}  # float32: the Triton kernel's dtypes
    passes = ([[*JOBS, ("a red box", 5, 2), ("a green circle", 6, 2)], [*AGAIN, ("a dog", 7, 2), ("a bush", 8, 2)]]
              if policy == "full" else POLICY_PASSES)
    eager = Engine("test-small", attention_backend="hybrid", **fp32)
    want = {k: v for jobs in passes for k, v in run(eager, staggered=False, jobs=jobs).items()}
    engine = with_static_steps("hybrid", **fp32)
    graphs, model = engine.runner.graphs, engine.runner.model
    forward, exempt = model.forward, []

    def guarded(*args):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "numpy", "cpu", "nonzero", "pin_memory", "__bool__", "__int__",
                         "__float__"):
                m.setattr(torch.Tensor, name, _forbidden(name, getattr(torch.Tensor, name), exempt))
            for module in (paged, kv_pool, scalekv):  # host arrays would be uploads on CUDA
                m.setattr(module, "upload", _tensors_only(module.upload, exempt))
            return forward(*args)

    def exempted(fn):
        def call(*args):
            exempt.append(fn)
            try:
                return fn(*args)
            finally:
                exempt.pop()
        return call

    routes, execute = [], engine.runner.execute
    monkeypatch.setattr(model, "forward", guarded)  # eager steps read nothing either (not required of them)
    # host by design: CPU's padded cross-attention (CUDA graphs run FA2 varlen, bf16) and the gathered path's
    # plan, which PagedKV feeds from CPU tensors
    monkeypatch.setattr(infinity, "varlen_attention", exempted(infinity.varlen_attention))
    monkeypatch.setattr(paged, "_host_plan", exempted(paged._host_plan))
    monkeypatch.setattr(graphs, "_warm_up", exempted(graphs._warm_up))
    monkeypatch.setattr(engine.runner, "execute", lambda reqs, blocks: graphs.eligible(reqs) and
                        routes.append(graphs.route(reqs)) or execute(reqs, blocks))
    # the second pass replays the first one's shapes; steps of more than GRAPH_MAX_ROWS rows run eagerly
    images = {k: v for jobs in passes for k, v in run(engine, staggered=False, jobs=jobs).items()}
    assert graphs.steps == len(routes) > len(graphs.graphs)
    assert {r for layers in routes for r in layers} == ({"triton", "sdpa_gather"} if policy == "full" else {"triton"})
    for prompt, image in images.items():
        np.testing.assert_array_equal(image, want[prompt], err_msg=prompt)


def _tensors_only(upload, exempt: list):
    def checked(x, *args, **kwargs):
        if not exempt and not isinstance(x, torch.Tensor):
            raise AssertionError(f"upload of a host {type(x).__name__} inside a static step")
        return upload(x, *args, **kwargs)
    return checked


def _forbidden(name: str, original, exempt: list):
    """Tensor.<name> that fails, except inside Triton's interpreter (which emulates the GPU on the host) and
    while `exempt` is not empty."""
    def read(self, *args, **kwargs):
        if exempt:
            return original(self, *args, **kwargs)
        frame = sys._getframe(1)
        while frame is not None:
            if f"{os.sep}triton{os.sep}runtime{os.sep}" in frame.f_code.co_filename:
                return original(self, *args, **kwargs)
            frame = frame.f_back
        raise AssertionError(f"Tensor.{name} inside a static step")
    return read


@pytest.mark.gpu
def test_captured_steps_draw_what_eager_steps_draw_on_cuda() -> None:
    """`cuda_graphs=True` on the GPU: small steps are captured, then replayed with other pages, inputs and text;
    the images equal the eager engine's (bf16: the same kernels on the same data give the same pixels). The
    512x512 pairs reach 32x32 (1024 queries a row): their last step takes the gathered cuDNN route."""
    options = dict(device="cuda", num_pages=40000, page_size=16, max_num_seqs=8)
    large = [[("a red box", 5, 2), ("a green circle", 6, 2)], [("a dog", 7, 2), ("a bush", 8, 2)]]
    passes = [JOBS, AGAIN, *large]
    eager = Engine("test-small", cuda_graphs=False, **options)
    want = {k: v for jobs in passes for k, v in run(eager, staggered=False, jobs=jobs).items()}
    engine = Engine("test-small", **options)  # on by default on CUDA in bf16
    images = {k: v for jobs in passes for k, v in run(engine, staggered=False, jobs=jobs).items()}
    graphs = engine.runner.graphs
    assert graphs.graphs and all(g.graph is not None for g in graphs.graphs.values()) and not graphs.refused
    assert {r for g in graphs.graphs.values() for r in g.kv.static_route} == {"triton", "sdpa_gather"}
    assert graphs.steps > len(graphs.graphs)  # replays of captured shapes
    for prompt, image in images.items():
        np.testing.assert_array_equal(image, want[prompt], err_msg=prompt)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device and bfloat16"):
        Engine("test-small", cuda_graphs=True, device="cuda", dtype="float32", num_pages=100)
    assert Engine("test-small", device="cuda", dtype="float32", num_pages=100).runner.graphs is None
    assert Engine("test-small", device="cuda", attention_backend="varlen_fa2", num_pages=100).runner.graphs is None


@pytest.mark.gpu
def test_a_failed_capture_runs_its_shape_eagerly_and_leaves_the_device_as_it_was(monkeypatch) -> None:
    """A capture that fails (here: a device sync inside it) used to leave the default CUDA generator in capture
    mode, so every random op after it raised, the graph pool recording, so every later capture failed too, and the
    capture stream current. Now that shape runs eagerly, later shapes are captured, and the images equal the eager
    engine's."""
    options = dict(device="cuda", num_pages=40000, page_size=16, max_num_seqs=8)
    want = run(Engine("test-small", cuda_graphs=False, **options), staggered=False)
    forward, failed = infinity.Infinity.forward, []

    def fail_first_capture(self, *args):
        if torch.cuda.is_current_stream_capturing() and not failed:
            failed.append(True)
            torch.cuda.synchronize()  # not allowed while capturing: raises, and the capture is invalidated
        return forward(self, *args)

    monkeypatch.setattr(infinity.Infinity, "forward", fail_first_capture)
    engine = Engine("test-small", **options)
    images = run(engine, staggered=False)
    graphs = engine.runner.graphs
    assert failed and len(graphs.refused) == 1
    assert graphs.graphs and all(g.graph is not None for g in graphs.graphs.values())
    assert torch.randn(4, device="cuda").isfinite().all()
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    for prompt, image in images.items():
        np.testing.assert_array_equal(image, want[prompt], err_msg=prompt)


POLICY_PASSES = [[*JOBS[::2], *AGAIN[::2]], [("a cow", 9, 0), ("a hat", 10, 0), ("a bird", 11, 0), ("a box", 12, 0)]]


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["scalekv", "heatkv"])
def test_captured_steps_with_cuts_draw_what_eager_steps_draw_on_cuda(policy: str, heat_calibration: str) -> None:
    """Steps whose layers move tokens, captured: the second pass replays the first one's graphs."""
    options = dict(device="cuda", num_pages=40000, page_size=16, max_num_seqs=8, kv_policy=policy, kv_budget=0.2,
                   kv_calibration=heat_calibration if policy == "heatkv" else None)
    eager = Engine("test-small", cuda_graphs=False, **options)
    want = {k: v for jobs in POLICY_PASSES for k, v in run(eager, staggered=False, jobs=jobs).items()}
    engine = Engine("test-small", **options)
    images = {k: v for jobs in POLICY_PASSES for k, v in run(engine, staggered=False, jobs=jobs).items()}
    graphs = engine.runner.graphs
    assert graphs.graphs and all(g.graph is not None for g in graphs.graphs.values()) and not graphs.refused
    assert graphs.steps == 2 * len(graphs.graphs)
    for prompt, image in images.items():
        np.testing.assert_array_equal(image, want[prompt], err_msg=prompt)


def test_cuda_graphs_refuse_a_cpu_engine_and_are_off_there_by_default() -> None:
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        Engine("test-small", cuda_graphs=True, device="cpu", num_pages=100)
    assert Engine("test-small", device="cpu", num_pages=100).runner.graphs is None


def test_cuda_graphs_need_cuda_a_half_dtype_and_a_backend_a_graph_can_hold() -> None:
    """What `cuda_graphs=True` refuses with a ValueError, and where the default (None) leaves graphs off."""
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert graphs_refusal(cuda, torch.bfloat16, "hybrid") is None
    assert graphs_refusal(cuda, torch.float16, "sdpa_gather") is None
    assert "not cpu" in graphs_refusal(torch.device("cpu"), torch.bfloat16, "hybrid")
    assert "torch.float32" in graphs_refusal(cuda, torch.float32, "triton")
    for backend in ("varlen_fa2", "flash_attn", "reference"):
        assert repr(backend) in graphs_refusal(cuda, torch.bfloat16, backend)


def test_cuda_graphs_flag_of_the_cli() -> None:
    parser = build_parser()
    assert parser.parse_args(["generate", "x", "--out", "o"]).cuda_graphs is None  # the engine's default
    assert parser.parse_args(["generate", "x", "--out", "o", "--cuda-graphs"]).cuda_graphs is True
    assert parser.parse_args(["generate", "x", "--out", "o", "--no-cuda-graphs"]).cuda_graphs is False
