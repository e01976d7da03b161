"""The engine: requests in, images out. It never touches tensors; the model runner does."""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections import deque
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from varserve.cache.allocator import BlockAllocator
from varserve.cache.block_manager import BlockManager, StepPages
from varserve.cache.policy import KVPlan, make_policy
from varserve.config import EngineConfig
from varserve.model_runner import ModelRunner
from varserve.models.generation import ScaleSampling, num_rows
from varserve.models.schedule import ScaleSchedule
from varserve.outputs import ImageMetrics, ImageOutput
from varserve.params import SamplingParams, default_params
from varserve.scheduler.request import Request, RequestStatus
from varserve.scheduler.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger("varserve")


class Engine:
    """Serves Infinity-family text-to-image models with continuous batching of scale steps.

    model: a preset name ("tiny": the small model shipped in the package; "infinity-2b", "infinity-8b"; "test-small",
        "test-deep": random weights, for tests) or a local weights directory/file.
    kv_policy / kv_budget: which KV policy and which fraction of the full history cache it keeps.
    device / dtype: defaults: CUDA if available, bf16 on CUDA and float32 on CPU.
    gpu_memory_utilization: share of the device memory the engine may use (weights, activations, pages). On CUDA the
        engine turns on PyTorch's expandable segments for the process unless PYTORCH_CUDA_ALLOC_CONF (or
        PYTORCH_ALLOC_CONF) is set.
    max_num_seqs / max_num_batched_tokens: running requests, and query tokens of one step, at most.
    page_size: tokens per page (one head of one layer of one row); default 64 with the full policy, else 32.
    random_weights: no download.
    data_parallel_size: N > 1 builds a `varserve.parallel.DataParallelEngine` instead: N replicas of this
        engine in their own processes, one per GPU, behind the same API (1: this engine, no overhead).
    num_pages: fixes the KV pool's size in pages (else sized from gpu_memory_utilization on CUDA, 512 MiB on CPU).
    weights: a local folder or file of the model's official weights (else they are downloaded).
    attention_backend: the paged attention backend (`varserve.attention.available_backends`); default by device
        (CUDA: `cudnn` where the cuDNN frontend is installed, else `hybrid`; CPU: `reference`).
    seed: seeds random weights (image seeds come from SamplingParams).
    kv_calibration: for scalekv/heatkv, a JSON written by `varserve calibrate` (else the one shipped, if any).
    cuda_graphs: replay small steps from CUDA graphs (`varserve/graphs.py`). None (default): on wherever they can
        run (CUDA, bf16/fp16, attention backend cudnn, hybrid, triton or sdpa_gather); True: required (ValueError where
        they cannot run); False: off.
    Every argument is validated by `EngineConfig` (ValueError naming the field).
    """

    def __new__(cls, *args: Any, data_parallel_size: int = 1, **kwargs: Any) -> "Engine":
        if cls is Engine and data_parallel_size != 1:
            from varserve.parallel import DataParallelEngine  # imported here: it imports this module

            cls = DataParallelEngine
        return super().__new__(cls)

    def __init__(
        self, model: str = "tiny", *, kv_policy: str = "full", kv_budget: float = 1.0, device: str | None = None,
        dtype: str | None = None, gpu_memory_utilization: float = 0.9, max_num_seqs: int = 64,
        max_num_batched_tokens: int | None = None, page_size: int | None = None, random_weights: bool = False,
        **kwargs,
    ):
        self.config = EngineConfig(
            model=model, kv_policy=kv_policy, kv_budget=kv_budget, device=device, dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, page_size=page_size, random_weights=random_weights,
            **kwargs,
        )
        self.default_params = default_params(self.config.model)
        self.policy = make_policy(self.config.kv_policy, self.config.kv_budget, self.config.kv_calibration)
        self.runner = ModelRunner(self.config, self.policy)
        self.model_config = self.runner.model_config
        self.allocator = BlockAllocator(self.runner.num_pages)
        self.block_manager = BlockManager(self.allocator, self.runner.page_size)
        self.scheduler = Scheduler(SchedulerConfig(
            num_pages=self.allocator.num_total - 1, max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.runner.max_num_batched_tokens,
        ))
        self._plans: dict[tuple[str, int], tuple[KVPlan, np.ndarray]] = {}
        self._outbox: deque[ImageOutput] = deque()
        self._decoding: dict[str, Request] = {}  # every scale ran; the image is on its way to the host
        # The next step, scheduled and planned while the device ran the last one (requests aborted since then
        # still run with it, then go), and requests whose device state goes once the current step is launched.
        self._next: tuple[list[Request], StepPages] | None = None
        self._ending: list[Request] = []
        self._log_capacity()
        self.runner.prepare_pending()  # the default size's (planned by _log_capacity): before the first request

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(
        self, prompt: str, params: SamplingParams | None = None, *, request_id: str | None = None, priority: int = 0,
    ) -> str:
        """Queue one image; returns its request id. ValueError for input that can never run."""
        params, request_id = checked_request(prompt, params, request_id, priority, self.default_params)
        if self.scheduler.find(request_id) is not None or request_id in self._decoding or self._planned(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        self.runner.check_prompt(prompt, params.negative_prompt)
        req = self._make_request(request_id, prompt, params, priority)
        self.scheduler.add(req)
        return request_id

    def _make_request(self, request_id: str, prompt: str, params: SamplingParams, priority: int) -> Request:
        schedule = params.schedule
        rows = num_rows(params.cfg, params.negative_prompt is not None)
        plan, held = self._plan(schedule, rows)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return Request(
            request_id=request_id, prompt=prompt, negative_prompt=params.negative_prompt, schedule=schedule,
            sampling=ScaleSampling(params.cfg, params.tau, params.top_p), seed=seed, rows=rows, plan=plan,
            held=held, priority=priority,
        )

    def _plan(self, schedule: ScaleSchedule, rows: int) -> tuple[KVPlan, np.ndarray]:
        key = (f"{schedule.h_div_w}/{schedule.pixel_budget}", rows)
        if key not in self._plans:
            plan = self.policy.plan(self.model_config, schedule)
            self.runner.prepare_attention(plan, schedule, rows)
            self._plans[key] = (plan, plan.held_pages(self.runner.page_size, rows))
        return self._plans[key]

    def abort(self, request_id: str) -> bool:
        """Stop a request at any time and free everything it holds (its image is dropped if it is being decoded).
        False if it is unknown or done. A running request is in the step planned for next: its rows still run
        with that step (the other requests' pages are planned around them), then its pages go; at once if no
        other request is left in that step."""
        req = self.scheduler.find(request_id) or self._decoding.pop(request_id, None)
        if req is None:
            return False
        if self._next is None or req not in self._next[0]:
            self._release(req, RequestStatus.ABORTED)
        else:
            self.scheduler.finish(req, RequestStatus.ABORTED)
            if all(r.status is RequestStatus.ABORTED for r in self._next[0]):
                for planned in self._next[0]:
                    self._release(planned, RequestStatus.ABORTED)
                self._next = None
        self._end_device_states()
        return True

    def _planned(self, request_id: str) -> bool:
        """Whether an aborted request with this id still waits to run with the planned step."""
        return self._next is not None and any(r.request_id == request_id for r in self._next[0])

    def has_unfinished_requests(self) -> bool:
        """Whether a request is queued, running or being decoded, or has ended with its output not yet returned
        by `step`."""
        return bool(self._outbox or self._decoding) or self.scheduler.has_work

    # ---- stepping -------------------------------------------------------------------------------------
    def step(self) -> list[ImageOutput]:
        """Run the next scale of every running request; return the requests that ended (finished, or failed
        with `error` set and no image) since the last call returned (e.g. while `generate` ran other requests).
        An image comes back from the step after the one that ran its last scale when other requests are running
        (its decode and copy to the host then overlap that next step: waiting for the device would leave it idle
        while the host plans the next step), else from the same step.

        The next step is scheduled and its pages planned while the device runs this one's transformer (so a
        request added now joins the step after next)."""
        reqs, pages = self._next or self._schedule_now()
        self._next = None
        now = time.monotonic()
        for req in reqs:  # queued until now: its first step starts (it may have been planned one step earlier)
            req.first_scheduled_time = req.first_scheduled_time or now
        outputs = list(self._outbox)
        self._outbox.clear()
        if reqs:
            try:
                self.runner.execute(reqs, pages, launched=lambda: self._advance(reqs), upcoming=self.scheduler.waiting)
            except Exception as exc:  # the step's device state is unusable: fail its requests, keep serving
                logger.exception("step failed; failing its %d requests", len(reqs))
                outputs += self._fail_step(reqs, f"{type(exc).__name__}: {exc}")
                self._end_device_states()
                return outputs
        self._end_device_states()
        return outputs + self._collect()

    def _schedule_now(self) -> tuple[list[Request], StepPages | None]:
        reqs = self._schedule()
        return reqs, self.runner.plan(reqs, self.block_manager) if reqs else None

    def _advance(self, reqs: list[Request]) -> None:
        """Once the step's transformer is queued on the device: its host bookkeeping (requests past their last
        scale give their pages back, aborted ones go), then the next step's schedule and pages, planned while
        the device works (planned after the step, a large step's tens of ms of planning left it idle)."""
        for req in reqs:
            if req.status is RequestStatus.ABORTED:
                self._release(req, RequestStatus.ABORTED)
                continue
            self._after_scale(req)
            if req.scale == req.schedule.num_scales:
                self._release(req, RequestStatus.DECODING)
                self._decoding[req.request_id] = req
        planned = self._schedule_now()
        self._next = planned if planned[0] else None

    def _end_device_states(self) -> None:
        """Device states of the requests that ended (decoded, aborted, failed, preempted) go, with the images in
        flight of those that end without one; called once no step being launched needs them."""
        for req in self._ending:
            if req.status in (RequestStatus.ABORTED, RequestStatus.FAILED):
                self.runner.discard(req.request_id)
            self.runner.release(req.request_id)
        self._ending.clear()

    def _fail_step(self, reqs: list[Request], error: str) -> list[ImageOutput]:
        """Fail a step's requests (aborted ones end quietly); requests admitted into the next step, which never ran,
        wait again from their first scale."""
        self._next = None
        for req in [r for r in self.scheduler.running if r not in reqs]:
            self.block_manager.release(req)
            self.scheduler.requeue(req)
        outputs = []
        for req in reqs:
            self._decoding.pop(req.request_id, None)
            if req.status is RequestStatus.ABORTED:
                self._release(req, RequestStatus.ABORTED)
            else:
                outputs.append(self._fail(req, error))
        return outputs

    def _schedule(self) -> list[Request]:
        reqs = self.scheduler.schedule()
        while reqs and not self.block_manager.can_run_step(reqs):  # never expected: admission is exact
            if len(reqs) == 1:  # alone and still too big: the pool is not what admission assumed
                self._outbox.append(self._fail(reqs[0], "its next step does not fit in the KV page pool"))
                return []
            victim = max(self.scheduler.running, key=Request.sort_key)
            logger.warning("preempting %s (recompute once a running request ends): pages do not fit", victim.request_id)
            self.block_manager.release(victim)
            self._ending.append(victim)  # its device state may still serve the step being launched
            self.scheduler.preempt(victim)
            reqs = self.scheduler.schedule(admit=False)
        for req in reqs:
            if req.tables is None:
                self.block_manager.start(req)
        return reqs

    def _after_scale(self, req: Request) -> None:
        req.page_samples.append(self.block_manager.pages_held(req))
        req.scale += 1

    def _collect(self) -> list[ImageOutput]:
        """Outputs of the decoded images that reached the host (all of them when nothing else will run)."""
        try:
            images = self.runner.collect(latest=not self.scheduler.running)
        except Exception as exc:  # a device error surfacing here (sticky on CUDA): the images in flight are lost
            logger.exception("reading images back failed; failing the %d requests being decoded", len(self._decoding))
            lost, self._decoding = list(self._decoding.values()), {}
            return [self._fail(r, f"{type(exc).__name__}: {exc}") for r in lost]
        ready = [rid for rid in images if rid in self._decoding]
        return [self._finish(self._decoding.pop(rid), images[rid]) for rid in ready]

    def _finish(self, req: Request, pixels: np.ndarray) -> ImageOutput:
        req.finish_time = time.monotonic()
        req.status = RequestStatus.FINISHED
        metrics = self._metrics(req)
        return ImageOutput(req.request_id, req.prompt, req.seed, req.schedule.name, Image.fromarray(pixels), metrics)

    def _fail(self, req: Request, error: str) -> ImageOutput:
        req.finish_time, req.error = time.monotonic(), error
        metrics = self._metrics(req)
        self._release(req, RequestStatus.FAILED)
        return ImageOutput(req.request_id, req.prompt, req.seed, req.schedule.name, None, metrics,
                           finish_reason="failed", error=error)

    def _release(self, req: Request, status: RequestStatus) -> None:
        """A request leaves the running set (decoding, aborted, failed): its pages go now, its device state (and,
        unless it is decoding, its image in flight) with `_end_device_states`."""
        self.block_manager.release(req)
        self._ending.append(req)
        self.scheduler.finish(req, status)

    def _metrics(self, req: Request) -> ImageMetrics:
        page_bytes = self.runner.page_bytes
        full_history = req.rows * req.schedule.history_tokens * self.model_config.depth * self.model_config.num_heads
        return ImageMetrics(
            latency_s=(req.finish_time or time.monotonic()) - req.arrival_time,
            queue_s=(req.first_scheduled_time or req.arrival_time) - req.arrival_time,
            scales=req.scale, peak_kv_pages=req.peak_pages,
            mean_kv_pages=float(np.mean(req.page_samples)) if req.page_samples else 0.0,
            peak_kv_bytes=req.peak_pages * page_bytes,
            nominal_kv_bytes=full_history * page_bytes // self.runner.page_size,
            kv_budget=self.config.kv_budget, num_preemptions=req.num_preemptions,
        )

    # ---- offline --------------------------------------------------------------------------------------
    def generate(
        self, prompts: str | Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[ImageOutput]:
        """Generate one image per prompt; outputs in input order. Raises RuntimeError if any image failed
        (after every other image of the call is done), never returning a partial result as whole."""
        prompts, params = _normalize_inputs(prompts, params, self.default_params)
        ids = self._add_all(prompts, params)
        results: dict[str, ImageOutput] = {}
        others: list[ImageOutput] = []  # outputs of requests added elsewhere: handed back by the next step()
        bar = tqdm(total=len(ids), desc="images", disable=not use_tqdm, unit="img")
        start = time.monotonic()
        try:
            while len(results) < len(ids):
                for out in self.step():
                    if out.request_id in ids:
                        results[out.request_id] = out
                        bar.update(1)
                        bar.set_postfix(img_per_s=f"{bar.n / max(time.monotonic() - start, 1e-9):.2f}")
                    else:
                        others.append(out)
        except BaseException:  # e.g. Ctrl-C: this call's requests must not run on unseen
            for i in ids:
                self.abort(i)
            raise
        finally:
            self._outbox.extend(others)
            bar.close()
        failed = [o for o in results.values() if o.error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(ids)} images failed; first: {failed[0].error}")
        return [results[i] for i in ids]

    def _add_all(self, prompts: list[str], params: list[SamplingParams]) -> list[str]:
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.add_request(prompt, p))
        except Exception:
            for i in ids:
                self.abort(i)
            raise
        return ids

    # ---- stats ----------------------------------------------------------------------------------------
    def cache_stats(self) -> dict:
        a = self.allocator
        return {
            "total_pages": a.num_total - 1, "free_pages": a.num_free, "used_pages": a.num_used,
            "peak_used_pages": a.peak_used, "page_bytes": self.runner.page_bytes, "page_size": self.runner.page_size,
            "kv_pool_bytes": (a.num_total - 1) * self.runner.page_bytes, "kv_policy": self.policy.name,
            "kv_budget": self.config.kv_budget, "running": len(self.scheduler.running), "decoding": len(self._decoding),
            "waiting": len(self.scheduler.waiting),
        }

    def _log_capacity(self) -> None:
        schedule = SamplingParams().schedule
        _, held = self._plan(schedule, 2)
        peak = int(held.max())
        logger.info(
            "KV pool: %d pages x %d B (%.2f GiB), policy %s budget %g; a %s image peaks at %d pages (%.1f MiB): "
            "%d such images fit at once", self.allocator.num_total - 1, self.runner.page_bytes,
            (self.allocator.num_total - 1) * self.runner.page_bytes / 2**30, self.policy.name, self.config.kv_budget,
            schedule.name, peak, peak * self.runner.page_bytes / 2**20, (self.allocator.num_total - 1) // max(peak, 1),
        )


def checked_request(prompt: str, params: SamplingParams | None, request_id: str | None, priority: int,
                    default: SamplingParams) -> tuple[SamplingParams, str]:
    """(params, request id) of a request, defaults filled in; ValueError for a bad prompt, params type or
    priority."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"priority must be an int (lower runs first), got {priority!r}")
    params = params if params is not None else default
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
    return params, request_id if request_id is not None else uuid.uuid4().hex


def _normalize_inputs(
    prompts: str | Sequence[str], params: SamplingParams | Sequence[SamplingParams] | None, default: SamplingParams,
) -> tuple[list[str], list[SamplingParams]]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give a prompt or a list of prompts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    if params is None or isinstance(params, SamplingParams):
        return prompts, [params or default] * len(prompts)
    if not isinstance(params, (list, tuple)):
        raise ValueError(f"params must be SamplingParams, a list of them (one per prompt) or None, "
                         f"got {type(params).__name__}")
    params = list(params)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
    return prompts, params
