"""AsyncEngine: concurrent awaits give the same images as the synchronous engine; cancelling frees pages."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from varserve import AsyncEngine, Engine, SamplingParams

SMALL = "256x256"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("test-small", dtype="float64", num_pages=40000, page_size=16)


def test_concurrent_generate_matches_engine(engine: Engine) -> None:
    params = [SamplingParams(size=SMALL, seed=s) for s in (1, 2, 3)]
    prompts = ["a red circle", "a blue square", "a green star"]
    expected = [np.asarray(o.image) for o in engine.generate(prompts, params, use_tqdm=False)]
    front = AsyncEngine(engine)

    async def run() -> list:
        return await asyncio.wait_for(asyncio.gather(*(front.generate(p, q) for p, q in zip(prompts, params))), 120)

    outputs = asyncio.run(run())
    for out, image in zip(outputs, expected):
        np.testing.assert_array_equal(np.asarray(out.image), image)
    assert engine.cache_stats()["used_pages"] == 0


def test_cancel_aborts_and_frees_pages(engine: Engine) -> None:
    front = AsyncEngine(engine)

    async def run() -> None:
        task = asyncio.create_task(front.generate("cancelled", SamplingParams(size=SMALL, seed=4)))
        while engine.cache_stats()["used_pages"] == 0:  # wait until it holds pages
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        kept = await asyncio.wait_for(front.generate("kept", SamplingParams(size=SMALL, seed=5)), 120)
        assert kept.image is not None

    asyncio.run(asyncio.wait_for(run(), 180))
    assert engine.cache_stats()["used_pages"] == 0
    assert not engine.has_unfinished_requests()


def test_abort_ends_the_waiting_generate_call(engine: Engine) -> None:
    front = AsyncEngine(engine)

    async def run() -> None:
        task = asyncio.create_task(front.generate("aborted", SamplingParams(size=SMALL, seed=6), request_id="gone"))
        while engine.cache_stats()["used_pages"] == 0:
            await asyncio.sleep(0.01)
        assert await front.abort("gone") and not await front.abort("gone")
        with pytest.raises(RuntimeError, match="request gone was aborted"):
            await asyncio.wait_for(task, 30)
        task = asyncio.create_task(front.generate("aborted behind its back", SamplingParams(size=SMALL, seed=7),
                                                  request_id="direct"))
        while engine.cache_stats()["used_pages"] == 0:
            await asyncio.sleep(0.01)
        async with front._lock:
            assert engine.abort("direct")
        with pytest.raises(RuntimeError, match="left the engine without an output"):
            await asyncio.wait_for(task, 30)

    asyncio.run(asyncio.wait_for(run(), 120))
    assert engine.cache_stats()["used_pages"] == 0 and not engine.has_unfinished_requests()


def test_bad_input_raises_value_error(engine: Engine) -> None:
    front = AsyncEngine(engine)
    with pytest.raises(ValueError, match="token limit"):
        asyncio.run(front.generate("x" * 500, SamplingParams(size=SMALL)))


def test_reused_request_id_does_not_drop_the_newer_call(engine: Engine) -> None:
    front = AsyncEngine(engine)

    async def run() -> None:
        params = SamplingParams(size=SMALL, seed=6)
        first = asyncio.create_task(front.generate("one", params, request_id="same"))
        await first
        second = await asyncio.wait_for(front.generate("two", params, request_id="same"), 120)
        assert second.prompt == "two"

    asyncio.run(asyncio.wait_for(run(), 180))
    assert engine.cache_stats()["used_pages"] == 0
