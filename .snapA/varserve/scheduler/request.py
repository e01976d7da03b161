"""A request as the scheduler sees it: scales to run, rows, and its static page profile. No tensors."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np

from varserve.cache.block_table import BlockTables
from varserve.cache.policy import KVPlan
from varserve.models.generation import ScaleSampling
from varserve.models.schedule import ScaleSchedule


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DECODING = "decoding"  # every scale ran; its image is on the way to the host
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str
    negative_prompt: str | None
    schedule: ScaleSchedule
    sampling: ScaleSampling
    seed: int
    rows: int
    plan: KVPlan
    held: np.ndarray  # [S, L] pages (all rows) held while layer l attends at scale s
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    scale: int = 0  # the next scale to run
    status: RequestStatus = RequestStatus.WAITING
    tables: BlockTables | None = None
    num_preemptions: int = 0
    held_back: bool = False  # preempted: not admitted again until a running request ends
    first_scheduled_time: float | None = None
    finish_time: float | None = None
    peak_pages: int = 0
    page_samples: list[int] = field(default_factory=list)  # pages held after each scale
    error: str | None = None

    @property
    def remaining_held(self) -> np.ndarray:
        return self.held[self.scale :]

    @property
    def remaining_tokens(self) -> np.ndarray:
        return self.rows * np.asarray(self.schedule.tokens[self.scale :], dtype=np.int64)

    @property
    def scale_tokens(self) -> int:
        """Query tokens of the next scale over all rows."""
        return int(self.remaining_tokens[0])

    def sort_key(self) -> tuple[int, float]:
        return (self.priority, self.arrival_time)
