"""Engine configuration, validated with pydantic (messages name the field)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from varserve.cache.policy import make_policy
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
    cuda_graphs: bool | None = None  # replay small steps from CUDA graphs; None: wherever they can run

    @model_validator(mode="after")
    def _policy_is_valid(self) -> "EngineConfig":
        make_policy(self.kv_policy, self.kv_budget, self.kv_calibration)  # the policy's own checks, at config time
        return self
