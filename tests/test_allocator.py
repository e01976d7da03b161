"""BlockAllocator and BlockTables: properties of the page pool and the per-request tables."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from varserve.cache.allocator import BlockAllocator
from varserve.cache.block_table import BlockTables, PageMoves, pages_for


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / fork / free against a model: a Counter of the references the caller holds."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(17)
        self.held: Counter[int] = Counter()

    @rule(n=st.integers(0, 20))
    def allocate(self, n: int) -> None:
        before = self.alloc.refcounts.copy()
        pages = self.alloc.allocate(n)
        if pages is None:
            assert n > 16 - len(self.held)
            np.testing.assert_array_equal(self.alloc.refcounts, before)
            return
        assert pages.dtype == np.int32 and len(set(pages.tolist())) == n
        assert not set(pages.tolist()) & set(self.held), "handed out a page that is still used"
        assert 0 not in pages
        self.held.update(pages.tolist())

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        pages = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1, max_size=6))
        self.alloc.fork(np.array(pages))
        self.held.update(pages)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        refs = sorted(self.held.elements())
        picked = data.draw(st.lists(st.integers(0, len(refs) - 1), unique=True, min_size=1, max_size=8))
        pages = [refs[i] for i in picked]
        self.alloc.free(np.array(pages))
        self.held.subtract(pages)
        self.held = +self.held

    @rule(page=st.integers(0, 16))
    def free_unheld_raises(self, page: int) -> None:
        if page in self.held:
            return
        with pytest.raises(ValueError):
            self.alloc.free(np.array([page]))

    @invariant()
    def matches_model(self) -> None:
        expected = np.zeros(17, dtype=np.int32)
        for page, count in self.held.items():
            expected[page] = count
        np.testing.assert_array_equal(self.alloc.refcounts, expected)
        assert self.alloc.num_used == len(self.held)
        assert self.alloc.num_free + self.alloc.num_used == self.alloc.num_total - 1
        assert self.alloc.peak_used >= self.alloc.num_used

    def teardown(self) -> None:
        self.alloc.free(np.array(list(self.held.elements()), dtype=np.int32))
        assert self.alloc.num_used == 0 and self.alloc.num_free == 16
        np.testing.assert_array_equal(np.sort(self.alloc.allocate(16)), np.arange(1, 17))


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_allocate_more_than_free_returns_none_and_changes_nothing() -> None:
    alloc = BlockAllocator(5)
    assert alloc.allocate(3) is not None and alloc.allocate(2) is None
    assert alloc.num_free == 1 and alloc.can_allocate(1) and not alloc.can_allocate(2)
    assert len(alloc.allocate(0)) == 0


@pytest.mark.parametrize("pages", [[0], [5], [1, 1]])
def test_bad_frees_raise_and_change_nothing(pages: list[int]) -> None:
    alloc = BlockAllocator(5)
    alloc.allocate(1)
    with pytest.raises(ValueError):
        alloc.free(np.array(pages))
    assert alloc.num_used == 1 and alloc.refcounts[1] == 1


def test_fork_keeps_page_until_last_free_and_peak() -> None:
    alloc = BlockAllocator(8)
    pages = alloc.allocate(3)
    alloc.fork(pages[:1])
    alloc.free(pages)
    assert alloc.num_used == 1 and alloc.peak_used == 3
    alloc.reset_peak()
    assert alloc.peak_used == 1
    alloc.free(pages[:1])
    assert alloc.num_used == 0


def test_million_pages_in_chunks_is_fast() -> None:
    alloc = BlockAllocator(1_000_001)
    start = time.perf_counter()
    chunks = [alloc.allocate(1000) for _ in range(1000)]
    for chunk in chunks:
        alloc.free(chunk)
    assert time.perf_counter() - start < 1.0
    assert alloc.num_free == 1_000_000 and alloc.peak_used == 1_000_000


# --- BlockTables --------------------------------------------------------------------------------------------

def test_grow_shrink_release_round_trip() -> None:
    alloc = BlockAllocator(100)
    tables = BlockTables(rows=2, layers=3, heads=4, max_pages=6, page_size=4)
    lengths = np.array([[1, 4, 5, 9], [0, 13, 2, 8]])
    assert tables.grow(1, lengths, alloc)
    assert alloc.num_used == tables.num_pages() == pages_for(lengths, 4).sum()
    table = tables.table(1)
    assert ((table != 0).sum(-1) == pages_for(lengths, 4)).all()
    assert len(np.unique(table[table != 0])) == tables.num_pages()
    assert tables.grow(1, lengths + 3, alloc)
    np.testing.assert_array_equal(tables.table(1)[table != 0], table[table != 0])  # old pages stay put
    freed = tables.shrink(1, lengths // 2, alloc)
    assert alloc.num_used == tables.num_pages() == pages_for(lengths // 2, 4).sum()
    assert freed == pages_for(lengths + 3, 4).sum() - pages_for(lengths // 2, 4).sum()
    np.testing.assert_array_equal(tables.lengths(1), lengths // 2)
    tables.release(alloc)
    tables.release(alloc)
    assert alloc.num_used == 0 and tables.num_pages() == 0


def test_page_moves_do_what_grow_and_shrink_do() -> None:
    before, grown, kept = np.array([[3, 0, 9]]), np.array([[7, 5, 17]]), np.array([[2, 5, 4]])
    moves = PageMoves.between(before, grown, kept, page_size=4)
    by_moves, by_lengths = (BlockTables(rows=1, layers=1, heads=3, max_pages=5, page_size=4) for _ in range(2))
    alloc_moves, alloc_lengths = BlockAllocator(50), BlockAllocator(50)
    assert by_moves.grow(0, before, alloc_moves) and by_lengths.grow(0, before, alloc_lengths)
    by_moves.apply_grow(0, moves, alloc_moves.allocate(moves.num_grown))
    assert by_lengths.grow(0, grown, alloc_lengths)
    np.testing.assert_array_equal(by_moves.table(0), by_lengths.table(0))  # same LIFO pool, same page ids
    assert by_moves.num_pages() == by_lengths.num_pages() == pages_for(grown, 4).sum()
    alloc_moves.free(by_moves.apply_shrink(0, moves))
    by_lengths.shrink(0, kept, alloc_lengths)
    np.testing.assert_array_equal(by_moves.table(0), by_lengths.table(0))
    np.testing.assert_array_equal(by_moves.lengths(0), kept)
    assert alloc_moves.num_used == alloc_lengths.num_used == by_moves.num_pages() == pages_for(kept, 4).sum()
    with pytest.raises(ValueError, match="other lengths"):  # the moves start from `before`, not from `kept`
        by_moves.apply_grow(0, moves, alloc_moves.allocate(moves.num_grown))
    with pytest.raises(ValueError):
        PageMoves.between(grown, before, kept, page_size=4)  # a grow that shrinks


def test_grow_is_all_or_nothing() -> None:
    alloc = BlockAllocator(6)
    tables = BlockTables(rows=1, layers=2, heads=2, max_pages=4, page_size=2)
    assert tables.grow(0, np.array([[2, 3]]), alloc)
    assert not tables.grow(1, np.array([[4, 3]]), alloc)
    assert alloc.num_used == 3 and alloc.num_free == 2
    assert tables.num_pages() == 3 and (tables.table(1) == 0).all() and (tables.lengths(1) == 0).all()


def test_release_frees_exactly_what_was_taken() -> None:
    alloc = BlockAllocator(200)
    other = BlockTables(rows=1, layers=1, heads=2, max_pages=8, page_size=3)
    assert other.grow(0, np.array([[7, 20]]), alloc)
    taken = alloc.num_used
    tables = BlockTables(rows=2, layers=2, heads=3, max_pages=8, page_size=3)
    for layer in range(2):
        assert tables.grow(layer, np.random.default_rng(layer).integers(0, 24, (2, 3)), alloc)
    tables.release(alloc)
    assert alloc.num_used == taken and other.num_pages() == taken


def test_bad_lengths_raise() -> None:
    alloc = BlockAllocator(50)
    tables = BlockTables(rows=1, layers=1, heads=2, max_pages=2, page_size=4)
    assert tables.grow(0, np.array([[3, 3]]), alloc)
    for bad_grow in ([[9, 1]], [[2, 5]]):  # more than max_pages, or a grow that shrinks
        with pytest.raises(ValueError):
            tables.grow(0, np.array(bad_grow), alloc)
    with pytest.raises(ValueError):
        tables.shrink(0, np.array([[4, 1]]), alloc)
    with pytest.raises(ValueError):
        tables.slots(0, np.array([[2, 0]]), np.array([[2, 1]]))


def test_slots_follow_the_table() -> None:
    alloc = BlockAllocator(300)
    alloc.free(np.random.default_rng(0).permutation(alloc.allocate(299)))  # shuffled free stack
    tables = BlockTables(rows=2, layers=1, heads=3, max_pages=10, page_size=4)
    assert tables.grow(0, np.array([[5, 17, 30], [9, 9, 12]]), alloc)
    start, count = np.array([[1, 10, 4], [0, 3, 12]]), np.array([[4, 7, 26], [9, 6, 0]])
    token = start[:, None, :] + np.arange(26)[None, :, None]  # [row, t, head]
    expected = [tables.table(0)[r, h, token[r, t, h] // 4] * 4 + token[r, t, h] % 4
                for r in range(2) for t in range(26) for h in range(3) if t < count[r, h]]
    slots = tables.slots(0, start, count)
    assert slots.dtype == np.int64
    np.testing.assert_array_equal(slots, expected)
    uniform = tables.slots(0, np.array([[0, 0, 0], [1, 2, 3]]), np.array([[5, 5, 5], [6, 6, 6]]))
    assert uniform.reshape(-1, 3).shape == (11, 3)
