"""The harness itself: the strict fixtures must catch device and sync mistakes."""

from __future__ import annotations

import numpy as np
import pytest
from loomx.backends import get_backend

from tests.conftest import assert_close, no_sync_guard


def _layer_like_without_device(backend, x):
    """A deliberately wrong 'layer': creates an array without ``device=``."""
    return x + backend.xp.zeros(x.shape, dtype=x.dtype)


def _layer_like_with_sync(backend, x):
    """A deliberately wrong 'layer': branches on a device value (a hidden sync)."""
    if float(backend.xp.max(x)) > 0:
        return x
    return -x


def test_strict_catches_missing_device():
    b = get_backend("strict")
    x = b.from_host(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError):
        _layer_like_without_device(b, x)


def test_strict_guard_catches_hidden_sync():
    b = get_backend("strict")
    x = b.from_host(np.ones((2, 3), np.float32))
    _layer_like_with_sync(b, x)  # allowed without the guard
    with no_sync_guard(), pytest.raises(RuntimeError, match="hidden device"):
        _layer_like_with_sync(b, x)


def test_strict_nosync_forbids_boolean_indexing():
    b = get_backend("strict")
    x = b.from_host(np.arange(4, dtype=np.float32))
    with no_sync_guard(), pytest.raises(RuntimeError, match="boolean_indexing"):
        x[x > 1]


def test_fixture_backends_round_trip(backend):
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    x = backend.from_host(host)
    assert_close(x, host, backend)
    assert backend.to_host(x).dtype == np.float32


def test_assert_close_checks_dtype(backend):
    x = backend.from_host(np.zeros(3), dtype=backend.xp.float64)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(x, np.zeros(3), backend)


def test_random_source_same_on_every_backend(backend):
    a = backend.to_host(backend.random(7).normal((4, 5)))
    b = get_backend("numpy").to_host(get_backend("numpy").random(7).normal((4, 5)))
    np.testing.assert_array_equal(a, b)


def test_scatter_add_duplicates_add(backend):
    xp = backend.xp
    target = backend.zeros((3, 2))
    idx = backend.from_host(np.array([0, 0, 2]), dtype=xp.int64)
    vals = backend.ones((3, 2))
    out = backend.scatter_add(target, idx, vals)
    assert_close(out, np.array([[2, 2], [0, 0], [1, 1]], np.float32), backend)


def test_erf_matches_math(backend64):
    import math

    xs = np.linspace(-4, 4, 41)
    got = backend64.erf(backend64.from_host(xs))
    assert_close(got, np.array([math.erf(v) for v in xs]), backend64, rtol=2e-7, atol=2e-7)


def test_jumped_streams_are_independent_and_leave_the_source_alone(backend):
    src = backend.random(11)
    state = src.get_state()
    a = backend.to_host(src.jumped(1).normal((64,)))
    b = backend.to_host(src.jumped(2).normal((64,)))
    assert src.get_state() == state  # jumping does not advance the source
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, backend.to_host(src.jumped(1).normal((64,))))
