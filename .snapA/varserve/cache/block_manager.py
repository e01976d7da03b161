"""Pages of running requests, layer by layer within a step (numpy only, no tensors).

Within a step, every layer first grows the tables of all requests to history + current scale
(`begin_layer`), the model attends, then every table is cut to what the policy keeps (`end_layer`) and the
freed pages go back to the pool at once, so the next layer of any request in the same step reuses them.
`plan_step` does this for all layers before the step runs: the counts are static, so the whole step's
tables are known in advance and reach the device in one copy; the device runs the layers in the same order,
so a page is rewritten by a later layer only after the attention that read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from varserve.cache.allocator import BlockAllocator
from varserve.cache.block_table import BlockTables, PageMoves, StepMoves
from varserve.scheduler.request import Request


class OutOfPagesError(RuntimeError):
    """A table could not grow. Admission makes this impossible; seeing it means a bug."""


@dataclass
class LayerPages:
    """What the attention of one layer needs, for all rows of a step in packed order."""

    block_table: np.ndarray  # [R, H, max_pages] int32
    seqlens: np.ndarray  # [R, H] int32 tokens held during attention (history + current scale)
    history: np.ndarray  # [R, H] int32 tokens held before this scale: the current scale goes after them


@dataclass
class StepPages:
    """LayerPages of every layer of a step, stacked: `block_tables [L, R, H, max_pages]` (padded with the null
    page), `seqlens` and `history` `[L, R, H]`. The model runner may swap in the pinned tensor it had the
    tables planned into (the device copies from it)."""

    block_tables: np.ndarray
    seqlens: np.ndarray
    history: np.ndarray


class BlockManager:
    def __init__(self, allocator: BlockAllocator, page_size: int):
        self.allocator = allocator
        self.page_size = page_size

    def start(self, req: Request) -> None:
        layers, heads = req.plan.kept.shape[1:]
        req.tables = BlockTables(req.rows, layers, heads, req.plan.max_pages_per_table(self.page_size), self.page_size)

    def release(self, req: Request) -> None:
        if req.tables is not None:
            req.tables.release(self.allocator)
            req.tables = None

    def pages_held(self, req: Request) -> int:
        return req.tables.num_pages() if req.tables is not None else 0

    def can_run_step(self, reqs: list[Request]) -> bool:
        """Whether the pool holds the step's peak, counting the pages these requests already hold."""
        need = sum(r.held[r.scale] for r in reqs).max()
        return need <= self.allocator.num_free + sum(self.pages_held(r) for r in reqs)

    def plan_step(self, reqs: list[Request], empty: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> StepPages:
        """Grow and cut the tables of every layer, in layer order, as the step will run them, into one step table
        from `empty(shape)` (a C-contiguous int32 array, e.g. pinned memory the device copies from). It is as wide
        as the step's longest table (not the plans' longest: early steps hold a few pages per table). Requests
        that share a scale and plan are grown and cut together, one layer of all of them per allocation."""
        moves = [r.plan.step_moves(self.page_size, r.rows, r.scale) for r in reqs]
        self._check_fits(moves)
        num_layers, heads = reqs[0].plan.kept.shape[1:]
        first = np.cumsum([0] + [r.rows for r in reqs])
        shape = (num_layers, int(first[-1]), heads, max(m.width for m in moves))
        tables = np.empty(shape, dtype=np.int32) if empty is None else empty(shape)
        if tables.dtype != np.int32 or tables.shape != shape or not tables.flags.c_contiguous:
            raise ValueError(f"the step table must be a C-contiguous int32 array of shape {shape}, got "
                             f"{tables.dtype} {tables.shape}{'' if tables.flags.c_contiguous else ' (not contiguous)'}")
        for req, m, row in zip(reqs, moves, first):
            req.tables.load_step(tables[:, row : row + req.rows], m)
        grow, shrink = _step_entries(moves, first, tables.shape)
        flat, done = tables.reshape(-1), num_layers
        for layer in range(num_layers):
            pages = self.allocator.allocate(len(grow[layer]))
            if pages is None:  # only if pages are shared (a cut then frees fewer than it empties)
                done = layer
                break
            flat[grow[layer]] = pages
            self.allocator.free(flat[shrink[layer]])
        for req, m, row in zip(reqs, moves, first):
            req.peak_pages = max(req.peak_pages, req.tables.num_pages() + m.peak(done))
            req.tables.store_step(tables[:, row : row + req.rows], m, done)
        if done < num_layers:
            raise OutOfPagesError(f"no pages for layer {done} of {len(reqs)} requests at scales "
                                  f"{sorted({r.scale for r in reqs})}")
        return StepPages(tables, np.concatenate([m.grown for m in moves], axis=1),
                         np.concatenate([m.before for m in moves], axis=1))

    def _check_fits(self, moves: list[StepMoves]) -> None:
        """OutOfPagesError, before anything changes, unless every layer's growth fits in what is free then."""
        grown = sum(np.diff(m.grow_bounds) for m in moves)
        cut = sum(np.diff(m.shrink_bounds) for m in moves)
        short = np.flatnonzero(grown > self.allocator.num_free - (np.cumsum(grown - cut) - (grown - cut)))
        if len(short):
            raise OutOfPagesError(f"no pages for layer {short[0]}: the step needs {int(grown[short[0]])} more")

    def begin_layer(self, reqs: list[Request], layer: int, out: np.ndarray | None = None) -> LayerPages:
        """Grow every request's tables of `layer` to history + current scale, from one allocation. The step's
        table of the layer is written into `out` `[rows, heads, width]` when given (as wide as its longest)."""
        moves = self._moves(reqs, layer)
        pages = self.allocator.allocate(sum(m.num_grown for m in moves))
        if pages is None:
            raise OutOfPagesError(f"no pages for layer {layer} of {len(reqs)} requests at scales "
                                  f"{sorted({r.scale for r in reqs})}")
        start = 0
        try:
            for req, m in zip(reqs, moves):
                req.tables.apply_grow(layer, m, pages[start : start + m.num_grown])
                req.peak_pages = max(req.peak_pages, req.tables.num_pages())
                start += m.num_grown
        except ValueError:  # a table out of step with its plan (a bug): the pages not placed go back
            self.allocator.free(pages[start:])
            raise
        table = _pad_cat([r.tables.table(layer) for r in reqs], out)
        return LayerPages(table, np.concatenate([m.grown for m in moves]), np.concatenate([m.before for m in moves]))

    def end_layer(self, reqs: list[Request], layer: int) -> None:
        """Cut every request's tables of `layer` to what its policy keeps; the pages go back at once."""
        freed = [r.tables.apply_shrink(layer, m) for r, m in zip(reqs, self._moves(reqs, layer))]
        self.allocator.free(np.concatenate(freed))

    def _moves(self, reqs: list[Request], layer: int) -> list[PageMoves]:
        return [r.plan.page_moves(self.page_size, r.rows, r.scale, layer) for r in reqs]


def _step_entries(moves: list[StepMoves], first: np.ndarray, shape: tuple[int, ...]
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Flat positions in the step table `shape` of every layer's grown and cut entries. Requests with the same moves
    (same plan, rows and scale) are expanded together, so within a layer the entries go group by group, in the
    order each group's first request appears (the pages then differ from a request-by-request order, not the
    counts: a test runs the layer path in this order and compares)."""
    num_layers, rows, heads, width = shape
    groups: dict[int, tuple[StepMoves, list[int]]] = {}
    for m, row in zip(moves, first):
        groups.setdefault(id(m), (m, []))[1].append(int(row))

    def positions(kind: str) -> list[np.ndarray]:
        per_layer: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
        for m, starts in groups.values():
            layer, entry, page = getattr(m, kind)
            bounds = getattr(m, f"{kind}_bounds")
            at = (layer * rows * heads + entry) * width + page
            at = at[None, :] + np.asarray(starts, dtype=np.int64)[:, None] * (heads * width)
            for l in range(num_layers):
                if bounds[l + 1] > bounds[l]:
                    per_layer[l].append(at[:, bounds[l] : bounds[l + 1]].ravel())
        return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in per_layer]

    return positions("grow"), positions("shrink")


def _pad_cat(tables: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """The tables stacked by row into `out` (a new array as wide as the widest if None); entries past `out`'s
    width must be null pages."""
    if out is None:
        out = np.zeros((sum(t.shape[0] for t in tables), tables[0].shape[1], max(t.shape[-1] for t in tables)),
                       dtype=np.int32)
    row, width = 0, out.shape[-1]
    for t in tables:
        out[row : row + t.shape[0], :, : min(width, t.shape[-1])] = t[..., :width]
        row += t.shape[0]
    return out
