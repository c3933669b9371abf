"""A reuse pool for large temporary numpy arrays (the numpy backend's ``scratch``).

Why: on Linux, glibc hands large blocks (the im2col windows of a convolution, its window
gradients, padded copies: several MB each) back to the kernel when they are freed and maps
fresh pages for the next step; every first touch of a fresh 4 KiB page is a page fault that the
kernel serves by zeroing it. A CNN training step faults about 850 times; measured at
2–2.5 µs a fault that is 2–3 ms of a 32 ms step. Keeping the blocks and handing them out again
removes the faults without changing any process-wide allocator setting.

How it stays safe: every array handed out is a view of a pooled 1-d byte buffer, and numpy
points every view (and every view of a view) at that owning buffer. A buffer is reused only
when the pool holds the **only** reference to it (``sys.getrefcount``), i.e. when no array,
view, memoryview or foreign wrapper of it is alive anywhere. So ``scratch`` behaves exactly
like ``np.empty``; only the memory is recycled.

Bounds: only requests of at least ``min_bytes`` are pooled; free buffers beyond
``max_free_bytes`` are dropped, least recently used first; the pool tracks at most
``max_entries`` buffers per thread (older busy ones are forgotten and freed normally when their
last user drops them). Pools are per thread, so concurrent workers never share a buffer.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

_PAGE = 4096


class ScratchPool:
    """Per-thread recycling of large ``np.empty`` blocks (see the module docstring)."""

    def __init__(self, min_bytes: int = 1 << 20, max_free_bytes: int = 512 << 20,
                 max_entries: int = 64):
        self.min_bytes = min_bytes
        self.max_free_bytes = max_free_bytes
        self.max_entries = max_entries
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[threading.local] = []  # every thread's entry list, for clear/stats
        self.hits = 0
        self.misses = 0

    def _entries(self) -> list[np.ndarray]:
        entries = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = []
            with self._lock:
                self._all.append(entries)
        return entries

    @staticmethod
    def _is_free(entries: list[np.ndarray], i: int) -> bool:
        """Whether nothing but the pool references ``entries[i]`` (callers hold no other
        reference to it while asking: the count is the list's slot plus getrefcount's own)."""
        return sys.getrefcount(entries[i]) <= 2

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` (like ``np.empty``)."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype=dtype)
        size = -(-nbytes // _PAGE) * _PAGE
        entries = self._entries()
        for i in range(len(entries) - 1, -1, -1):
            if entries[i].nbytes == size and self._is_free(entries, i):
                buf = entries.pop(i)
                entries.append(buf)  # most recently used last
                self.hits += 1
                return buf[:nbytes].view(dtype).reshape(shape)
        buf = np.empty(size, dtype=np.uint8)
        entries.append(buf)
        self.misses += 1
        self._trim(entries)
        return buf[:nbytes].view(dtype).reshape(shape)

    def _trim(self, entries: list[np.ndarray]) -> None:
        """Drop least recently used free buffers beyond ``max_free_bytes``, and forget the
        oldest entries beyond ``max_entries``."""
        free = self._free_bytes(entries)
        i = 0
        while i < len(entries) and (free > self.max_free_bytes
                                    or len(entries) > self.max_entries):
            if self._is_free(entries, i):
                free -= entries[i].nbytes
                del entries[i]
            elif len(entries) > self.max_entries:
                del entries[i]  # busy: its users keep it alive; it is simply not reused
            else:
                i += 1

    def _free_bytes(self, entries: list[np.ndarray]) -> int:
        return sum(entries[i].nbytes for i in range(len(entries)) if self._is_free(entries, i))

    def clear(self) -> int:
        """Forget every pooled buffer of every thread; returns the bytes of free buffers
        released (busy ones are freed when their last user drops them)."""
        released = 0
        with self._lock:
            for entries in self._all:
                released += self._free_bytes(entries)
                entries.clear()
        return released

    def stats(self) -> dict:
        """``{"free_bytes", "busy_bytes", "buffers", "hits", "misses"}`` over all threads."""
        free = busy = count = 0
        with self._lock:
            for entries in self._all:
                count += len(entries)
                total = sum(entries[i].nbytes for i in range(len(entries)))
                free += self._free_bytes(entries)
                busy += total - self._free_bytes(entries)
        return {"free_bytes": free, "busy_bytes": busy, "buffers": count, "hits": self.hits,
                "misses": self.misses}
