"""Engine configuration, validated with pydantic (messages name the field)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from varserve.cache.policy import POLICIES
from varserve.params import MAX_SEED


class EngineConfig(BaseModel):
    """See `Engine` for the meaning of every field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "tiny"
    kv_policy: str = "full"
    kv_budget: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    device: str | None = None
    dtype: Literal["float32", "float64", "bfloat16", "float16"] | None = None
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, allow_inf_nan=False)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    page_size: int | None = Field(None, ge=1, le=4096)
    num_pages: int | None = Field(None, ge=2)  # fixes the pool size (tests, CPU); else sized from memory
    random_weights: bool = False
    weights: str | None = None  # local folder or file of official weights (else downloaded)
    attention_backend: str | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED)  # seeds random weights; image seeds come from SamplingParams
    kv_calibration: str | None = None  # scalekv/heatkv: JSON written by `varserve calibrate`
    data_parallel_size: int = Field(1, ge=1)  # engine replicas, one per GPU (varserve/parallel.py)
    cuda_graphs: bool = False  # replay small steps from CUDA graphs (varserve/graphs.py)

    @field_validator("kv_policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        if name not in POLICIES:
            raise ValueError(f"unknown kv_policy {name!r}; available: {', '.join(POLICIES)}")
        return name

    @model_validator(mode="after")
    def _full_keeps_all(self) -> "EngineConfig":
        if self.kv_policy == "full" and self.kv_budget != 1.0:
            raise ValueError("kv_policy 'full' keeps every token: kv_budget must be 1.0")
        return self
