"""The paged engine against the dense reference path, batch invariance, aborts, failures and bad input.

Everything runs the test-small model in float64 so that paged and dense attention agree to the last bit of the
sampled images (both sum the same products; only rounding order could differ, far below any bit flip).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import varserve
from varserve import Engine, SamplingParams
from varserve.config import EngineConfig
from varserve.models.generation import ScaleSampling
from varserve.models.reference import generate_dense
from varserve.params import default_params

SMALL = "256x256"
TALL = "1:2@256"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("test-small", dtype="float64", num_pages=40000, page_size=16, max_num_seqs=8)


def dense_image(engine: Engine, prompt: str, params: SamplingParams) -> np.ndarray:
    r = engine.runner
    sampling = ScaleSampling(params.cfg, params.tau, params.top_p)
    image, _ = generate_dense(r.model, r.vae, r.text_encoder, prompt, params.schedule, sampling, params.seed,
                              params.negative_prompt)
    return image.numpy()


def assert_clean(engine: Engine) -> None:
    stats = engine.cache_stats()
    assert stats["used_pages"] == 0 and stats["free_pages"] == stats["total_pages"]
    assert not engine.has_unfinished_requests()
    assert not engine.runner.states and not engine.runner.readbacks and not engine.runner.texts


@pytest.mark.parametrize("size", [SMALL, TALL])
def test_full_policy_equals_dense_reference(engine: Engine, size: str) -> None:
    params = SamplingParams(size=size, seed=11)
    out = engine.generate("a red circle on a blue background", params, use_tqdm=False)[0]
    assert out.image.size == params.schedule.image_size
    np.testing.assert_array_equal(np.asarray(out.image), dense_image(engine, out.prompt, params))
    assert_clean(engine)


def test_negative_prompt_and_no_cfg_equal_dense_reference(engine: Engine) -> None:
    for params in (SamplingParams(size=SMALL, seed=5, negative_prompt="blurry"),
                   SamplingParams(size=SMALL, seed=5, cfg=1.0)):
        out = engine.generate("a green square", params, use_tqdm=False)[0]
        np.testing.assert_array_equal(np.asarray(out.image), dense_image(engine, "a green square", params))


def test_batch_invariance_mixed_prompts_sizes_and_arrivals(engine: Engine) -> None:
    target = SamplingParams(size=SMALL, seed=21)
    alone = np.asarray(engine.generate("a yellow star", target, use_tqdm=False)[0].image)
    engine.add_request("first comer", SamplingParams(size=TALL, seed=1), request_id="early")
    engine.step()
    engine.step()
    engine.add_request("a yellow star", target, request_id="target")
    engine.add_request("something else", SamplingParams(size=SMALL, seed=2, cfg=2.5), request_id="other")
    outputs = run_to_end(engine)
    assert set(outputs) == {"early", "target", "other"}
    np.testing.assert_array_equal(np.asarray(outputs["target"].image), alone)
    assert_clean(engine)


def run_to_end(engine: Engine) -> dict:
    outputs = {}
    for _ in range(200):
        for out in engine.step():
            outputs[out.request_id] = out
        if not engine.has_unfinished_requests():
            return outputs
    raise AssertionError("engine did not finish")


def test_abort_midway_frees_pages_and_leaves_others_unchanged(engine: Engine) -> None:
    keep = SamplingParams(size=SMALL, seed=31)
    expected = dense_image(engine, "kept image", keep)
    engine.add_request("kept image", keep, request_id="keep")
    engine.add_request("aborted image", SamplingParams(size=TALL, seed=32), request_id="drop")
    for _ in range(3):
        engine.step()
    assert engine.cache_stats()["used_pages"] > 0
    assert engine.abort("drop")
    assert not engine.abort("drop")
    outputs = run_to_end(engine)
    assert set(outputs) == {"keep"}
    np.testing.assert_array_equal(np.asarray(outputs["keep"].image), expected)
    assert_clean(engine)


def test_an_image_comes_back_from_the_step_after_its_last_scale_and_its_pages_at_once(engine: Engine) -> None:
    """Its decode is read back while the next step runs; with nothing else to run, from the same step."""
    first, later = SamplingParams(size=SMALL, seed=41), SamplingParams(size=SMALL, seed=42)
    expected = dense_image(engine, "first", first)
    scales = len(first.schedule.scales)
    engine.add_request("first", first, request_id="first")
    for _ in range(3):
        assert not engine.step()
    engine.add_request("later", later, request_id="later")  # the next step is planned: it joins the one after
    assert not any(engine.step() for _ in range(scales - 3))  # the last of these ran first's last scale
    assert engine.scheduler.find("first") is None and engine.has_unfinished_requests()
    assert engine.cache_stats()["used_pages"] == engine.block_manager.pages_held(engine.scheduler.find("later"))
    outputs = engine.step()
    assert [o.request_id for o in outputs] == ["first"]
    np.testing.assert_array_equal(np.asarray(outputs[0].image), expected)
    assert not engine.step() and not engine.step()
    assert [o.request_id for o in engine.step()] == ["later"]  # its last three scales
    assert_clean(engine)


def test_the_next_step_is_planned_while_this_one_runs(engine: Engine, monkeypatch) -> None:
    """Step N+1 is scheduled and planned once step N's transformer is launched, before its sampling."""
    planned: list[bool] = []
    sample = engine.runner._sample

    def spy(*args):
        planned.append(engine._next is not None)
        return sample(*args)

    monkeypatch.setattr(engine.runner, "_sample", spy)
    params = SamplingParams(size=SMALL, seed=3)
    engine.generate("one image", params, use_tqdm=False)
    assert planned == [True] * (len(params.schedule.scales) - 1) + [False]


def test_a_request_queues_until_its_first_step_runs_not_until_it_is_planned() -> None:
    """Queue time (and so latency from the first step) ends when the step that runs it starts."""
    engine = Engine("test-small", num_pages=4096, max_num_seqs=1)
    for name in ("first", "second"):
        engine.add_request(name, SamplingParams(size=SMALL, seed=5), request_id=name)
    second = engine.scheduler.find("second")
    while not engine._next or second not in engine._next[0]:
        engine.step()
    assert second.tables is not None and second.first_scheduled_time is None  # planned, not run yet
    engine.step()
    assert second.first_scheduled_time is not None and second.scale == 1
    assert "second" in run_to_end(engine)


def test_a_request_aborted_after_its_next_step_was_planned_runs_with_it_then_goes(engine: Engine) -> None:
    kept, dropped = SamplingParams(size=SMALL, seed=33), SamplingParams(size=TALL, seed=34)
    expected = dense_image(engine, "kept", kept)
    engine.add_request("kept", kept, request_id="kept")
    engine.add_request("dropped", dropped, request_id="dropped")
    engine.step()  # planned the second step, with both
    assert engine.abort("dropped") and not engine.abort("dropped")
    with pytest.raises(ValueError, match="already in use"):  # its rows still run with the planned step
        engine.add_request("again", dropped, request_id="dropped")
    kept_pages = engine.block_manager.pages_held(engine.scheduler.find("kept"))
    assert engine.cache_stats()["used_pages"] > kept_pages
    engine.step()
    assert engine.cache_stats()["used_pages"] == engine.block_manager.pages_held(engine.scheduler.find("kept"))
    engine.add_request("again", dropped, request_id="dropped")
    outputs = run_to_end(engine)
    assert set(outputs) == {"kept", "dropped"} and outputs["dropped"].prompt == "again"
    np.testing.assert_array_equal(np.asarray(outputs["kept"].image), expected)
    assert_clean(engine)


def test_an_image_in_flight_can_be_aborted_and_a_failed_readback_fails_its_request(engine: Engine,
                                                                                monkeypatch) -> None:
    for name, seed in (("dropped", 43), ("lost", 44)):
        engine.add_request(name, SamplingParams(size=SMALL, seed=seed), request_id=name)
    for _ in range(3):
        engine.step()
    engine.add_request("other", SamplingParams(size=SMALL, seed=45), request_id="other")
    while engine.scheduler.find("lost") is not None:
        assert not engine.step()
    with pytest.raises(ValueError, match="already in use"):  # its image is still to come
        engine.add_request("again", SamplingParams(size=SMALL), request_id="lost")
    assert engine.abort("dropped") and not engine.abort("dropped")
    original = engine.runner.collect

    def broken(latest: bool):
        raise RuntimeError("copy to the host failed")

    monkeypatch.setattr(engine.runner, "collect", broken)
    outputs = engine.step()
    monkeypatch.setattr(engine.runner, "collect", original)
    assert [o.request_id for o in outputs] == ["lost"] and "copy to the host failed" in outputs[0].error
    assert set(run_to_end(engine)) == {"other"}
    assert_clean(engine)


def test_aborting_the_last_requests_drops_their_images_in_flight(engine: Engine) -> None:
    engine.add_request("ends first", SamplingParams(size=SMALL, seed=46), request_id="first")
    engine.step()
    engine.add_request("ends later", SamplingParams(size=TALL, seed=47), request_id="later")
    while engine.scheduler.find("first") is not None:
        assert not engine.step()
    assert engine.runner.readbacks and engine.cache_stats()["decoding"] == 1
    assert engine.abort("later") and engine.abort("first")
    assert_clean(engine)


def test_abort_waiting_request(engine: Engine) -> None:
    engine.add_request("never runs", SamplingParams(size=SMALL, seed=1), request_id="queued")
    assert engine.abort("queued")
    assert engine.step() == []
    assert_clean(engine)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.generate([], use_tqdm=False), "empty"),
        (lambda e: e.generate(["ok", 3], use_tqdm=False), r"prompts\[1\]"),
        (lambda e: e.generate("x", SamplingParams(size="999x999"), use_tqdm=False), "size"),
        (lambda e: e.generate("x", [SamplingParams(), SamplingParams()], use_tqdm=False), "2 SamplingParams"),
        (lambda e: e.generate("x" * 500, SamplingParams(size=SMALL), use_tqdm=False), "token limit"),
        (lambda e: e.add_request(None), "str"),
        (lambda e: e.add_request("x", SamplingParams(size=SMALL), priority="high"), "priority"),
        (lambda e: e.add_request("x", SamplingParams(size=SMALL), priority=None), "priority"),
        (lambda e: e.generate("x", {"seed": 1}, use_tqdm=False), "params must be SamplingParams, a list"),
    ],
)
def test_bad_input_raises_and_engine_keeps_serving(engine: Engine, call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(engine)
    assert_clean(engine)
    out = engine.generate("still serving", SamplingParams(size=SMALL, seed=3), use_tqdm=False)[0]
    assert out.image is not None


@pytest.mark.parametrize("field, value", [("cfg", -1.0), ("tau", math.nan), ("tau", 0.0), ("top_p", 1.5),
                                          ("seed", -1), ("size", "12x7")])
def test_sampling_params_validation_names_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_negative_prompt_needs_guidance_and_engine_seeds_fit_a_generator() -> None:
    with pytest.raises(ValueError, match="negative_prompt has no effect at cfg 1.0"):
        SamplingParams(cfg=1.0, negative_prompt="blurry")
    with pytest.raises(ValueError, match="seed"):
        EngineConfig(seed=2**64)


def test_outputs_of_other_requests_survive_generate_and_an_interrupted_generate_leaves_nothing(
        engine: Engine, monkeypatch) -> None:
    engine.add_request("added before", SamplingParams(size=SMALL, seed=41), request_id="before")
    (mine,) = engine.generate("my own", SamplingParams(size=SMALL, seed=42), use_tqdm=False)
    assert mine.image is not None and engine.has_unfinished_requests()  # "before" ended inside generate
    outputs = run_to_end(engine)
    assert list(outputs) == ["before"] and outputs["before"].image is not None
    assert_clean(engine)
    real_step, calls = engine.step, []

    def interrupted() -> list:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(["a", "b"], SamplingParams(size=SMALL, seed=43), use_tqdm=False)
    monkeypatch.undo()
    assert_clean(engine)


def test_default_params_take_given_values_then_the_models_then_samplingparams() -> None:
    assert default_params("tiny") == SamplingParams(cfg=2.0, tau=0.5, size="512x512")  # tiny's (ModelConfig.sampling)
    assert default_params("tiny", cfg=3.0, tau=None, size=SMALL) == SamplingParams(cfg=3.0, tau=0.5, size=SMALL)
    assert default_params("test-small") == SamplingParams() == default_params(None) == default_params("a/path")
    shipped = Path(varserve.__file__).parent / "weights" / "tiny"
    assert default_params(str(shipped)) == default_params("tiny")  # a path gets its preset's recommendation
    with pytest.raises(ValueError, match="cfg"):
        default_params("tiny", cfg=-1.0)
    assert SamplingParams(cfg=2.0).updated(seed=3) == SamplingParams(cfg=2.0, seed=3)
    with pytest.raises(ValueError, match="tau"):
        SamplingParams().updated(tau=0.0)  # validated, unlike model_copy


def test_engine_without_params_samples_with_the_models_defaults(engine: Engine) -> None:
    assert engine.default_params == SamplingParams()  # test-small recommends nothing of its own
    engine.default_params = SamplingParams(size=SMALL, seed=8, cfg=2.5)
    try:
        out = engine.generate("defaults", use_tqdm=False)[0]
    finally:
        engine.default_params = SamplingParams()
    assert (out.size, out.seed) == (SMALL, 8)
    expected = dense_image(engine, "defaults", SamplingParams(size=SMALL, seed=8, cfg=2.5))
    np.testing.assert_array_equal(np.asarray(out.image), expected)


def test_request_that_can_never_fit_fails_at_once() -> None:
    small = Engine("test-small", num_pages=50, page_size=16)
    with pytest.raises(ValueError, match=r"needs \d+ KV pages at its peak but the pool has 49"):
        small.add_request("too big", SamplingParams(size=SMALL))
    assert_clean(small)


def test_failed_step_fails_its_requests_and_frees_everything(engine: Engine, monkeypatch) -> None:
    engine.add_request("doomed", SamplingParams(size=SMALL, seed=1), request_id="doomed")
    engine.step()
    original = engine.runner.model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(engine.runner.model, "forward", broken)
    outputs = engine.step()
    monkeypatch.setattr(engine.runner.model, "forward", original)
    assert [o.request_id for o in outputs] == ["doomed"]
    assert outputs[0].finish_reason == "failed" and outputs[0].image is None
    assert "device fell over" in outputs[0].error
    assert_clean(engine)
    with pytest.raises(RuntimeError, match="device fell over"):
        monkeypatch.setattr(engine.runner.model, "forward", broken)
        engine.generate("also doomed", SamplingParams(size=SMALL), use_tqdm=False)
    monkeypatch.setattr(engine.runner.model, "forward", original)
    assert_clean(engine)


def test_a_step_failing_after_the_next_was_planned_requeues_the_requests_it_admitted(engine: Engine,
                                                                                    monkeypatch) -> None:
    """The newcomer was admitted into the planned next step, which never runs: it waits, then starts afresh."""
    later = SamplingParams(size=SMALL, seed=2)
    expected = dense_image(engine, "newcomer", later)
    engine.add_request("doomed", SamplingParams(size=TALL, seed=1), request_id="doomed")
    engine.step()
    engine.add_request("newcomer", later, request_id="newcomer")

    def broken(*args):
        raise RuntimeError("sampling fell over")

    monkeypatch.setattr(engine.runner, "_sample", broken)
    outputs = engine.step()
    monkeypatch.undo()
    assert [o.request_id for o in outputs] == ["doomed"] and "sampling fell over" in outputs[0].error
    assert engine.scheduler.find("newcomer").scale == 0 and engine.cache_stats()["used_pages"] == 0
    outputs = run_to_end(engine)
    np.testing.assert_array_equal(np.asarray(outputs["newcomer"].image), expected)
    assert_clean(engine)


def test_metrics_report_measured_pages(engine: Engine) -> None:
    params = SamplingParams(size=SMALL, seed=4)
    out = engine.generate("metrics", params, use_tqdm=False)[0]
    m = out.metrics
    assert m.scales == params.schedule.num_scales
    assert 0 < m.mean_kv_pages <= m.peak_kv_pages
    assert m.peak_kv_bytes == m.peak_kv_pages * engine.runner.page_bytes
    assert m.latency_s > 0 and m.queue_s >= 0
    assert out.seed == 4 and out.size == SMALL


def test_seed_none_draws_and_reports_a_seed(engine: Engine) -> None:
    a, b = engine.generate(["same", "same"], SamplingParams(size=SMALL), use_tqdm=False)
    assert a.seed != b.seed
    again = engine.generate("same", SamplingParams(size=SMALL, seed=a.seed), use_tqdm=False)[0]
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(a.image))


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["full", "scalekv"])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_steps_never_wait_for_the_device_on_cuda(policy: str, cuda_graphs: bool) -> None:
    """No step synchronises with the device (an implicit copy, `.item()`, a mask index...) except to read
    images back, whose wait `collect` places after the next step is queued (the text encoder, given prompts of
    different lengths, runs them unpadded: a padding mask made transformers' T5 read it on the host): eager
    steps, and CUDA graph replays (of the shapes a first, unchecked pass captured)."""
    import torch

    engine = Engine("test-small", device="cuda", kv_policy=policy, kv_budget=0.3 if policy == "scalekv" else 1.0,
                    cuda_graphs=cuda_graphs, num_pages=40000, page_size=16)

    def allowed(fn):
        def call(*args, **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return call

    engine.runner.collect = allowed(engine.runner.collect)
    for checked in ([False, True] if cuda_graphs else [True]):
        for i, size in enumerate(("512x512", TALL, SMALL)):  # 512x512's last scale takes gathered cuDNN
            engine.add_request(f"image {i}", SamplingParams(size=size, seed=i))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if checked else 0)
        try:
            outputs = run_to_end(engine)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert len(outputs) == 3 and all(o.image is not None for o in outputs.values())
    assert not cuda_graphs or engine.runner.graphs.steps > len(engine.runner.graphs.graphs)


@pytest.mark.gpu
def test_a_cudnn_engine_builds_its_graphs_at_start_and_none_in_steps() -> None:
    """The graphs built when the engine starts are the ones 1024x1024 steps of any number of rows look up."""
    from varserve.attention import available_backends, cudnn_paged

    if "cudnn" not in available_backends("cuda"):
        pytest.skip("the cuDNN frontend is not installed (pip install 'varserve[cudnn]')")
    cudnn_paged._graph.cache_clear()
    engine = Engine("test-small", device="cuda", attention_backend="cudnn", cuda_graphs=False, num_pages=100000)
    built = cudnn_paged._graph.cache_info().misses
    assert built >= 4
    outputs = engine.generate([f"image {i}" for i in range(5)], SamplingParams(seed=3), use_tqdm=False)
    assert all(o.image is not None for o in outputs)
    assert cudnn_paged._graph.cache_info().misses == built


@pytest.mark.parametrize("user_setting", [None, "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_cuda_allocator_grows_segments_unless_the_user_configured_it(user_setting: str | None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from varserve import model_runner

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    if user_setting:
        monkeypatch.setenv(user_setting, "max_split_size_mb:512")
    model_runner._growable_segments()
    assert calls == ([] if user_setting else ["expandable_segments:True"])


def test_the_attention_backend_prepares_each_image_size_once_before_its_steps(monkeypatch) -> None:
    """The engine hands the backend every scale's largest call (rows, tokens, queries, table width: the widest of
    the scales up to it) once per size: the default size at start, another before the first step that runs it."""
    from varserve.attention import paged

    prepared: list[list] = []
    monkeypatch.setitem(paged.BACKENDS, "preparing", paged.Backend(
        paged.BACKENDS["reference"].fn, lambda device: True,
        prepare=lambda k_pages, heads, scale, shapes: prepared.append(shapes) or len(shapes)))
    engine = Engine("test-small", dtype="float64", num_pages=40000, page_size=16, max_num_seqs=8,
                    kv_policy="scalekv", kv_budget=0.3, attention_backend="preparing")
    assert len(prepared) == 1
    engine.add_request("a red circle", SamplingParams(size=SMALL, seed=1))
    assert len(prepared) == 1  # adding a request never waits for it: the next step prepares first
    run_to_end(engine)
    engine.generate("a red circle", SamplingParams(size=SMALL, seed=2), use_tqdm=False)
    assert len(prepared) == 2
    schedule = SamplingParams(size=SMALL).schedule
    attend = engine.policy.plan(engine.model_config, schedule).attend_len.max(axis=(1, 2))
    widths = [-(-int(attend[: s + 1].max()) // 16) for s in range(len(attend))]
    assert [(s.rows, s.tokens, s.max_q, s.pages) for s in prepared[1]] == [
        (16, engine.runner.max_num_batched_tokens, n, w) for n, w in zip(schedule.tokens, widths)]
    assert_clean(engine)


def test_prompts_waiting_to_start_are_encoded_ahead_in_one_call_and_dropped_on_abort(monkeypatch) -> None:
    """A step encodes the prompts of the requests it starts and of waiting ones, up to TEXT_AHEAD held, at once;
    a request that starts later finds its features; an aborted waiting request's go; images equal the dense
    reference."""
    from varserve import model_runner

    monkeypatch.setattr(model_runner, "TEXT_AHEAD", 2)
    engine = Engine("test-small", dtype="float64", num_pages=40000, page_size=16, max_num_seqs=1)
    calls: list[int] = []
    encode = engine.runner.text_encoder.encode
    engine.runner.text_encoder.encode = lambda prompts: calls.append(len(prompts)) or encode(prompts)
    params = [SamplingParams(size=SMALL, seed=i, negative_prompt="blurry" if i == 1 else None) for i in range(4)]
    ids = [engine.add_request(f"shape {i}" + "!" * i, p) for i, p in enumerate(params)]
    engine.step()
    assert calls == [2, 1] and list(engine.runner.texts) == [ids[1]]  # the 1st started, the 2nd held
    assert engine.abort(ids[1])
    outputs = run_to_end(engine)
    assert calls == [2, 1, 2] and sorted(outputs) == sorted([ids[0], ids[2], ids[3]])  # the 3rd and 4th at once
    np.testing.assert_array_equal(np.asarray(outputs[ids[3]].image), dense_image(engine, "shape 3!!!", params[3]))
    assert_clean(engine)
