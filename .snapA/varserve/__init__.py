"""varserve: a serving engine for visual autoregressive (next-scale prediction) text-to-image models."""

from varserve.async_engine import AsyncEngine
from varserve.engine import Engine
from varserve.outputs import ImageMetrics, ImageOutput
from varserve.params import SamplingParams

__all__ = ["AsyncEngine", "Engine", "ImageMetrics", "ImageOutput", "SamplingParams"]
__version__ = "0.1.0"
