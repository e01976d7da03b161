"""Continuous batching of scale steps.

Every step runs the next scale of every running request, whatever scale each is at. Running requests move
in lockstep (one scale per step), and every policy's page counts are static, so the pages and tokens of
all future steps are known: a waiting request is admitted only if, from now until every running request
ends, pages at every layer boundary of every step and tokens of every step stay within the limits. An
admitted image therefore never runs out of pages midway. Order: priority (lower first), then arrival.

Admission is also staggered: the requests admitted in one step bring at most max_num_batched_tokens tokens
over their whole lives (the first one admitted always may, so a request whose life exceeds that still runs).
Admitting everything that fits at once would put a wave of requests at the same
scale, so small scales would run as small, launch-bound steps; staggered, every step mixes the scales of
requests admitted at different steps and stays near the token budget.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from varserve.scheduler.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    num_pages: int  # pages the pool can hand out
    max_num_seqs: int  # running requests at most
    max_num_batched_tokens: int  # query tokens of one step (all rows) at most


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    def check_fits_alone(self, req: Request) -> None:
        """ValueError (with the numbers) if the request could never run, even on an idle engine."""
        pages, tokens = int(req.held.max()), int(req.remaining_tokens.max())
        if pages > self.config.num_pages:
            raise ValueError(
                f"request {req.request_id} ({req.schedule.name}, {req.rows} rows) needs {pages} KV pages at its "
                f"peak but the pool has {self.config.num_pages}: use a smaller size, a KV policy with a lower "
                f"kv_budget, or a larger pool (num_pages; on CUDA also gpu_memory_utilization)"
            )
        if tokens > self.config.max_num_batched_tokens:
            raise ValueError(
                f"request {req.request_id} ({req.schedule.name}, {req.rows} rows) runs {tokens} tokens in one "
                f"step but max_num_batched_tokens is {self.config.max_num_batched_tokens}"
            )

    def add(self, req: Request) -> None:
        self.check_fits_alone(req)
        bisect.insort(self.waiting, req, key=Request.sort_key)

    def schedule(self, admit: bool = True) -> list[Request]:
        """Admit what fits (in order, stopping at the first that does not) and return the step's requests.
        admit=False returns the running requests only (after a preemption, nothing joins in the same step)."""
        admitted_tokens = 0
        while admit and self.waiting and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.held_back:  # preempted: it waits for a running request to end, or it would be preempted again
                break
            lifetime = int(req.remaining_tokens.sum())
            if admitted_tokens and admitted_tokens + lifetime > self.config.max_num_batched_tokens:
                break
            if not self._fits(req):
                break
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            admitted_tokens += lifetime
        return list(self.running)

    def _fits(self, new: Request) -> bool:
        group = self.running + [new]
        pages = _stack([r.remaining_held for r in group]).sum(0)
        tokens = _stack([r.remaining_tokens[:, None] for r in group]).sum(0)
        return pages.max() <= self.config.num_pages and tokens.max() <= self.config.max_num_batched_tokens

    def finish(self, req: Request, status: RequestStatus = RequestStatus.FINISHED) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
            for waiting in self.waiting:  # pages came back: preempted requests may try again
                waiting.held_back = False
        elif req in self.waiting:
            self.waiting.remove(req)

    def preempt(self, req: Request) -> None:
        """Recompute-only preemption: the request starts again from scale 0 (same seed, same image), once a
        running request has ended."""
        self.requeue(req)
        req.num_preemptions += 1
        req.held_back = True

    def requeue(self, req: Request) -> None:
        """A running request waits again, in its place, to start from scale 0 (its pages must be gone)."""
        self.running.remove(req)
        req.scale, req.status, req.peak_pages, req.page_samples = 0, RequestStatus.WAITING, 0, []
        bisect.insort(self.waiting, req, key=Request.sort_key)

    def find(self, request_id: str) -> Request | None:
        return next((r for r in self.running + self.waiting if r.request_id == request_id), None)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)


def _stack(profiles: list[np.ndarray]) -> np.ndarray:
    """Align per-request future profiles [k, ...] at k = 0 and zero-pad to the longest."""
    steps = max(p.shape[0] for p in profiles)
    out = np.zeros((len(profiles), steps) + profiles[0].shape[1:], dtype=np.int64)
    for i, p in enumerate(profiles):
        out[i, : p.shape[0]] = p
    return out
