"""An asyncio front for embedding the engine in async servers.

One background task steps the engine while requests are in flight; each `generate` call awaits its own
image. The engine runs in a worker thread so the event loop stays responsive during a step. Cancelling a
`generate` call (e.g. a client disconnect) aborts its request and frees its pages; `abort(request_id)` does
the same and makes that `generate` call raise RuntimeError.
"""

from __future__ import annotations

import asyncio
import logging

from varserve.engine import Engine
from varserve.outputs import ImageOutput
from varserve.params import SamplingParams

logger = logging.getLogger("varserve")


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._waiters: dict[str, asyncio.Future[ImageOutput]] = {}
        self._lock = asyncio.Lock()  # the engine is not thread-safe: one call into it at a time
        self._loop_task: asyncio.Task | None = None
        self.error: Exception | None = None  # why the step loop died (the engine's state is then unknown)

    async def generate(self, prompt: str, params: SamplingParams | None = None, *, request_id: str | None = None,
                       priority: int = 0) -> ImageOutput:
        """One image. Raises ValueError for bad input, RuntimeError if the image failed or the loop died."""
        if self.error is not None:
            raise RuntimeError(f"the engine loop died: {self.error}")
        async with self._lock:
            rid = self.engine.add_request(prompt, params, request_id=request_id, priority=priority)
        future = asyncio.get_running_loop().create_future()
        self._waiters[rid] = future
        self._ensure_loop()
        try:
            out = await future
        except asyncio.CancelledError:
            if self._waiters.get(rid) is future:  # shielded: a second cancel must not leave its pages held
                await asyncio.shield(self.abort(rid))
            raise
        finally:
            if self._waiters.get(rid) is future:  # the id may already serve a newer call: leave that one alone
                del self._waiters[rid]
        if out.error:
            raise RuntimeError(f"request {rid} failed: {out.error}")
        return out

    async def abort(self, request_id: str) -> bool:
        """Abort a request and free its pages; its `generate` call raises RuntimeError. False if unknown or done."""
        async with self._lock:
            aborted = self.engine.abort(request_id)
        if aborted:
            self._settle(request_id, RuntimeError(f"request {request_id} was aborted"))
        return aborted

    def _settle(self, request_id: str, error: Exception) -> None:
        future = self._waiters.get(request_id)
        if future is not None and not future.done():
            future.set_exception(error)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._waiters:
                async with self._lock:
                    outputs = await asyncio.to_thread(self.engine.step)
                for out in outputs:
                    future = self._waiters.get(out.request_id)
                    if future is not None and not future.done():
                        future.set_result(out)
                if not self.engine.has_unfinished_requests():  # e.g. aborted on the engine directly
                    for rid in list(self._waiters):
                        self._settle(rid, RuntimeError(f"request {rid} left the engine without an output"))
                await asyncio.sleep(0)
        except Exception as exc:  # a bug outside the model (the engine fails model errors per request)
            logger.exception("the engine loop died; failing every request")
            self.error = exc
            for future in self._waiters.values():
                if not future.done():
                    future.set_exception(RuntimeError(f"the engine loop died: {exc}"))
