"""Data-parallel serving on CPU: `Engine(..., data_parallel_size=2)` runs two test-small replicas as processes.

float64, as in test_engine.py: on CPU a float32 image depends, by +-1 in a few dozen pixels, on the batch it
ran in and on the thread count, and replicas batch differently from a single engine; float64 images do not.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from varserve import Engine, SamplingParams
from varserve.benchmark import run_benchmark
from varserve.cli import main
from varserve.parallel import DataParallelEngine, _Replica

ENGINE = dict(dtype="float64", num_pages=4096, page_size=16, max_num_seqs=4)
SIZE = "256x256"
PROMPTS = ["a red fox in the snow", "a blue square", "a green tree", "a yellow star"]
SEEDS = [3, 1, 4, 5]


def params(seed: int) -> SamplingParams:
    return SamplingParams(size=SIZE, seed=seed)


@pytest.fixture(scope="module")
def reference() -> dict[tuple[str, int], np.ndarray]:
    """Images of a single engine, by (prompt, seed)."""
    single = Engine("test-small", data_parallel_size=1, **ENGINE)
    assert type(single) is Engine  # data_parallel_size=1 is the plain engine
    outputs = single.generate(PROMPTS, [params(s) for s in SEEDS], use_tqdm=False)
    return {(o.prompt, o.seed): np.asarray(o.image) for o in outputs}


def child_processes() -> list[str]:
    """Command lines of the processes this one spawned with multiprocessing, but its resource tracker (a helper
    of every spawning process, which lives as long as the process)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):  # gone meanwhile
            continue
        if parent == os.getpid() and "multiprocessing.spawn" in command:
            children.append(command)
    return children


def assert_no_children(engine: DataParallelEngine) -> None:
    assert child_processes() == []
    for replica in engine.replicas:
        with pytest.raises(ProcessLookupError):
            os.kill(replica.process.pid, 0)


def run_to_end(engine: Engine, max_steps: int = 100) -> dict:
    outputs = {}
    for _ in range(max_steps):
        outputs.update((o.request_id, o) for o in engine.step())
        if not engine.has_unfinished_requests():
            return outputs
    raise AssertionError("requests did not finish")


def assert_idle(engine: DataParallelEngine) -> None:
    stats = engine.cache_stats()
    assert not engine.has_unfinished_requests()
    assert stats["used_pages"] == 0 and stats["free_pages"] == stats["total_pages"] == 2 * 4095
    assert [r["used_pages"] for r in stats["replicas"]] == [0, 0]


class TestTwoReplicas:
    """One engine of two replicas for these tests (only one can live in a process at a time)."""

    @pytest.fixture(scope="class")
    def dp(self) -> DataParallelEngine:
        engine = Engine("test-small", data_parallel_size=2, device="cpu", **ENGINE)
        assert isinstance(engine, DataParallelEngine)
        yield engine
        engine.shutdown()
        assert_no_children(engine)

    def test_routing_spreads_requests_and_images_equal_a_single_engine(self, dp, reference) -> None:
        ids = [dp.add_request(p, params(s)) for p, s in zip(PROMPTS, SEEDS)]
        assert [dp.replica_of(i) for i in ids] == [0, 1, 0, 1]  # most free pages net of queued requests
        assert [r["waiting"] for r in dp.cache_stats()["replicas"]] == [2, 2]
        outputs = run_to_end(dp)
        assert set(outputs) == set(ids)
        for out in outputs.values():
            assert out.finish_reason == "finished" and out.error is None
            np.testing.assert_array_equal(np.asarray(out.image), reference[out.prompt, out.seed])
        assert_idle(dp)
        assert dp.cache_stats()["peak_used_pages"] == sum(r["peak_used_pages"] for r in dp.cache_stats()["replicas"])

    def test_generate_keeps_input_order(self, dp, reference) -> None:
        order = [3, 0, 2]
        outputs = dp.generate([PROMPTS[i] for i in order], [params(SEEDS[i]) for i in order], use_tqdm=False)
        assert [(o.prompt, o.seed) for o in outputs] == [(PROMPTS[i], SEEDS[i]) for i in order]
        for out in outputs:
            np.testing.assert_array_equal(np.asarray(out.image), reference[out.prompt, out.seed])
        assert_idle(dp)

    def test_abort_across_replicas(self, dp) -> None:
        ids = [dp.add_request(p, params(1)) for p in PROMPTS[:3]]
        assert [dp.replica_of(i) for i in ids] == [0, 1, 0]
        assert dp.step() == []
        assert dp.cache_stats()["running"] == 3 and dp.cache_stats()["used_pages"] > 0
        assert dp.abort(ids[1]) and dp.abort(ids[2])
        assert not dp.abort(ids[1]) and not dp.abort("no-such-request")
        assert [r["running"] for r in dp.cache_stats()["replicas"]] == [1, 0]
        assert set(run_to_end(dp)) == {ids[0]}
        assert_idle(dp)

    def test_bad_input_raises_in_the_front_end(self, dp) -> None:
        with pytest.raises(ValueError, match="over the 128-token limit"):
            dp.add_request("x" * 300, params(0))
        with pytest.raises(ValueError, match="already in use"):
            dp.add_request("a cat", params(0), request_id="same")
            dp.add_request("a cat", params(0), request_id="same")
        assert dp.abort("same")
        with pytest.raises(RuntimeError, match=r"replica \d .*ZeroDivisionError"):
            dp.run_on_replicas(_divide_by_zero)
        assert dp.cache_stats()["live_replicas"] == 2  # a failed call leaves the replicas serving
        assert_idle(dp)

    def test_data_parallel_bench_reports_each_replica(self, dp) -> None:
        result = run_benchmark(dp, num_prompts=2, params=params(0), warmup=0, use_tqdm=False)
        assert result["data_parallel_size"] == 2 and result["device"] == "cpu,cpu"
        assert [(r["replica"], r["images"]) for r in result["replicas"]] == [(0, 1), (1, 1)]
        assert sum(r["images_per_second"] for r in result["replicas"]) == pytest.approx(result["images_per_second"])
        assert_idle(dp)


def test_killed_replica_fails_its_requests_and_the_other_keeps_serving(reference) -> None:
    with Engine("test-small", data_parallel_size=2, device="cpu", **ENGINE) as engine:
        lost, kept = (engine.add_request(p, params(s)) for p, s in zip(PROMPTS[:2], SEEDS[:2]))
        assert (engine.replica_of(lost), engine.replica_of(kept)) == (0, 1)
        engine.step()
        os.kill(engine.replicas[0].process.pid, signal.SIGKILL)
        t0 = time.monotonic()
        outputs = run_to_end(engine)
        assert outputs[lost].finish_reason == "failed" and outputs[lost].image is None
        assert "replica 0 (cpu, pid" in outputs[lost].error and "SIGKILL" in outputs[lost].error
        np.testing.assert_array_equal(np.asarray(outputs[kept].image), reference[PROMPTS[1], SEEDS[1]])
        stats = engine.cache_stats()
        assert stats["live_replicas"] == 1 and stats["total_pages"] == 4095
        assert [r["alive"] for r in stats["replicas"]] == [False, True] and "SIGKILL" in stats["replicas"][0]["error"]
        again = engine.add_request(PROMPTS[2], params(SEEDS[2]))
        assert engine.replica_of(again) == 1
        out = run_to_end(engine)[again]
        np.testing.assert_array_equal(np.asarray(out.image), reference[PROMPTS[2], SEEDS[2]])
        assert time.monotonic() - t0 < 60

        engine.run_on_replicas(_break_step)  # now replica 1 raises in its next step
        doomed = engine.add_request(PROMPTS[3], params(SEEDS[3]))
        out = run_to_end(engine)[doomed]
        assert out.finish_reason == "failed" and "replica 1" in out.error and "raised RuntimeError: boom" in out.error
        with pytest.raises(RuntimeError, match="no live replica left"):
            engine.add_request(PROMPTS[0], params(0))
    assert_no_children(engine)
    with pytest.raises(RuntimeError, match="shut down"):
        engine.step()


def test_start_up_failure_names_the_replica_and_leaves_no_process() -> None:
    with pytest.raises(ValueError, match=r"replica \d \(cpu, pid \d+\) failed to start: .*no-such-model"):
        Engine("no-such-model", data_parallel_size=2, device="cpu")
    assert child_processes() == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(data_parallel_size=0), "data_parallel_size"),
    (dict(data_parallel_size=2, device="cuda:1"), "replica i runs on cuda:i"),
    (dict(data_parallel_size=2, device="meta"), "run on 'cuda' or 'cpu'"),
])
def test_bad_configuration_raises_before_spawning(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        Engine("test-small", **kwargs)
    assert child_processes() == []


def test_cli_bench_data_parallel(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--data-parallel", "2", "--device", "cpu", "--num-prompts", "2", "--warmup", "0",
               "--size", SIZE, "--num-pages", "4096", "--page-size", "16", "--no-progress", "--output-json", str(out),
               "--log-level", "WARNING"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["data_parallel_size"] == 2 and [r["images"] for r in result["replicas"]] == [1, 1]
    assert "per replica" in capsys.readouterr().out
    assert child_processes() == []
    assert main(["bench", "--data-parallel", "0"]) == 2


def _divide_by_zero(engine: Engine) -> float:
    return 1 / 0


def _break_step(engine: Engine) -> None:
    def boom():
        raise RuntimeError("boom")

    engine.step = boom


@pytest.mark.gpu
def test_a_cuda_replica_draws_what_a_plain_engine_draws() -> None:
    """The replica path on CUDA (spawned process, cuda:0, gloo transfers of the images) on the one GPU a test
    machine may have: bf16, so the same batch on the same device gives the same pixels."""
    prompts = ["a red circle at the top left", "a blue square", "a green triangle at the bottom"]
    seeded = [SamplingParams(size="512x512", seed=i) for i in range(len(prompts))]
    with DataParallelEngine("tiny", data_parallel_size=1, device="cuda") as dp:
        replicated = dp.generate(prompts, seeded, use_tqdm=False)
        assert [r["device"] for r in dp.cache_stats()["replicas"]] == ["cuda:0"]
    plain = Engine("tiny", device="cuda").generate(prompts, seeded, use_tqdm=False)
    for a, b in zip(replicated, plain):
        np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))


def test_death_waits_for_a_dying_process_to_report_its_signal() -> None:
    """A reset connection can arrive before the OS reports the death; the reason must still name the signal."""
    process = mp.get_context("spawn").Process(target=time.sleep, args=(60,))
    process.start()
    replica = _Replica(0, "cpu", process, link=None)
    assert replica.death() is None
    threading.Timer(0.3, os.kill, (process.pid, signal.SIGKILL)).start()
    assert replica.death(wait=10) == "its process was killed by SIGKILL"
