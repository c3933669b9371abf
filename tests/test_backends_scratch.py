"""Recycled scratch memory: ``ScratchPool`` reuses a block only when nothing references it,
and ``Backend.scratch`` / ``scratch_matmul`` / ``contiguous_scratch`` behave like their plain
counterparts on every backend."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
from loomx.backends.scratch import ScratchPool

from tests.conftest import assert_close


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


@pytest.fixture
def pool() -> ScratchPool:
    return ScratchPool(min_bytes=1 << 12, max_free_bytes=1 << 22, max_entries=8)


def test_shape_dtype_and_layout(pool):
    a = pool.empty((64, 33), np.float32)
    assert a.shape == (64, 33) and a.dtype == np.float32 and a.flags.c_contiguous
    assert a.flags.writeable
    b = pool.empty((3, 4), np.float64)  # below min_bytes: a plain np.empty, not tracked
    assert b.shape == (3, 4) and b.dtype == np.float64
    assert pool.stats()["buffers"] == 1


def test_reused_only_when_nothing_references_it(pool):
    a = pool.empty((128, 128), np.float32)
    first = _addr(a)
    b = pool.empty((128, 128), np.float32)
    assert _addr(b) != first  # a is alive
    view = a[::2, 1:]
    del a
    c = pool.empty((128, 128), np.float32)
    assert _addr(c) != first  # a view of a keeps it busy
    del view
    d = pool.empty((128, 128), np.float32)
    assert _addr(d) == first
    assert pool.stats()["hits"] == 1


def test_foreign_references_keep_a_block_busy(pool):
    a = pool.empty((64, 64), np.float32)
    first = _addr(a)
    mem = memoryview(a.reshape(-1))
    del a
    other = pool.empty((64, 64), np.float32)
    assert _addr(other) != first
    mem.release()
    del mem
    gc.collect()
    assert _addr(pool.empty((64, 64), np.float32)) == first


def test_values_written_are_not_clobbered_while_alive(pool):
    arrays = []
    for k in range(5):
        a = pool.empty((32, 32), np.float32)
        a[...] = k
        arrays.append(a)
    for k, a in enumerate(arrays):
        assert np.all(a == k)


def test_same_bytes_other_shape_or_dtype_reuses(pool):
    a = pool.empty((256, 64), np.float32)
    first = _addr(a)
    del a
    b = pool.empty((128, 64), np.float64)
    assert _addr(b) == first and b.dtype == np.float64 and b.shape == (128, 64)


def test_bounds_drop_free_buffers_and_forget_busy_ones():
    pool = ScratchPool(min_bytes=1 << 12, max_free_bytes=3 << 16, max_entries=4)
    for n in range(1, 9):  # eight different sizes, each freed at once
        pool.empty((n << 14,), np.uint8)
    # trimmed at each new block: at most the budget plus the block last handed out
    assert pool.stats()["free_bytes"] <= (3 << 16) + (8 << 14)
    assert pool.stats()["buffers"] < 8
    busy = [pool.empty((n << 14,), np.uint8) for n in range(10, 16)]
    assert pool.stats()["buffers"] <= 4  # the oldest busy blocks are forgotten, not freed
    for k, a in enumerate(busy):
        a[...] = k
    assert all(np.all(a == k) for k, a in enumerate(busy))


def test_clear_releases_free_buffers(pool):
    a = pool.empty((64, 64), np.float32)
    del a
    assert pool.clear() >= 64 * 64 * 4
    assert pool.stats()["buffers"] == 0


def test_threads_never_share_a_block(pool):
    barrier = threading.Barrier(2)
    got: dict[int, list[int]] = {}

    def work(k: int) -> None:
        addrs = []
        for _ in range(20):
            a = pool.empty((64, 64), np.float32)
            a[...] = k
            barrier.wait()
            assert np.all(a == k)  # the other thread did not receive the same block
            addrs.append(_addr(a))
            del a
        got[k] = addrs

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(got[0]).isdisjoint(got[1])


def test_a_finished_threads_blocks_are_released(pool):
    def work() -> None:
        keep = [pool.empty((256, 64), np.float32) for _ in range(3)]
        del keep

    t = threading.Thread(target=work)
    t.start()
    t.join()
    gc.collect()
    assert pool.stats()["buffers"] == 0


def test_clear_and_stats_while_other_threads_allocate(pool):
    errors: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        try:
            while not stop.is_set():
                a = pool.empty((128, 64), np.float32)
                b = pool.empty((64, 64), np.float32)
                a[...] = 1
                b[...] = 2
                assert np.all(a == 1) and np.all(b == 2)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(300):
        pool.clear()
        pool.stats()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors


def test_free_blocks_are_trimmed_after_hits_too():
    pool = ScratchPool(min_bytes=1 << 12, max_free_bytes=1 << 16, max_entries=64)
    peak = [pool.empty((1 << 15,), np.uint8) for _ in range(10)]  # 320 KiB busy at once
    del peak
    for _ in range(3):
        pool.empty((1 << 15,), np.uint8)  # hits
    # the budget, plus the block handed out last (busy while the pool trimmed)
    assert pool.stats()["free_bytes"] <= (1 << 16) + (1 << 15)


def test_object_dtypes_and_int_shapes(pool):
    o = pool.empty((1 << 12,), object)
    assert o.dtype == object and pool.stats()["buffers"] == 0  # never pooled
    a = pool.empty(4096, np.float32)
    assert a.shape == (4096,)


# ------------------------------------------------------------ the Backend methods
def test_backend_scratch_like_empty(backend):
    a = backend.scratch((300, 1000))
    assert tuple(a.shape) == (300, 1000) and a.dtype == backend.float_dtype
    assert backend.is_array(a)
    a[...] = 1.5
    assert float(backend.to_host(backend.xp.sum(a))) == 1.5 * 300 * 1000
    i = backend.scratch((4,), dtype=backend.xp.int32)
    assert i.dtype == backend.xp.int32
    assert backend.clear_scratch() >= 0


def test_backend_scratch_matmul_equals_matmul(backend):
    rng = np.random.default_rng(0)
    xp = backend.xp
    for sa, sb in [((300, 40), (40, 600)), ((3, 5), (5, 2)), ((2, 300, 40), (40, 600)),
                   ((300, 40), (3, 40, 600)), ((7,), (7, 3))]:
        a = backend.from_host(rng.standard_normal(sa))
        b = backend.from_host(rng.standard_normal(sb))
        got = backend.scratch_matmul(a, b)
        assert tuple(got.shape) == tuple(xp.matmul(a, b).shape)
        assert_close(got, backend.to_host(xp.matmul(a, b)), backend, rtol=1e-6, atol=1e-6)


def test_backend_contiguous_scratch(backend):
    xp = backend.xp
    x = backend.from_host(np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4))
    same, copied = backend.contiguous_scratch(x)
    assert not copied and same is x
    t = xp.permute_dims(x, (0, 2, 1))
    c, copied = backend.contiguous_scratch(t)
    assert_close(c, backend.to_host(t), backend)
    if copied:  # the caller owns the copy: writing to it leaves x alone
        c[...] = 0
        assert float(backend.to_host(xp.sum(x))) == float(sum(range(24)))


def test_numpy_contiguous_scratch_copies_strided_views():
    from loomx.backends import get_backend

    b = get_backend("numpy")
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(0, 2, 1)
    c, copied = b.contiguous_scratch(x)
    assert copied and c.flags.c_contiguous
    np.testing.assert_array_equal(c, x)


# ------------------------------------------------------------ the host allocator
def test_host_allocator_is_set_up_by_the_numpy_backend():
    import platform

    from loomx.backends import get_backend
    from loomx.backends.allocator import host_allocator_state

    get_backend("numpy")
    state = host_allocator_state()
    assert state["tuned"] in (True, False) and state["reason"]
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        import os

        if not any(v in os.environ for v in ("LOOMX_HOST_ALLOCATOR", "MALLOC_MMAP_THRESHOLD_",
                                             "MALLOC_TRIM_THRESHOLD_")):
            assert state["tuned"] is True and "mmap threshold 32 MiB" in state["reason"]


@pytest.mark.parametrize("env, reason", [
    ({"LOOMX_HOST_ALLOCATOR": "default"}, "LOOMX_HOST_ALLOCATOR=default"),
    ({"LOOMX_HOST_ALLOCATOR": "off"}, "LOOMX_HOST_ALLOCATOR=off"),
    ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, "set by the user (MALLOC_TRIM_THRESHOLD_)"),
    ({"MALLOC_MMAP_THRESHOLD_": "1000000"}, "set by the user (MALLOC_MMAP_THRESHOLD_)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
     "set by the user (GLIBC_TUNABLES malloc.mmap_threshold)"),
])
def test_host_allocator_left_alone_when_asked(monkeypatch, env, reason):
    from loomx.backends import allocator

    for k in ("LOOMX_HOST_ALLOCATOR", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
              "GLIBC_TUNABLES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert allocator._decide() == {"tuned": False, "reason": reason}


def test_host_allocator_left_alone_under_another_allocator(monkeypatch):
    import platform

    from loomx.backends import allocator

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the preload check runs on glibc only")
    for k in ("LOOMX_HOST_ALLOCATOR", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
              "GLIBC_TUNABLES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert allocator._decide() == {"tuned": False,
                                   "reason": "jemalloc is preloaded (LD_PRELOAD)"}


def test_host_allocator_unknown_setting_warns(monkeypatch):
    from loomx.backends import allocator

    monkeypatch.setenv("LOOMX_HOST_ALLOCATOR", "fast")
    with pytest.warns(UserWarning, match="'fast' is not 'tuned' or 'default'"):
        state = allocator._decide()
    assert state["tuned"] is False


def test_loomx_info_reports_the_host_allocator():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LOOMX_BACKEND"}
    env["LOOMX_HOST_ALLOCATOR"] = "default"
    out = subprocess.run([sys.executable, "-m", "loomx", "info"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "host allocator: left alone (LOOMX_HOST_ALLOCATOR=default" in out.stdout
