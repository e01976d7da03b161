"""Procedural pictures with prompts, and an analytic checker of pictures against prompts.

A scene is a flat background colour and 1 to 3 objects, each a coloured shape of a named size in its own cell of
a 3x3 grid of named regions ("top left", "top", ..., "bottom right"); objects never overlap and never leave their
cell. Its prompt says exactly that: "a red circle at the top left and a big blue square at the bottom right on a
white background" (the medium size has no word).

`sample_scenes(n, seed)` draws n scenes as arrays (deterministic from the seed, vectorised: ~1 s for 100k) and
`render(scenes, size, device)` draws them with torch, anti-aliased from signed distances, on whatever device the
training runs on (on an H100 it is a small part of a step: the VAE phase ran at ~900 pictures/s end to end on
256px crops; on CPU, ~10-20 pictures/s per core at 512x512). Storing 512x512 pictures would take ~0.8 MB each, so a
"dataset" is its scene arrays (a few dozen bytes per picture) and pictures are rendered on demand: the same scene
always gives the same picture.

`check_image(image, spec)` decides, from pixels alone, whether each named object is in its region: it labels every
pixel with the nearest named colour, takes the pixels of the object's colour inside its cell, and classifies the
shape by the fill ratio of their bounding box (circle pi/4, square 1, triangle 1/2) and the size by its extent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# ---- vocabulary -------------------------------------------------------------------------------------------------

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 215, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (245, 130, 200),
    "cyan": (40, 200, 220),
}
NEUTRAL_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
PALETTE: dict[str, tuple[int, int, int]] = {**OBJECT_COLOURS, **NEUTRAL_COLOURS}
COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)  # colour index -> name; object colours first
PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.int32)  # [11, 3]
NUM_OBJECT_COLOURS = len(OBJECT_COLOURS)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding box area
SIZES: tuple[str, ...] = ("small", "medium", "big")
SIZE_WORDS = {"small": "small ", "medium": "", "big": "big "}
# Half extent of an object (radius / half side) as a fraction of its cell's side.
SIZE_RANGES = {"small": (0.15, 0.20), "medium": (0.24, 0.29), "big": (0.33, 0.40)}
CELL_MARGIN = 0.04  # an object keeps this fraction of the cell side from the cell's border
REGIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # region index = row * 3 + column
# Every word a prompt can hold (the tiny model's WordTokenizer vocabulary), in a fixed order.
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    ["a", "at", "the", "and", "on", "background", ","] + list(COLOUR_NAMES) + list(SHAPES) + ["small", "big"]
    + [word for region in REGIONS for word in region.split()]
))
MAX_OBJECTS = 3
MAX_PROMPT_BYTES = 127  # the byte-level `tiny` text encoder preset (test-small's) takes 128 tokens, </s> included
OBJECT_COUNT_PROBS = (0.25, 0.35, 0.4)  # before long prompts are redrawn
NEUTRAL_BACKGROUND_PROB = 0.6


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    size: str
    region: str
    cx: float  # centre and half extent as fractions of the image side
    cy: float
    r: float

    @property
    def phrase(self) -> str:
        return f"a {SIZE_WORDS[self.size]}{self.colour} {self.shape} at the {self.region}"


@dataclass(frozen=True)
class SceneSpec:
    background: str
    objects: tuple[ObjectSpec, ...]

    @property
    def prompt(self) -> str:
        return make_prompt(self.background, [o.phrase for o in self.objects])


def make_prompt(background: str, phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        body = phrases[0]
    else:
        body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{body} on a {background} background"


# ---- scenes as arrays -------------------------------------------------------------------------------------------


@dataclass
class Scenes:
    """N scenes. Object slots past `count` hold -1 (indices) and 0 (geometry)."""

    background: np.ndarray  # [N] int8, index into COLOUR_NAMES
    count: np.ndarray  # [N] int8, objects in the scene (1..3)
    colour: np.ndarray  # [N, 3] int8, index into COLOUR_NAMES (an object colour)
    shape: np.ndarray  # [N, 3] int8, index into SHAPES
    size: np.ndarray  # [N, 3] int8, index into SIZES
    region: np.ndarray  # [N, 3] int8, index into REGIONS
    cx: np.ndarray  # [N, 3] float32, fractions of the image side
    cy: np.ndarray
    r: np.ndarray
    prompts: list[str]

    _ARRAYS = ("background", "count", "colour", "shape", "size", "region", "cx", "cy", "r")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index) -> "Scenes":
        index = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index).reshape(-1)
        arrays = {name: getattr(self, name)[index] for name in self._ARRAYS}
        return Scenes(**arrays, prompts=[self.prompts[i] for i in index])

    def spec(self, i: int) -> SceneSpec:
        objects = tuple(
            ObjectSpec(
                COLOUR_NAMES[self.colour[i, k]], SHAPES[self.shape[i, k]], SIZES[self.size[i, k]],
                REGIONS[self.region[i, k]], float(self.cx[i, k]), float(self.cy[i, k]), float(self.r[i, k]),
            )
            for k in range(int(self.count[i]))
        )
        return SceneSpec(COLOUR_NAMES[self.background[i]], objects)

    def specs(self) -> list[SceneSpec]:
        return [self.spec(i) for i in range(len(self))]

    @staticmethod
    def concat(parts: Sequence["Scenes"]) -> "Scenes":
        arrays = {name: np.concatenate([getattr(p, name) for p in parts]) for name in Scenes._ARRAYS}
        return Scenes(**arrays, prompts=[s for p in parts for s in p.prompts])

    def save(self, path) -> None:
        np.savez_compressed(path, prompts=np.array(self.prompts), **{n: getattr(self, n) for n in self._ARRAYS})

    @classmethod
    def load(cls, path) -> "Scenes":
        with np.load(path) as f:
            return cls(**{n: f[n] for n in cls._ARRAYS}, prompts=[str(p) for p in f["prompts"]])


def _draw(n: int, rng: np.random.Generator) -> Scenes:
    """n scenes without the prompt-length constraint."""
    count = rng.choice(np.arange(1, MAX_OBJECTS + 1), size=n, p=OBJECT_COUNT_PROBS).astype(np.int8)
    neutral = rng.random(n) < NEUTRAL_BACKGROUND_PROB
    bg_neutral = NUM_OBJECT_COLOURS + rng.integers(0, len(NEUTRAL_COLOURS), n)
    bg_colour = rng.integers(0, NUM_OBJECT_COLOURS, n)
    background = np.where(neutral, bg_neutral, bg_colour).astype(np.int8)
    # object colours: any of the 8 on a neutral background, any of the 7 others on a coloured one
    c_any = rng.integers(0, NUM_OBJECT_COLOURS, (n, MAX_OBJECTS))
    c_other = rng.integers(0, NUM_OBJECT_COLOURS - 1, (n, MAX_OBJECTS))
    c_other = c_other + (c_other >= bg_colour[:, None])
    colour = np.where(neutral[:, None], c_any, c_other)
    shape = rng.integers(0, len(SHAPES), (n, MAX_OBJECTS))
    size = rng.integers(0, len(SIZES), (n, MAX_OBJECTS))
    region = np.argsort(rng.random((n, len(REGIONS))), axis=1)[:, :MAX_OBJECTS]  # distinct cells
    lo = np.array([SIZE_RANGES[s][0] for s in SIZES])[size]
    hi = np.array([SIZE_RANGES[s][1] for s in SIZES])[size]
    r_cell = lo + (hi - lo) * rng.random((n, MAX_OBJECTS))
    jitter = (0.5 - r_cell - CELL_MARGIN) * (2 * rng.random((n, 2, MAX_OBJECTS)) - 1).transpose(1, 0, 2)
    cx = (region % 3 + 0.5 + jitter[0]) / 3
    cy = (region // 3 + 0.5 + jitter[1]) / 3
    valid = np.arange(MAX_OBJECTS)[None, :] < count[:, None]

    def ints(a: np.ndarray) -> np.ndarray:
        return np.where(valid, a, -1).astype(np.int8)

    def floats(a: np.ndarray) -> np.ndarray:
        return np.where(valid, a, 0.0).astype(np.float32)

    scenes = Scenes(background, count, ints(colour), ints(shape), ints(size), ints(region),
                    floats(cx), floats(cy), floats(r_cell / 3), prompts=[])
    scenes.prompts = [_prompt(scenes, i) for i in range(n)]
    return scenes


def _prompt(s: Scenes, i: int) -> str:
    phrases = [
        f"a {SIZE_WORDS[SIZES[s.size[i, k]]]}{COLOUR_NAMES[s.colour[i, k]]} {SHAPES[s.shape[i, k]]} "
        f"at the {REGIONS[s.region[i, k]]}"
        for k in range(int(s.count[i]))
    ]
    return make_prompt(COLOUR_NAMES[s.background[i]], phrases)


def sample_scenes(n: int, seed: int, max_prompt_bytes: int = MAX_PROMPT_BYTES) -> Scenes:
    """n scenes whose prompts fit `max_prompt_bytes` UTF-8 bytes, deterministic from `seed`. Scenes with too
    long a prompt are redrawn (three-object prompts with long words, mostly)."""
    rng = np.random.default_rng(seed)
    parts, have = [], 0
    while have < n:
        chunk = _draw(max(1024, int((n - have) * 1.3)), rng)
        keep = np.array([len(p.encode()) <= max_prompt_bytes for p in chunk.prompts])
        part = chunk[np.flatnonzero(keep)[: n - have]]
        parts.append(part)
        have += len(part)
    return Scenes.concat(parts)


# ---- rendering --------------------------------------------------------------------------------------------------


def render(scenes: Scenes, size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Pictures [N, 3, size, size] in [0, 1], anti-aliased (coverage from the signed distance, in pixels)."""
    dev = torch.device(device)

    def t(a: np.ndarray, dt=dtype) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev, dt)

    palette = t(PALETTE_RGB.astype(np.float32) / 255)  # [11, 3]
    n = len(scenes)
    image = palette[t(scenes.background.astype(np.int64), torch.long)][:, :, None, None].expand(n, 3, size, size)
    image = image.contiguous()
    grid = (torch.arange(size, device=dev, dtype=dtype) + 0.5) / size
    for k in range(MAX_OBJECTS):
        present = scenes.count > k
        if not present.any():
            continue
        cx, cy, r = (t(getattr(scenes, a)[:, k])[:, None, None] * size for a in ("cx", "cy", "r"))
        dx = grid[None, None, :] * size - cx  # [N, 1, S]
        dy = grid[None, :, None] * size - cy  # [N, S, 1]
        shape = t(scenes.shape[:, k].astype(np.int64), torch.long)[:, None, None]
        circle = torch.sqrt(dx * dx + dy * dy) - r
        square = torch.maximum(dx.abs(), dy.abs()) - r
        slant = (2 * dx.abs() - dy - r) / math.sqrt(5)  # the two slanted edges of an upward triangle
        triangle = torch.maximum(dy - r, slant)
        sd = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))
        alpha = (0.5 - sd).clamp(0, 1) * t(present.astype(np.float32))[:, None, None]
        colour = palette[t(np.maximum(scenes.colour[:, k], 0).astype(np.int64), torch.long)]  # [N, 3]
        image = image + alpha[:, None] * (colour[:, :, None, None] - image)
    return image


def to_uint8(images: Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3]."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int = 8):
    """uint8 [N, H, W, 3] -> one PIL image, `columns` pictures a row."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + columns - 1) // columns
    sheet = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        sheet[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = im
    return Image.fromarray(sheet)


# ---- checking ---------------------------------------------------------------------------------------------------

COLOUR_TOLERANCE = 45.0  # a pixel farther than this (RGB distance) from every named colour has no colour
MIN_OBJECT_FRACTION = 0.01  # of the cell's area: fewer pixels of the colour and the object is absent
# Measured on ground-truth renders (the opening and the quantile box trim corners): triangle ~0.57, circle ~0.81,
# square 1.0; the thresholds sit half-way.
FILL_THRESHOLDS = (0.69, 0.905)  # triangle < 0.69 <= circle < 0.905 <= square
SIZE_THRESHOLDS = (0.22, 0.31)  # half extent / cell side: small < 0.22 <= medium < 0.31 <= big
BBOX_QUANTILE = 0.003


@dataclass(frozen=True)
class ObjectCheck:
    present: bool  # enough pixels of the named colour in the named region
    shape: str | None  # the shape those pixels make, None when absent
    size: str | None
    fill: float
    pixels: int
    expected_shape: str
    expected_size: str

    @property
    def ok(self) -> bool:
        """The named colour and shape are in the named region."""
        return self.present and self.shape == self.expected_shape

    @property
    def size_ok(self) -> bool:
        return self.ok and self.size == self.expected_size


@dataclass(frozen=True)
class SceneCheck:
    objects: tuple[ObjectCheck, ...]
    background: str | None  # the most common named colour of the picture
    expected_background: str
    extra_regions: int  # regions the prompt leaves empty that hold an object-sized patch of another colour

    @property
    def background_ok(self) -> bool:
        return self.background == self.expected_background

    @property
    def ok(self) -> bool:
        """Every object right (colour, shape, region) and the background right."""
        return self.background_ok and all(o.ok for o in self.objects)

    @property
    def strict_ok(self) -> bool:
        """ok, with every size right and nothing in the regions the prompt leaves empty."""
        return self.ok and all(o.size_ok for o in self.objects) and self.extra_regions == 0


def label_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> [H, W] int8 index of the nearest named colour, -1 when none is within tolerance."""
    diff = image.astype(np.int32)[:, :, None, :] - PALETTE_RGB[None, None]
    dist2 = (diff * diff).sum(-1)
    nearest = dist2.argmin(-1)
    ok = np.take_along_axis(dist2, nearest[..., None], -1)[..., 0] <= COLOUR_TOLERANCE**2
    return np.where(ok, nearest, -1).astype(np.int8)


def _open(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 square: drops specks and one-pixel lines."""
    def erode(m):
        p = np.pad(m, 1, constant_values=False)
        out = np.ones_like(m)
        for i in range(3):
            for j in range(3):
                out &= p[i:i + m.shape[0], j:j + m.shape[1]]
        return out

    def dilate(m):
        p = np.pad(m, 1, constant_values=False)
        out = np.zeros_like(m)
        for i in range(3):
            for j in range(3):
                out |= p[i:i + m.shape[0], j:j + m.shape[1]]
        return out

    return dilate(erode(mask))


def _cell(region: int, h: int, w: int) -> tuple[slice, slice]:
    row, col = divmod(region, 3)
    return slice(round(row * h / 3), round((row + 1) * h / 3)), slice(round(col * w / 3), round((col + 1) * w / 3))


def _classify(mask: np.ndarray, cell_side: float) -> tuple[str, str, float]:
    ys, xs = np.nonzero(mask)
    y0, y1 = np.quantile(ys, [BBOX_QUANTILE, 1 - BBOX_QUANTILE])
    x0, x1 = np.quantile(xs, [BBOX_QUANTILE, 1 - BBOX_QUANTILE])
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    inside = ((ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)).sum()
    fill = float(inside / (bh * bw))
    shape = "triangle" if fill < FILL_THRESHOLDS[0] else "circle" if fill < FILL_THRESHOLDS[1] else "square"
    half = max(bh, bw) / 2 / cell_side
    size = "small" if half < SIZE_THRESHOLDS[0] else "medium" if half < SIZE_THRESHOLDS[1] else "big"
    return shape, size, fill


def check_image(image: np.ndarray, spec: SceneSpec) -> SceneCheck:
    """Does the uint8 picture [H, W, 3] show `spec`? See the module docstring for the tests."""
    h, w, _ = image.shape
    labels = label_pixels(image)
    cell_side = math.sqrt(h * w) / 3
    min_pixels = MIN_OBJECT_FRACTION * (h * w / 9)
    checks = []
    for obj in spec.objects:
        rows, cols = _cell(REGIONS.index(obj.region), h, w)
        mask = _open(labels[rows, cols] == COLOUR_NAMES.index(obj.colour))
        pixels = int(mask.sum())
        if pixels < min_pixels:
            checks.append(ObjectCheck(False, None, None, 0.0, pixels, obj.shape, obj.size))
            continue
        shape, size, fill = _classify(mask, cell_side)
        checks.append(ObjectCheck(True, shape, size, fill, pixels, obj.shape, obj.size))
    valid = labels[labels >= 0]
    background = COLOUR_NAMES[np.bincount(valid, minlength=len(COLOUR_NAMES)).argmax()] if valid.size else None
    bg_index = COLOUR_NAMES.index(spec.background)
    occupied = {REGIONS.index(o.region) for o in spec.objects}
    extra = 0
    for region in set(range(len(REGIONS))) - occupied:
        rows, cols = _cell(region, h, w)
        cell = labels[rows, cols]
        if _open((cell >= 0) & (cell != bg_index)).sum() >= min_pixels:
            extra += 1
    return SceneCheck(tuple(checks), background, spec.background, extra)


def summarize(checks: Sequence[SceneCheck]) -> dict[str, float]:
    """Accuracies over pictures: per object (colour+shape in region; colour in region; size), per prompt."""
    objects = [o for c in checks for o in c.objects]
    n_obj, n = max(len(objects), 1), max(len(checks), 1)
    return {
        "prompt_acc": sum(c.ok for c in checks) / n,
        "strict_prompt_acc": sum(c.strict_ok for c in checks) / n,
        "object_acc": sum(o.ok for o in objects) / n_obj,
        "colour_region_acc": sum(o.present for o in objects) / n_obj,
        "size_acc": sum(o.size_ok for o in objects) / n_obj,
        "background_acc": sum(c.background_ok for c in checks) / n,
        "extra_regions_per_image": sum(c.extra_regions for c in checks) / n,
    }


def check_images(images: np.ndarray, specs: Sequence[SceneSpec]) -> tuple[list[SceneCheck], dict[str, float]]:
    checks = [check_image(im, s) for im, s in zip(images, specs)]
    return checks, summarize(checks)
