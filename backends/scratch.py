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

Bounds: only requests of at least ``min_bytes`` are pooled; after every request, free buffers
beyond ``max_free_bytes`` are dropped, least recently used first; the pool tracks at most
``max_entries`` buffers per thread (older busy ones are forgotten and freed normally when their
last user drops them). Pools are per thread, so concurrent workers never share a buffer, and a
thread's buffers are released when the thread ends. Arrays of Python objects, and interpreters
without reference counts (PyPy), get a plain ``np.empty``.
"""

from __future__ import annotations

import sys
import threading
import weakref

import numpy as np

_PAGE = 4096
_COUNTED = hasattr(sys, "getrefcount")  # CPython


class _ThreadPool:
    """One thread's buffers (most recently used last), the lock that lets other threads read
    or clear them, and its hit/miss counts."""

    __slots__ = ("buffers", "lock", "hits", "misses", "__weakref__")

    def __init__(self):
        self.buffers: list[np.ndarray] = []
        self.lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def is_free(self, i: int) -> bool:
        """Whether nothing but the pool references ``buffers[i]`` (callers hold no other
        reference to it while asking: the count is the list's slot plus getrefcount's own)."""
        return sys.getrefcount(self.buffers[i]) <= 2

    def free_bytes(self) -> int:
        return sum(self.buffers[i].nbytes for i in range(len(self.buffers)) if self.is_free(i))


class ScratchPool:
    """Per-thread recycling of large ``np.empty`` blocks (see the module docstring)."""

    def __init__(self, min_bytes: int = 1 << 20, max_free_bytes: int = 512 << 20,
                 max_entries: int = 64):
        self.min_bytes = min_bytes
        self.max_free_bytes = max_free_bytes
        self.max_entries = max_entries
        self._local = threading.local()
        self._lock = threading.Lock()
        # every live thread's pool, for clear() and stats(); a thread's pool (and its buffers)
        # goes away with the thread
        self._pools: weakref.WeakSet[_ThreadPool] = weakref.WeakSet()

    def _pool(self) -> _ThreadPool:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = _ThreadPool()
            with self._lock:
                self._pools.add(pool)
        return pool

    def empty(self, shape: int | tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` (like ``np.empty``)."""
        dtype = np.dtype(dtype)
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else \
            tuple(int(s) for s in shape)
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if nbytes < self.min_bytes or dtype.hasobject or not _COUNTED:
            return np.empty(shape, dtype=dtype)
        size = -(-nbytes // _PAGE) * _PAGE
        pool = self._pool()
        with pool.lock:
            buffers = pool.buffers
            for i in range(len(buffers) - 1, -1, -1):
                if buffers[i].nbytes == size and pool.is_free(i):
                    buf = buffers.pop(i)
                    pool.hits += 1
                    break
            else:
                buf = np.empty(size, dtype=np.uint8)
                pool.misses += 1
            buffers.append(buf)  # most recently used last
            out = buf[:nbytes].view(dtype).reshape(shape)
            del buf  # only `out` (through its base) keeps the new block busy now
            self._trim(pool)
        return out

    def _trim(self, pool: _ThreadPool) -> None:
        """Drop least recently used free buffers beyond ``max_free_bytes``, and forget the
        oldest entries beyond ``max_entries`` (``pool.lock`` held)."""
        buffers = pool.buffers
        free = pool.free_bytes()
        i = 0
        while i < len(buffers) and (free > self.max_free_bytes
                                    or len(buffers) > self.max_entries):
            if pool.is_free(i):
                free -= buffers[i].nbytes
                del buffers[i]
            elif len(buffers) > self.max_entries:
                del buffers[i]  # busy: its users keep it alive; it is simply not reused
            else:
                i += 1

    def _each_pool(self) -> list[_ThreadPool]:
        with self._lock:
            return list(self._pools)

    def clear(self) -> int:
        """Forget every pooled buffer of every thread; returns the bytes of free buffers
        released (busy ones are freed when their last user drops them)."""
        released = 0
        for pool in self._each_pool():
            with pool.lock:
                released += pool.free_bytes()
                pool.buffers.clear()
        return released

    def stats(self) -> dict:
        """``{"free_bytes", "busy_bytes", "buffers", "hits", "misses"}`` over all threads."""
        free = busy = count = hits = misses = 0
        for pool in self._each_pool():
            with pool.lock:
                f = pool.free_bytes()
                free += f
                busy += sum(b.nbytes for b in pool.buffers) - f
                count += len(pool.buffers)
                hits += pool.hits
                misses += pool.misses
        return {"free_bytes": free, "busy_bytes": busy, "buffers": count, "hits": hits,
                "misses": misses}
