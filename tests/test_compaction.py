"""A cut's token moves (varserve/cache/compaction.py), the Triton kernel on CUDA and the eager path elsewhere,
against a plain reference: each (row, head)'s dense tokens read through its table, the kept ones put first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from varserve.cache.compaction import RunTable, move_kept, move_runs
from varserve.cache.kv_pool import _kept_segments
from varserve.cache.plan import ScoredCut, StaticCut

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ROWS, HEADS, PAGE, D = 5, 3, 16, 64


def _pool(device: str, pages: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(pages, PAGE, D, generator=generator).to(device, torch.bfloat16) for _ in range(2))


def _table(width: int, seed: int) -> torch.Tensor:
    """[ROWS, HEADS, width] distinct pages, in random order (page 0, the null page, unused)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randperm(ROWS * HEADS * width, generator=generator) + 1).view(ROWS, HEADS, width).to(torch.int32)


def _expected(pages: torch.Tensor, table: torch.Tensor, kept: dict[tuple[int, int], np.ndarray]) -> torch.Tensor:
    """The pool after moving, for every (row, head) listed, its tokens at the kept positions to 0 .. n - 1."""
    out = pages.cpu().clone()
    flat, before = out.view(-1, D), pages.cpu().view(-1, D)
    for (row, head), positions in kept.items():
        slots = lambda p: table[row, head, p // PAGE].long() * PAGE + p % PAGE  # noqa: E731
        src = torch.from_numpy(positions)
        flat[slots(torch.arange(len(src)))] = before[slots(src)]
    return out


def _kept_positions(rng: np.random.Generator, length: int) -> list[np.ndarray]:
    """Per head: sorted kept positions; head 0 drops only token 0 (a run moved down by one over many blocks)."""
    out = [np.arange(1, length)]
    for _ in range(1, HEADS):
        out.append(np.sort(rng.choice(length, size=int(rng.integers(1, length)), replace=False)))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_static_cuts_move_every_row_in_one_call(device: str) -> None:
    rng, width = np.random.default_rng(0), 40
    length = width * PAGE
    kept = [_kept_positions(rng, length) for _ in range(2)]
    cuts = [StaticCut.from_positions(positions) for positions in kept]
    rows_of = {0: [0, 3], 1: [1, 4]}  # row 2 keeps a prefix: nothing moves
    table = _table(width, 1)
    k, v = _pool(device, ROWS * HEADS * width + 1, 2)
    runs = RunTable(torch.device(device))
    segments = np.concatenate([runs.segments(cuts[c], rows) for c, rows in rows_of.items()])
    expected = {(row, h): kept[c][h] for c, rows in rows_of.items() for row in rows for h in range(HEADS)}
    want_k, want_v = _expected(k, table, expected), _expected(v, table, expected)
    move_runs(k, v, table.to(device), torch.from_numpy(segments).to(device), runs.runs())
    assert torch.equal(k.cpu(), want_k) and torch.equal(v.cpu(), want_v)


def test_run_table_keeps_earlier_uploads_and_adds_a_cut_once() -> None:
    table = RunTable(torch.device("cpu"))
    first = StaticCut.from_positions([np.array([1, 2, 5]), np.array([0, 1])])  # head 1 is in place: no run
    segments = table.segments(first, [4])
    assert segments.tolist() == [[4, 0, 0, 2]]  # runs 1..2 -> 0..1 and 5 -> 2
    uploaded = table.runs()
    assert table.runs() is uploaded
    table.segments(first, [0, 1])
    second = StaticCut.from_positions([np.array([3]), np.array([2])])
    assert table.segments(second, [2]).tolist() == [[2, 0, 2, 1], [2, 1, 3, 1]]
    assert table.runs().shape == (3, 4) and uploaded.shape == (3, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_scored_cuts_move_their_selected_positions(device: str) -> None:
    rng, width = np.random.default_rng(3), 24
    length = width * PAGE
    groups = [(ScoredCut(100, length, 60, (0,)), [3, 0]), (ScoredCut(10, 200, 45, (0,)), [4])]
    capacity = max(cut.capacity for cut, _ in groups)
    selected = np.full((3, HEADS, capacity), length, dtype=np.int64)  # past a row's capacity: padding
    expected = {}
    for i, (cut, row) in enumerate((cut, row) for cut, rows in groups for row in rows):
        for h in range(HEADS):
            positions = np.sort(rng.choice(cut.attend_len, size=cut.capacity, replace=False))
            selected[i, h, : cut.capacity] = positions
            expected[row, h] = positions
    table = _table(width, 4)
    k, v = _pool(device, ROWS * HEADS * width + 1, 5)
    want_k, want_v = _expected(k, table, expected), _expected(v, table, expected)
    segments = torch.from_numpy(_kept_segments(groups, HEADS, capacity)).to(device)
    move_kept(k, v, table.to(device), segments, torch.from_numpy(selected).to(device))
    assert torch.equal(k.cpu(), want_k) and torch.equal(v.cpu(), want_v)
