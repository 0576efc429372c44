"""Reusable output buffers for blocks of image and video tokens.

Why our own pool: a block's token column is one buffer of tens of MB (a
64 MB block of video clips gives 67 MB of patches). numpy takes each from
glibc, which maps buffers over 32 MB afresh and unmaps them when freed, so
the kernel zeroes every page again on first touch: on this project's VMs that
was 12% of a video build's CPU (perf: clear_page_erms under the copy into the
column). Neither numpy nor pyarrow (whose mimalloc pool also hands such pages
back after 10 ms) keeps big buffers for reuse, and their allocator knobs are
process-wide environment settings read at start-up.

A buffer is free again once nothing but the pool refers to it: every numpy
view of it and every Arrow buffer made from one holds a reference to the
array that owns the memory (numpy collapses view chains to the owner), so
CPython's reference count says exactly when the writer is done with it.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

# Below this, malloc reuses freed memory on its own.
MIN_POOLED_BYTES = 1 << 20
# Sizes are rounded up to this, so that blocks of slightly different sizes share buffers.
GRANULE = 4 << 20


class BufferPool:
    """Up to `keep` big uint8 arrays, lent out as typed views and reused once no one holds them."""

    def __init__(self, keep: int = 4):
        self._keep = keep
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def empty(self, count: int, dtype: np.dtype | str) -> np.ndarray:
        """An uninitialized 1-d array of `count` items, like np.empty, from a free pooled buffer when one fits."""
        dtype = np.dtype(dtype)
        nbytes = count * dtype.itemsize
        if nbytes < MIN_POOLED_BYTES:
            return np.empty(count, dtype)
        with self._lock:
            owner = self._take(nbytes)
            if owner is None:
                owner = np.empty(-(-nbytes // GRANULE) * GRANULE, np.uint8)
                if len(self._arrays) >= self._keep:
                    self._drop_one_free()
                if len(self._arrays) < self._keep:
                    self._arrays.append(owner)
        return owner[:nbytes].view(dtype)

    def _take(self, nbytes: int) -> np.ndarray | None:
        """The smallest free buffer of at least nbytes (and at most about twice that, not to pin a huge one)."""
        fits = [i for i in range(len(self._arrays))  # by index: a loop variable would be one more reference
                if nbytes <= self._arrays[i].nbytes <= 2 * nbytes + GRANULE and self._free(i)]
        return self._arrays[min(fits, key=lambda i: self._arrays[i].nbytes)] if fits else None

    def _free(self, i: int) -> bool:
        # References: the pool's list and getrefcount's own argument. Any lent view adds one.
        return sys.getrefcount(self._arrays[i]) <= 2

    def _drop_one_free(self) -> None:
        for i in range(len(self._arrays)):
            if self._free(i):
                del self._arrays[i]
                return

    def pooled_bytes(self) -> int:
        with self._lock:
            return sum(a.nbytes for a in self._arrays)
