"""What a finished request returns."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass
class ImageMetrics:
    latency_s: float  # arrival to image
    queue_s: float  # arrival to first scheduled step
    scales: int  # scales run
    peak_kv_pages: int  # measured: the most pages this request held at once (all rows, layers, heads)
    mean_kv_pages: float  # measured: pages held after each scale, averaged over its scales
    peak_kv_bytes: int  # peak_kv_pages * page bytes (K and V)
    nominal_kv_bytes: int  # K+V bytes of the full history cache (all scales before the last), KV dtype
    kv_budget: float
    num_preemptions: int = 0


@dataclass
class ImageOutput:
    """One request's result. `image` is None (and `error` says why) when finish_reason is 'failed'."""

    request_id: str
    prompt: str
    seed: int
    size: str
    image: Image.Image | None
    metrics: ImageMetrics
    finish_reason: str = "finished"
    error: str | None = None
