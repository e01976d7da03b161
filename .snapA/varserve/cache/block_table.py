"""Block tables of one request: the pages of every (row, layer, head), in token order (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from varserve.cache.allocator import BlockAllocator


def pages_for(lengths: np.ndarray, page_size: int) -> np.ndarray:
    """Pages needed to hold `lengths` tokens (elementwise)."""
    return (np.asarray(lengths, dtype=np.int64) + page_size - 1) // page_size


def _segments(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments [starts[i], starts[i] + counts[i]) of flat entries i: (entry index, position) pairs."""
    counts = counts.ravel()
    entry = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    pos = np.arange(len(entry)) - np.repeat(first, counts) + np.repeat(starts.ravel(), counts)
    return entry, pos


@dataclass(frozen=True)
class PageMoves:
    """What one layer of a request does to its tables at one scale, as flat (row * heads + head, page index)
    entries: `grow` fills, `shrink` empties; `before`, `grown`, `kept` are the [rows, heads] token lengths
    before, while attending, and after the cut. Precomputed so a step only copies page ids."""

    before: np.ndarray
    grown: np.ndarray
    kept: np.ndarray
    grow: tuple[np.ndarray, np.ndarray]
    shrink: tuple[np.ndarray, np.ndarray]

    @staticmethod
    def between(before: np.ndarray, grown: np.ndarray, kept: np.ndarray, page_size: int) -> "PageMoves":
        if (grown < before).any() or (kept > grown).any():
            raise ValueError("a layer must grow to at least what it held and cut to at most what it grew to")
        held, need, keep = (pages_for(x, page_size) for x in (before, grown, kept))
        lengths = (np.array(x, dtype=np.int32) for x in (before, grown, kept))
        return PageMoves(*lengths, _segments(held, need - held), _segments(keep, need - keep))

    @property
    def num_grown(self) -> int:
        return len(self.grow[0])


@dataclass(frozen=True)
class StepMoves:
    """The PageMoves of every layer of a request at one scale, for planning a whole step at once: entries are
    (layer, row * heads + head, page index) triples in layer order; layer l's are `grow_bounds[l]` to
    `grow_bounds[l + 1]` (likewise shrink). `before`, `grown`, `kept` are `[layers, rows, heads]`."""

    before: np.ndarray
    grown: np.ndarray
    kept: np.ndarray
    grow: tuple[np.ndarray, np.ndarray, np.ndarray]
    shrink: tuple[np.ndarray, np.ndarray, np.ndarray]
    grow_bounds: np.ndarray
    shrink_bounds: np.ndarray
    width: int  # pages of the longest table while attending
    held: np.ndarray  # [layers] pages held while each layer attends (it grown, those before it cut), minus before

    @staticmethod
    def of(layers: list[PageMoves], page_size: int) -> "StepMoves":
        grow, grow_bounds = _by_layer([m.grow for m in layers])
        shrink, shrink_bounds = _by_layer([m.shrink for m in layers])
        grown, cut = np.diff(grow_bounds), np.diff(shrink_bounds)
        lengths = [np.stack([getattr(m, name) for m in layers]) for name in ("before", "grown", "kept")]
        return StepMoves(*lengths, grow, shrink, grow_bounds, shrink_bounds,
                         width=int(pages_for(lengths[1].max(initial=0), page_size)), held=np.cumsum(grown - cut) + cut)

    def peak(self, layers: int) -> int:
        """The most pages held at once while the first `layers` layers ran, minus those held before."""
        return int(self.held[:layers].max(initial=0))

    def layer_counts(self, layers: int) -> tuple[np.ndarray, np.ndarray]:
        """Pages grown and cut by each of the first `layers` layers."""
        return np.diff(self.grow_bounds[: layers + 1]), np.diff(self.shrink_bounds[: layers + 1])


def _by_layer(entries: list[tuple[np.ndarray, np.ndarray]]) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    counts = [len(e[0]) for e in entries]
    layer = np.repeat(np.arange(len(entries)), counts)
    flat = tuple(np.concatenate([e[i] for e in entries]).astype(np.int64) for i in range(2))
    return (layer, *flat), np.concatenate([[0], np.cumsum(counts)])


class BlockTables:
    """Pages of one request as `[layers, rows, heads, max_pages]` int32 (padded with the null page 0) and
    token lengths `[layers, rows, heads]`. Layer-major so that `table(layer)` is a contiguous view."""

    def __init__(self, rows: int, layers: int, heads: int, max_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self._pages = np.zeros((layers, rows, heads, max_pages), dtype=np.int32)
        self._lengths = np.zeros((layers, rows, heads), dtype=np.int32)
        self._num_pages = 0

    @property
    def max_pages(self) -> int:
        return self._pages.shape[-1]

    def table(self, layer: int) -> np.ndarray:
        """Read-only `[rows, heads, max_pages]` int32 page ids of one layer."""
        return _read_only(self._pages[layer])

    def lengths(self, layer: int) -> np.ndarray:
        """Read-only `[rows, heads]` int32 token counts of one layer."""
        return _read_only(self._lengths[layer])

    def num_pages(self) -> int:
        return self._num_pages

    def grow(self, layer: int, new_lengths: np.ndarray, allocator: BlockAllocator) -> bool:
        """Allocate the pages that `new_lengths[rows, heads]` (>= the current lengths) need. All or nothing:
        False, with nothing allocated, when the pool is short."""
        new_lengths = self._checked(layer, new_lengths, grow=True)
        moves = PageMoves.between(self._lengths[layer], new_lengths, new_lengths, self.page_size)
        pages = allocator.allocate(moves.num_grown)
        if pages is None:
            return False
        self.apply_grow(layer, moves, pages)
        return True

    def shrink(self, layer: int, new_lengths: np.ndarray, allocator: BlockAllocator) -> int:
        """Cut lengths to `new_lengths[rows, heads]` (<= the current ones); free the tail pages no longer
        needed. Returns how many pages were freed."""
        new_lengths = self._checked(layer, new_lengths, grow=False)
        held = self._lengths[layer]
        pages = self.apply_shrink(layer, PageMoves.between(held, held, new_lengths, self.page_size))
        allocator.free(pages)
        return len(pages)

    def apply_grow(self, layer: int, moves: PageMoves, pages: np.ndarray) -> None:
        """Grow as `moves` says with `pages` (moves.num_grown fresh pages); ValueError unless the layer holds
        what the moves start from."""
        if not np.array_equal(self._lengths[layer], moves.before):
            raise ValueError(f"layer {layer} holds other lengths than these page moves start from")
        self._flat(layer)[moves.grow] = pages
        self._lengths[layer] = moves.grown
        self._num_pages += len(pages)

    def apply_shrink(self, layer: int, moves: PageMoves) -> np.ndarray:
        """Cut as `moves` says (after `apply_grow` of the same moves); returns the pages to free."""
        flat = self._flat(layer)
        pages = flat[moves.shrink]
        flat[moves.shrink] = 0
        self._lengths[layer] = moves.kept
        self._num_pages -= len(pages)
        return pages

    def load_step(self, out: np.ndarray, moves: StepMoves) -> None:
        """Write the tables as they stand before the step into `out` `[layers, rows, heads, W]` (W >=
        moves.width; the rest is nulled); ValueError unless they hold what the moves start from."""
        if not np.array_equal(self._lengths, moves.before):
            raise ValueError("these tables hold other lengths than the step's page moves start from")
        out[..., : moves.width] = self._pages[..., : moves.width]
        out[..., moves.width :] = 0

    def store_step(self, rows: np.ndarray, moves: StepMoves, layers: int | None = None) -> None:
        """Take the step's grown tables `rows` (this request's rows of the step table) with each layer's cut
        applied, for all layers or the first `layers` (a step that stopped part-way)."""
        layers = len(self._pages) if layers is None else layers
        width, done = moves.width, slice(0, layers)
        self._pages[done, ..., :width] = rows[done, ..., :width]
        layer, entry, page = (x[: moves.shrink_bounds[layers]] for x in moves.shrink)
        self._pages.reshape(-1)[(layer * self._lengths[0].size + entry) * self.max_pages + page] = 0
        self._lengths[done] = moves.kept[done]
        grown, cut = moves.layer_counts(layers)
        self._num_pages += int(grown.sum() - cut.sum())

    def release(self, allocator: BlockAllocator) -> None:
        """Free every page; a second call frees nothing."""
        allocator.free(self._pages[self._pages != 0])
        self._pages[:] = 0
        self._lengths[:] = 0
        self._num_pages = 0

    def slots(self, layer: int, start: np.ndarray, count: np.ndarray) -> np.ndarray:
        """int64 flat slots (page * page_size + offset) of tokens [start, start + count) of every
        (row, head), ordered by (row, token, head): when all heads of a row get the same count, this reshapes
        to the `[T, H]` slot_mapping of `write_kv`."""
        shape = self._lengths[layer].shape
        start, count = (np.broadcast_to(np.asarray(x, dtype=np.int32), shape) for x in (start, count))
        if (count < 0).any() or (start < 0).any() or (start + count > self._lengths[layer]).any():
            raise ValueError("slots outside the grown lengths")
        steps = np.arange(int(count.max(initial=0)), dtype=np.int32)[None, :, None]
        keep = steps < count[:, None, :]  # [rows, t, heads]: selecting with it yields (row, token, head) order
        page_index, offset = np.divmod(start[:, None, :] + steps, np.int32(self.page_size))
        first = np.arange(start.size).reshape(start.shape)[:, None, :] * self.max_pages
        page = self._pages[layer].reshape(-1).take((first + page_index)[keep])
        return page.astype(np.int64) * self.page_size + offset[keep]

    def _flat(self, layer: int) -> np.ndarray:
        return self._pages[layer].reshape(-1, self.max_pages)

    def _checked(self, layer: int, new_lengths: np.ndarray, grow: bool) -> np.ndarray:
        new_lengths = np.asarray(new_lengths, dtype=np.int32)
        old = self._lengths[layer]
        if new_lengths.shape != old.shape:
            raise ValueError(f"lengths must have shape {old.shape}, got {new_lengths.shape}")
        bad = (new_lengths < old) if grow else (new_lengths > old) | (new_lengths < 0)
        if bad.any():
            raise ValueError(f"{'grow' if grow else 'shrink'}: new lengths must be {'>=' if grow else '<='} the old")
        if (pages_for(new_lengths, self.page_size) > self.max_pages).any():
            raise ValueError(f"lengths need more than max_pages={self.max_pages} pages")
        return new_lengths


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view
