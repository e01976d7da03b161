"""A cut's token moves on the device: the kept tokens of every (row, head) go to the front of its table.

A cut keeps tokens at ascending positions of a (row, head) and moves them, in order, to positions [0, kept): no
destination lies above its source. Walked in that order a block at a time (all of a block's tokens read before
any is written), the moves never overwrite a token still to be read, so they run in place: on CUDA one Triton
program per (row, head) walks its moves, one launch per layer for all rows and cuts (per cut, PyTorch's index
arithmetic, gathers and copies cost ~12 launches and ~2 ms of host time a layer). Elsewhere the moves are
expanded to tokens, all gathered, then scattered.

A segment is int32 `(row, head, first, count)`: the (row, head) of a layer's block table and which of the moves
are its: runs `first .. first + count - 1` of a `RunTable` (static cuts: tokens src .. src + length - 1 go to
dst ..), or positions `first .. first + count - 1` of a flat tensor of kept positions, moved to 0 .. count - 1
(ScaleKV's scored cuts).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from varserve.attention import gather_rows, upload, wide_rows
from varserve.cache.plan import StaticCut

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the eager path runs
    triton = None

MOVE_BLOCK = 64  # tokens a program moves at a time


class RunTable:
    """The runs of every static cut met so far, in one device array `[3, runs]` int32 (src, dst, length), so that
    one launch moves a layer's tokens whatever cuts its rows are at. A cut's runs are added on its first use and
    the array uploaded again; earlier uploads are kept alive, as CUDA graphs captured with them read them."""

    def __init__(self, device: torch.device):
        self.device = device
        self._runs = np.zeros((3, 0), dtype=np.int32)
        self._heads: dict[int, tuple[StaticCut, np.ndarray]] = {}  # id(cut) -> (cut, [heads with runs, 3])
        self._uploads: list[Tensor] = []

    def segments(self, cut: StaticCut, rows: Sequence[int]) -> np.ndarray:
        """int32 `[len(rows) * heads moved, 4]`: a segment per (row, head) the cut moves tokens of."""
        if id(cut) not in self._heads:
            self._add(cut)
        heads = self._heads[id(cut)][1]
        rows = np.asarray(rows, dtype=np.int32)
        return np.concatenate([np.repeat(rows, len(heads))[:, None], np.tile(heads, (len(rows), 1))], axis=1)

    def runs(self) -> Tensor:
        """The device array, uploaded again if runs were added since the last call."""
        if not self._uploads or self._uploads[-1].shape[1] != self._runs.shape[1]:
            self._uploads.append(upload(self._runs, self.device).contiguous())
        return self._uploads[-1]

    def _add(self, cut: StaticCut) -> None:
        heads, first, count = np.unique(cut.heads, return_index=True, return_counts=True)  # runs go head by head
        start = self._runs.shape[1]
        self._runs = np.concatenate([self._runs, np.stack([cut.src, cut.dst, cut.length]).astype(np.int32)], axis=1)
        self._heads[id(cut)] = (cut, np.stack([heads, start + first, count], axis=1).astype(np.int32))


def move_runs(k_pages: Tensor, v_pages: Tensor, table: Tensor, segments: Tensor, runs: Tensor) -> None:
    """Move the runs of every segment `[S, 4]` (int32, on the pages' device) through `table [R, H, pages]`."""
    if _kernel_on(k_pages):
        _launch(k_pages, v_pages, table, segments, runs[0], runs[1], runs[2], True)
        return
    row, head, first, count = segments.long().unbind(1)
    run_segment = _owners(count)
    run = first[run_segment] + _offsets(count, run_segment)
    src, dst, length = runs[:, run].long()
    token_run = _owners(length)
    offset = _offsets(length, token_run)
    owner = run_segment[token_run]
    _move_eager(k_pages, v_pages, table, row[owner], head[owner], src[token_run] + offset, dst[token_run] + offset)


def move_kept(k_pages: Tensor, v_pages: Tensor, table: Tensor, segments: Tensor, kept: Tensor) -> None:
    """Move positions `kept[first : first + count]` of every segment `[S, 4]` to 0 .. count - 1."""
    kept = kept.reshape(-1)
    if _kernel_on(k_pages):
        _launch(k_pages, v_pages, table, segments, kept, kept, kept, False)
        return
    row, head, first, count = segments.long().unbind(1)
    owner = _owners(count)
    index = _offsets(count, owner)
    _move_eager(k_pages, v_pages, table, row[owner], head[owner], kept[first[owner] + index].long(), index)


def token_slots(table: Tensor, rows: Tensor, heads: Tensor, positions: Tensor, page_size: int) -> Tensor:
    """int64 flat slots of token `positions` of (rows, heads) through a layer's block table `[R, H, pages]`."""
    return table[rows, heads, positions // page_size].long() * page_size + positions % page_size


def _kernel_on(pages: Tensor) -> bool:
    d = pages.shape[-1]
    return pages.is_cuda and triton is not None and d & (d - 1) == 0


def _owners(count: Tensor) -> Tensor:
    """For every item of consecutive groups of `count` items, its group."""
    return torch.repeat_interleave(torch.arange(len(count), device=count.device), count)


def _offsets(count: Tensor, owner: Tensor) -> Tensor:
    """Each item's index within its group."""
    return torch.arange(len(owner), device=count.device) - F.pad(count.cumsum(0), (1, 0))[owner]


def _move_eager(k_pages: Tensor, v_pages: Tensor, table: Tensor, rows: Tensor, heads: Tensor, src: Tensor,
                dst: Tensor) -> None:
    """Every listed token read, then written: any order of moves is right."""
    page_size = k_pages.shape[1]
    src_slots = token_slots(table, rows, heads, src, page_size)
    dst_slots = token_slots(table, rows, heads, dst, page_size)
    for pages in (k_pages, v_pages):
        (flat,) = wide_rows(pages.view(-1, pages.shape[-1]))
        flat.index_copy_(0, dst_slots, gather_rows(flat, src_slots))


def _launch(k_pages: Tensor, v_pages: Tensor, table: Tensor, segments: Tensor, src: Tensor, dst: Tensor,
            length: Tensor, runs: bool) -> None:
    if not (k_pages.is_contiguous() and v_pages.is_contiguous() and table.is_contiguous()):
        raise ValueError("compaction needs contiguous pages and block table")
    if len(segments):
        _compact_kernel[(len(segments),)](k_pages, v_pages, table, segments.contiguous(), src, dst, length,
                                          table.shape[1], table.shape[2], PAGE=k_pages.shape[1],
                                          D=k_pages.shape[2], BLOCK=MOVE_BLOCK, RUNS=runs, num_warps=4)


if triton is not None:

    @triton.jit
    def _move_block(K, V, table, src, dst, valid, PAGE: tl.constexpr, D: tl.constexpr):
        """Tokens src -> dst of one (row, head) through its page table: all read before any is written."""
        offs = tl.arange(0, D)[None, :]
        mask = valid[:, None]
        src_slot = tl.load(table + src // PAGE, mask=valid, other=0).to(tl.int64) * PAGE + src % PAGE
        dst_slot = tl.load(table + dst // PAGE, mask=valid, other=0).to(tl.int64) * PAGE + dst % PAGE
        k = tl.load(K + src_slot[:, None] * D + offs, mask=mask)
        v = tl.load(V + src_slot[:, None] * D + offs, mask=mask)
        tl.debug_barrier()  # a destination may be another thread's source in this block
        tl.store(K + dst_slot[:, None] * D + offs, k, mask=mask)
        tl.store(V + dst_slot[:, None] * D + offs, v, mask=mask)

    @triton.jit
    def _compact_kernel(K, V, Table, Segments, Src, Dst, Length, heads, width, PAGE: tl.constexpr,
                        D: tl.constexpr, BLOCK: tl.constexpr, RUNS: tl.constexpr):
        segment = Segments + tl.program_id(0).to(tl.int64) * 4
        row, head = tl.load(segment).to(tl.int64), tl.load(segment + 1).to(tl.int64)
        first, count = tl.load(segment + 2).to(tl.int64), tl.load(segment + 3)
        table = Table + (row * heads + head) * width
        block = tl.arange(0, BLOCK)
        if RUNS:
            for r in range(count):
                src, dst, length = tl.load(Src + first + r), tl.load(Dst + first + r), tl.load(Length + first + r)
                for start in range(0, length, BLOCK):
                    _move_block(K, V, table, src + start + block, dst + start + block, start + block < length,
                                PAGE, D)
        else:
            for start in range(0, count, BLOCK):
                valid = start + block < count
                src = tl.load(Src + first + start + block, mask=valid, other=0)
                _move_block(K, V, table, src, start + block, valid, PAGE, D)
