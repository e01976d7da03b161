"""Scale schedules: the (h, w) token grid of every scale, per aspect ratio and pixel budget.

The table is Infinity's dynamic-resolution table. Keys are h/w ratios >= 1; the ratios below 1 are the
transposed lists. A pixel budget selects a prefix of the full 13-scale list. Every scale is placed on the
grid of the FULL (1M) list's last scale for RoPE, whatever the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

Scale = tuple[int, int]

_TALL_RATIOS: dict[float, list[Scale]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}

# pixel budget (longest side name) -> number of scales
PIXEL_BUDGETS: dict[int, int] = {256: 7, 512: 10, 768: 12, 1024: 13}
VAE_STRIDE = 16  # image pixels per token side, for every supported model


def _all_ratios() -> dict[float, list[Scale]]:
    table = dict(_TALL_RATIOS)
    for ratio, scales in _TALL_RATIOS.items():
        if ratio != 1.0:
            table[int(1 / ratio * 1000) / 1000] = [(w, h) for h, w in scales]
    return table


RATIOS: dict[float, list[Scale]] = _all_ratios()


@dataclass(frozen=True)
class ScaleSchedule:
    """The scales of one image size. `scales[i]` is the (h, w) token grid of scale i."""

    h_div_w: float
    pixel_budget: int
    scales: tuple[Scale, ...]
    rope_grid: Scale  # last grid of the full (1M) list of this ratio

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.scales)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    @property
    def history_tokens(self) -> int:
        """Tokens of all scales before the last: the most any later scale reads."""
        return self.total_tokens - self.tokens[-1]

    def offset(self, scale: int) -> int:
        """Index of the first token of `scale` in the image's token sequence."""
        return sum(self.tokens[:scale])

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        h, w = self.scales[-1]
        return w * VAE_STRIDE, h * VAE_STRIDE

    @property
    def name(self) -> str:
        w, h = self.image_size
        return f"{w}x{h}"


@lru_cache(maxsize=None)
def get_schedule(h_div_w: float, pixel_budget: int = 1024) -> ScaleSchedule:
    """Schedule for an exact table ratio (within 1%) and pixel budget; ValueError otherwise."""
    if pixel_budget not in PIXEL_BUDGETS:
        raise ValueError(f"unsupported pixel budget {pixel_budget}; supported: {sorted(PIXEL_BUDGETS)}")
    ratio = min(RATIOS, key=lambda r: abs(r - h_div_w))
    if abs(ratio - h_div_w) > 0.01 * ratio:
        supported = ", ".join(f"{r:g}" for r in sorted(RATIOS))
        raise ValueError(f"unsupported aspect ratio h/w={h_div_w:g}; supported h/w: {supported}")
    full = RATIOS[ratio]
    return ScaleSchedule(ratio, pixel_budget, tuple(full[: PIXEL_BUDGETS[pixel_budget]]), full[-1])


@lru_cache(maxsize=None)
def _sizes_by_name() -> dict[str, ScaleSchedule]:
    return {s.name: s for s in (get_schedule(r, p) for r in RATIOS for p in PIXEL_BUDGETS)}


def supported_sizes() -> list[str]:
    return sorted(_sizes_by_name(), key=lambda n: tuple(int(v) for v in n.split("x")))


_ASPECT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*@\s*(\d+)\s*$")


def parse_size(size: str) -> ScaleSchedule:
    """'WIDTHxHEIGHT' in pixels (an exact table entry, e.g. '1024x1024', '720x1440'), or
    'W:H@BUDGET' (aspect ratio width:height and pixel budget 256/512/768/1024, e.g. '1:2@1024')."""
    text = size.strip().lower()
    if text in _sizes_by_name():
        return _sizes_by_name()[text]
    match = _ASPECT.match(text)
    if match:
        w, h, budget = float(match[1]), float(match[2]), int(match[3])
        if w <= 0 or h <= 0:
            raise ValueError(f"size {size!r}: aspect ratio sides must be positive")
        return get_schedule(h / w, budget)
    raise ValueError(
        f"unsupported size {size!r}: give 'WIDTHxHEIGHT' from the table ({', '.join(supported_sizes())}) "
        f"or 'W:H@BUDGET' with BUDGET in {sorted(PIXEL_BUDGETS)}"
    )
