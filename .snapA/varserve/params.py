"""User-facing parameters, validated with pydantic: a bad value raises ValueError naming the field."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from varserve.models.schedule import ScaleSchedule, parse_size

MAX_SEED = 2**63 - 1


class SamplingParams(BaseModel):
    """How one image is sampled.

    cfg: classifier-free guidance on the bit logits (1.0 disables CFG and its second row).
    tau: temperature of every bit's 2-way softmax.
    top_p: the minority bit is never sampled when its probability is <= 1 - top_p (0 disables).
    seed: the request's generator seed; None draws one (reported in ImageOutput.seed).
    size: 'WIDTHxHEIGHT' from the size table (e.g. '1024x1024', '720x1440') or 'W:H@BUDGET'
          (aspect ratio and pixel budget 256/512/768/1024, e.g. '1:2@1024').
    negative_prompt: replaces the learned unconditional text in the CFG row (so it needs cfg != 1).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cfg: float = Field(4.0, ge=0.0, le=100.0, allow_inf_nan=False)
    tau: float = Field(1.0, gt=0.0, le=100.0, allow_inf_nan=False)
    top_p: float = Field(0.97, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    size: str = "1024x1024"
    negative_prompt: str | None = None

    @field_validator("size")
    @classmethod
    def _known_size(cls, size: str) -> str:
        parse_size(size)
        return size

    @model_validator(mode="after")
    def _negative_needs_cfg(self) -> "SamplingParams":
        if self.negative_prompt is not None and self.cfg == 1.0:
            raise ValueError("negative_prompt has no effect at cfg 1.0 (no guidance): use cfg != 1 or leave it out")
        return self

    @property
    def schedule(self) -> ScaleSchedule:
        return parse_size(self.size)

    def updated(self, **changes: Any) -> "SamplingParams":
        """A copy with `changes`, validated (unlike model_copy)."""
        return SamplingParams(**{**self.model_dump(), **changes})


def default_params(model: str | None = None, **given: Any) -> SamplingParams:
    """SamplingParams of the `given` values (None counts as not given), else the defaults that `model` (a
    preset name or a local path of a preset's weights) recommends (ModelConfig.sampling: `tiny` samples at
    cfg 2, tau 0.5, 512x512), else SamplingParams' own (Infinity's). What Engine.generate and add_request use when no
    params are passed."""
    from varserve.models.config import get_config
    from varserve.models.loader import preset_of

    try:
        values: dict[str, Any] = dict(get_config(preset_of(model)).sampling) if model is not None else {}
    except ValueError:  # not a model the engine can load: it says so itself, so no recommendation here
        values = {}
    return SamplingParams(**values).updated(**{k: v for k, v in given.items() if v is not None})
