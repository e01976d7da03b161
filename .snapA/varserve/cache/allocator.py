"""One pool of fixed-size pages shared by every request, layer and head: numpy only, no tensors."""

from __future__ import annotations

import numpy as np

NULL_PAGE = 0


class BlockAllocator:
    """Reference-counted page allocator with a LIFO free stack.

    Page 0 is the null page: it pads block tables and is never handed out. Every operation is vectorised
    over the pages it gets, so allocating or freeing hundreds of thousands of pages costs a few numpy calls.
    Misuse (freeing a free page or the null page) raises ValueError: it is a bug, not a resource condition.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"a pool needs the null page and at least one more, got {num_pages} pages")
        self._refcount = np.zeros(num_pages, dtype=np.int32)
        self._last_seen = np.zeros(num_pages, dtype=np.int32)  # scratch of `free`'s duplicate check
        # Top of the stack is the end: page 1 is handed out first.
        self._stack = np.arange(num_pages - 1, 0, -1, dtype=np.int32)
        self._top = num_pages - 1
        self._peak = 0

    @property
    def num_total(self) -> int:
        """Pages in the pool, the null page included (num_free + num_used == num_total - 1)."""
        return len(self._refcount)

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_total - 1 - self._top

    @property
    def peak_used(self) -> int:
        return self._peak

    @property
    def refcounts(self) -> np.ndarray:
        """Read-only view of the reference count of every page."""
        view = self._refcount.view()
        view.flags.writeable = False
        return view

    def reset_peak(self) -> None:
        self._peak = self.num_used

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self._top

    def allocate(self, n: int) -> np.ndarray | None:
        """n distinct pages with refcount 1, or None (nothing changed) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self._top:
            return None
        pages = self._stack[self._top - n : self._top][::-1].copy()
        self._top -= n
        self._refcount[pages] = 1
        self._peak = max(self._peak, self.num_used)
        return pages

    def fork(self, pages: np.ndarray) -> None:
        """Add one reference to each page (a page listed twice gets two), e.g. to share it."""
        uniq, counts = self._held(pages)
        self._refcount[uniq] += counts

    def free(self, pages: np.ndarray) -> None:
        """Drop one reference per listed page; pages whose count reaches 0 go back to the free stack."""
        if self._free_distinct_single(np.asarray(pages).ravel()):
            return
        uniq, counts = self._held(pages)
        remaining = self._refcount[uniq] - counts
        if (remaining < 0).any():
            raise ValueError(f"pages freed more often than referenced: {uniq[remaining < 0][:8].tolist()}")
        self._refcount[uniq] = remaining
        released = uniq[remaining == 0]
        self._stack[self._top : self._top + len(released)] = released
        self._top += len(released)

    def _free_distinct_single(self, pages: np.ndarray) -> bool:
        """The common case without sorting: distinct pages held once each (a cut's pages) are freed, True;
        anything else is left to the general path, False."""
        if not len(pages) or pages.min() <= NULL_PAGE or pages.max() >= self.num_total:
            return False
        if (self._refcount[pages] != 1).any():
            return False
        order = np.arange(len(pages), dtype=np.int32)
        self._last_seen[pages] = order  # a page listed twice keeps only its last position
        if (self._last_seen[pages] != order).any():
            return False
        self._refcount[pages] = 0
        self._stack[self._top : self._top + len(pages)] = pages
        self._top += len(pages)
        return True

    def _held(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct pages and how often each is listed; raises unless every one is a held, real page."""
        pages = np.asarray(pages, dtype=np.int64).ravel()
        uniq, counts = np.unique(pages, return_counts=True)
        if len(uniq) and (uniq[0] <= NULL_PAGE or uniq[-1] >= self.num_total):
            raise ValueError(f"page ids must lie in [1, {self.num_total}), got {uniq[[0, -1]].tolist()}")
        if (self._refcount[uniq] == 0).any():
            raise ValueError(f"pages not allocated: {uniq[self._refcount[uniq] == 0][:8].tolist()}")
        return uniq.astype(np.int32), counts.astype(np.int32)
