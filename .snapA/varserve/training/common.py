"""Small helpers shared by the training phases: wall-clock budgets, learning-rate schedule, logging, devices."""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager

import torch


class Budget:
    """A wall-clock allowance in minutes, started at construction."""

    def __init__(self, minutes: float) -> None:
        self.seconds = max(minutes, 0.0) * 60
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def fraction(self) -> float:
        return min(self.elapsed / self.seconds, 1.0) if self.seconds > 0 else 1.0

    def left(self) -> float:
        return self.seconds - self.elapsed

    def over(self, reserve_s: float = 0.0) -> bool:
        return self.elapsed + reserve_s >= self.seconds


def lr_at(fraction: float, peak: float, warmup: float = 0.03, final: float = 0.05) -> float:
    """Linear warmup over the first `warmup` of the budget, then cosine down to `final * peak`."""
    if fraction < warmup:
        return peak * max(fraction / warmup, 0.01)
    t = (fraction - warmup) / max(1 - warmup, 1e-9)
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)
    sys.stdout.flush()


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; nothing elsewhere (CPU runs stay in the weights' dtype)."""
    return torch.autocast("cuda", torch.bfloat16, enabled=enabled and device.type == "cuda")


@contextmanager
def no_autocast(device: torch.device):
    with torch.autocast(device.type, enabled=False):
        yield


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
