"""The device side of the paged KV cache: the page pools and the per-step attention context that the
model calls for self-attention (implements varserve.models.infinity.SelfAttentionKV)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from varserve.attention import (paged_attention, paged_attention_triton, paged_scores, paged_scores_gather,
                                token_rows, upload, write_kv)
from varserve.cache.block_manager import StepPages
from varserve.cache.compaction import RunTable, move_kept, move_runs
from varserve.cache.plan import ScoredCut, StaticCut
from varserve.cache.scalekv import kept_positions, window_query
from varserve.models.fused import PageWrite
from varserve.scheduler.request import Request

SCORE_CHUNK_BYTES = 256 * 2**20  # ScaleKV selects for rows in chunks: bounds the temporaries of their keys' scores
SELECT_BYTES_PER_KEY = 32  # a key's score, pooled score, sort key and index (plus the key where keys are gathered)
SOFTMAX_SCALE = 1.0  # cosine attention: the model scales q itself


class KVPool:
    """K and V pages: [num_pages, page_size, head_dim] each; page 0 is the null page. `runs`: the static cuts'
    moves, on the device for the cuts' token moves (`compaction`)."""

    def __init__(self, num_pages: int, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.page_size = page_size
        self.k_pages = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)
        self.v_pages = torch.zeros(num_pages, page_size, head_dim, dtype=dtype, device=device)
        self.runs = RunTable(device)

    @staticmethod
    def page_bytes(page_size: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * page_size * head_dim * torch.empty(0, dtype=dtype).element_size()


class PagedKV:
    """Self-attention over pages for one step. Before the step the block manager plans every layer's tables
    (grown to history + current scale for the attention, then cut to what the policy keeps), and they reach
    the device in one copy. For each layer: the current K/V are written into their slots, the rows attend
    through their block tables, then the kept tokens of non-prefix cuts are moved to the front of their
    tables (on the device, batched over the step's rows).

    `static_route` (steps run from static buffers, `varserve/graphs.py`) is, per layer, the attention backend of
    such a step, called so that nothing is read or uploaded from the host while it runs: 'triton' from device
    copies of its metadata, 'sdpa_gather' (rows of one shape) planning from host copies only. The cuts' index
    tensors are uploaded on their first use (the warm-up run) and kept, so a capture only reuses them. `load`
    then swaps in another step's tables."""

    def __init__(self, pool: KVPool, reqs: list[Request], pages: StepPages, backend: str | None,
                 static_route: tuple[str, ...] | None = None):
        self.pool, self.reqs, self.pages, self.backend = pool, reqs, pages, backend
        row_lengths = [r.schedule.tokens[r.scale] for r in reqs for _ in range(r.rows)]
        self.max_seqlen = max(row_lengths)
        # Host copies: the attention backends plan on the host, and host metadata spares a device sync.
        self.cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(row_lengths)]), dtype=torch.int32)
        self.first_row = np.cumsum([0] + [r.rows for r in reqs])[:-1]
        device = pool.k_pages.device
        self.block_tables = upload(pages.block_tables, device)
        self.history = upload(np.ascontiguousarray(pages.history), device)  # the page-write kernel reads it flat
        self.tokens = token_rows(self.cu_seqlens, sum(row_lengths), device)
        self.static_route = static_route
        self.device_meta = (upload(pages.seqlens, device, torch.int32), upload(self.cu_seqlens, device)) \
            if static_route and "triton" in static_route else None
        self._uploaded: dict[tuple, Tensor] = {}

    def load(self, reqs: list[Request], pages: StepPages) -> None:
        """Take another step of the same shape (its requests and tables), in place: the tensors a graph
        captured stay, and the cuts' index tensors are this shape's."""
        same = pages.block_tables.shape == self.pages.block_tables.shape
        if not (same and np.array_equal(pages.seqlens, self.pages.seqlens)
                and np.array_equal(pages.history, self.pages.history)):
            raise ValueError("PagedKV.load needs a step of the same shape")
        self.block_tables.copy_(upload(pages.block_tables, self.block_tables.device), non_blocking=True)
        self.reqs, self.pages = reqs, pages

    def wants_raw_query(self, layer: int) -> bool:
        return any(isinstance(r.plan.cut(r.scale, layer), ScoredCut) for r in self.reqs)

    def page_slots(self, layer: int) -> PageWrite:
        """Where the layer's new K/V go, for the model to write them there."""
        return PageWrite(self.pool.k_pages, self.pool.v_pages, self.block_tables[layer], self.history[layer],
                         *self.tokens)

    def attend(self, layer: int, q: Tensor, k: Tensor | None, v: Tensor | None, raw_q: Tensor | None) -> Tensor:
        """k, v: the layer's new K/V, or None when the model wrote them through `page_slots`."""
        if k is not None:
            write = self.page_slots(layer)
            write_kv(write.k_pages, write.v_pages, k, v, write.slots())
        table = self.block_tables[layer]
        out = self._attention(layer, q, table)
        self._compact(layer, table, raw_q)
        return out

    def _attention(self, layer: int, q: Tensor, table: Tensor) -> Tensor:
        pools, longest = (self.pool.k_pages, self.pool.v_pages), int(self.pages.seqlens[layer].max())
        route = self.static_route[layer] if self.static_route else self.backend
        if route == "triton" and self.device_meta is not None:
            seqlens, cu_seqlens = self.device_meta
            return paged_attention_triton(q, *pools, table, seqlens[layer], cu_seqlens, self.max_seqlen, longest,
                                          SOFTMAX_SCALE)
        return paged_attention(q, *pools, table, torch.from_numpy(self.pages.seqlens[layer]), self.cu_seqlens,
                               self.max_seqlen, longest, SOFTMAX_SCALE, backend=route)

    def _compact(self, layer: int, table: Tensor, raw_q: Tensor | None) -> None:
        """Move the kept tokens of every non-prefix cut to positions [0, kept) (`compaction`): the static cuts of
        all rows in one launch; ScaleKV's rows select, then move, by window size."""
        static: list[tuple[StaticCut, list[int]]] = []
        scored: dict[ScoredCut, list[int]] = {}
        for req, first in zip(self.reqs, self.first_row):
            cut, rows = req.plan.cut(req.scale, layer), list(range(first, first + req.rows))
            if isinstance(cut, StaticCut):
                static.append((cut, rows))
            elif isinstance(cut, ScoredCut):
                scored.setdefault(cut, []).extend(rows)
        if static:
            segments = self._upload_once(("static", layer),
                                         lambda: np.concatenate([self.pool.runs.segments(*c) for c in static]))
            move_runs(self.pool.k_pages, self.pool.v_pages, table, segments, self.pool.runs.runs())
        by_window: dict[int, list[tuple[ScoredCut, list[int]]]] = {}
        for cut, rows in scored.items():
            by_window.setdefault(len(cut.window), []).append((cut, rows))
        for groups in by_window.values():
            self._move_scored(groups, table, raw_q)

    def _upload_once(self, key: tuple, make: Callable[[], np.ndarray]) -> Tensor:
        """Host index data on the device, uploaded on its first use in this step (shape) and then reused."""
        if key not in self._uploaded:
            self._uploaded[key] = upload(make(), self.pool.k_pages.device)
        return self._uploaded[key]

    def _move_scored(self, groups: list[tuple[ScoredCut, list[int]]], table: Tensor, raw_q: Tensor) -> None:
        """ScaleKV's selection for the rows of every cut (of one window size) in one batch, the shorter rows padded
        to the longest (one set of launches per layer, not one per cut: per cut they kept the host behind the
        device), in chunks of rows that bound the temporaries of their scores; then all their moves."""
        longest, width = max(cut.attend_len for cut, _ in groups), max(cut.capacity for cut, _ in groups)
        meta = self._upload_once(("scored", *((cut, *rows) for cut, rows in groups)), lambda: self._scored_meta(groups))
        heads, k_pages = table.shape[1], self.pool.k_pages
        per_key = SELECT_BYTES_PER_KEY + (k_pages[0, 0].nbytes * 2 if paged_scores_gather(k_pages) else 0)
        chunk = max(1, SCORE_CHUNK_BYTES // (heads * longest * per_key))
        kept = torch.cat([self._select(meta[i : i + chunk], table, raw_q, longest, width)
                          for i in range(0, len(meta), chunk)])
        segments = self._upload_once(("kept", *((cut, *rows) for cut, rows in groups)),
                                     lambda: _kept_segments(groups, heads, width))
        move_kept(self.pool.k_pages, self.pool.v_pages, table, segments, kept)

    def _scored_meta(self, groups: list[tuple[ScoredCut, list[int]]]) -> np.ndarray:
        """Per row, int64: row, tokens it attended (attend_len), tokens it keeps (capacity), its window tokens'
        positions, then their indices in the packed queries."""
        cu = self.cu_seqlens.numpy().astype(np.int64)
        return np.asarray([[row, cut.attend_len, cut.capacity, *cut.window_positions, *(cu[row] + np.array(cut.window))]
                           for cut, rows in groups for row in rows], dtype=np.int64)

    def _select(self, meta: Tensor, table: Tensor, raw_q: Tensor, longest: int, width: int) -> Tensor:
        """`select_kept` of the rows of `meta`, scoring their keys where they lie in the pages."""
        window, k_pages = (meta.shape[1] - 3) // 2, self.pool.k_pages
        query = window_query(raw_q[meta[:, 3 + window :]], k_pages.dtype)
        scores = paged_scores(k_pages, table, meta[:, 0], query, longest, 1 / math.sqrt(k_pages.shape[-1]))
        return kept_positions(scores, meta[:, 3 : 3 + window], meta[:, 1], meta[:, 2], width)


def _kept_segments(groups: list[tuple[ScoredCut, list[int]]], heads: int, width: int) -> np.ndarray:
    """`compaction` segments of scored rows: (row, head) keeps its cut's capacity of the positions selected for it,
    which lie at (i * heads + head) * width of the selection `[rows, heads, width]` of the i-th row."""
    rows = np.asarray([(row, cut.capacity) for cut, rows in groups for row in rows], dtype=np.int64)
    head = np.arange(heads)
    first = (np.arange(len(rows))[:, None] * heads + head) * width
    parts = np.broadcast_arrays(rows[:, :1], head, first, rows[:, 1:])
    return np.stack(parts, axis=-1).reshape(-1, 4).astype(np.int32)
