"""Pages of running requests, layer by layer within a step (numpy only, no tensors).

Within a step, every layer first grows the tables of all requests to history + current scale
(`begin_layer`), the model attends, then every table is cut to what the policy keeps (`end_layer`) and the
freed pages go back to the pool at once, so the next layer of any request in the same step reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from varserve.cache.allocator import BlockAllocator
from varserve.cache.block_table import BlockTables
from varserve.scheduler.request import Request


class OutOfPagesError(RuntimeError):
    """A table could not grow. Admission makes this impossible; seeing it means a bug."""


@dataclass
class LayerPages:
    """What the attention of one layer needs, for all rows of a step in packed order."""

    block_table: np.ndarray  # [R, H, max_pages] int32
    seqlens: np.ndarray  # [R, H] int32 tokens held during attention (history + current scale)
    history: np.ndarray  # [R, H] int32 tokens held before this scale: the current scale goes after them


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

    def begin_layer(self, reqs: list[Request], layer: int) -> LayerPages:
        tables, lengths, history = [], [], []
        for req in reqs:
            t = req.tables
            before = t.lengths(layer).copy()
            target = np.broadcast_to(req.plan.attend_len[req.scale, layer], before.shape)
            if not t.grow(layer, target, self.allocator):
                raise OutOfPagesError(f"request {req.request_id}: no pages for layer {layer} at scale {req.scale}")
            req.peak_pages = max(req.peak_pages, t.num_pages())
            tables.append(t.table(layer))
            lengths.append(t.lengths(layer))
            history.append(before)
        return LayerPages(_pad_cat(tables), np.concatenate(lengths), np.concatenate(history))

    def end_layer(self, reqs: list[Request], layer: int) -> None:
        for req in reqs:
            kept = np.broadcast_to(req.plan.kept[req.scale, layer], req.tables.lengths(layer).shape)
            req.tables.shrink(layer, kept, self.allocator)


def _pad_cat(tables: list[np.ndarray]) -> np.ndarray:
    width = max(t.shape[-1] for t in tables)
    out = np.zeros((sum(t.shape[0] for t in tables), tables[0].shape[1], width), dtype=np.int32)
    row = 0
    for t in tables:
        out[row : row + t.shape[0], :, : t.shape[-1]] = t
        row += t.shape[0]
    return out
