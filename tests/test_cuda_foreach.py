"""The CuPy backend's multi-tensor SGD (``backends/cuda_foreach.py``), without a GPU.

The CUDA source runs in the CPU emulation of ``tests/cuda_emulation.py`` through the same host
code the CuPy backend uses, on numpy arrays; the emulation compiles with the host's C++
compiler (no contraction into fused multiply-adds on x86-64), so the results must equal the
reference's arithmetic to the bit. ``nvcc``, where installed, compiles it for a real GPU.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from loomx.backends.cuda_foreach import ADAM, SGD, AdamMany, SGDMany

from tests import cuda_emulation


def _reference(w, g, *, lr, weight_decay=0.0):
    """The optimizer's reference arithmetic, in place (the per-tensor fallback)."""
    step = g + weight_decay * w if weight_decay else g
    w[...] = w - lr * step
    return w


def _arrays(shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


@pytest.mark.parametrize("decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_launch_updates_every_tensor_like_the_reference(emulated, decay, dtype):
    calls = []

    def fallback(w, g, **kw):
        calls.append(w.shape)
        return _reference(w, g, **kw)

    many = SGDMany(emulated, fallback, threads=32, chunk=64)
    # sizes below, at and across the chunk boundary, and one element
    shapes = [(5, 7), (64,), (65,), (3, 50), (1,), (129,)]
    ws, gs = _arrays(shapes, dtype, 0), _arrays(shapes, dtype, 1)
    want = [_reference(w.copy(), g, lr=0.05, weight_decay=decay) for w, g in zip(ws, gs)]
    assert many(ws, gs, lr=0.05, weight_decay=decay) is None
    for w, expected in zip(ws, want):
        assert w.dtype == dtype
        np.testing.assert_array_equal(w, expected)
    assert calls == []


def _adam_like_the_kernel(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step,
                          decoupled):
    """The per-tensor Adam kernel's arithmetic in numpy, in the parameter's dtype, in place."""
    t = w.dtype.type
    l2 = t(0.0 if decoupled else weight_decay)
    decay = t(1.0 - lr * weight_decay if decoupled else 1.0)
    b1, b2 = t(beta1), t(beta2)
    gg = g + l2 * w
    w *= decay
    m[...] = b1 * m + (t(1) - b1) * gg
    v[...] = b2 * v + (t(1) - b2) * (gg * gg)
    bc2 = t(np.sqrt(1.0 - beta2 ** step))
    w -= t(lr / (1.0 - beta1 ** step)) * (m / (np.sqrt(v) / bc2 + t(eps)))
    return w


@pytest.mark.parametrize("decoupled,decay", [(False, 0.0), (False, 0.1), (True, 0.01)],
                         ids=["adam", "adam_l2", "adamw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_in_one_launch_equals_the_per_tensor_kernel(emulated, decoupled, decay, dtype):
    many = AdamMany(emulated, _adam_like_the_kernel, threads=32, chunk=64)
    shapes = [(5, 7), (64,), (65,), (1,), (3, 50)] + [(2,)] * ADAM.max_tensors  # two launches
    ws, gs = _arrays(shapes, dtype, 8), _arrays(shapes, dtype, 9)
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    copies = [[a.copy() for a in arrays] for arrays in (ws, ms, vs)]
    opts = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=decay,
                decoupled=decoupled)
    for step in (1, 2, 3):
        many(ws, gs, ms, vs, step=step, **opts)
        for w, g, m, v in zip(*copies[:1], gs, *copies[1:]):
            _adam_like_the_kernel(w, g, m, v, step=step, **opts)
    for got, want in zip((ws, ms, vs), copies):
        for a, b in zip(got, want):
            assert a.dtype == dtype
            np.testing.assert_array_equal(a, b)


def test_more_tensors_than_one_launch_takes(emulated):
    many = SGDMany(emulated, _reference, threads=32, chunk=64)
    shapes = [(i % 7 + 1, 3) for i in range(SGD.max_tensors * 2 + 3)]
    ws, gs = _arrays(shapes, np.float32, 2), _arrays(shapes, np.float32, 3)
    want = [_reference(w.copy(), g, lr=0.1) for w, g in zip(ws, gs)]
    many(ws, gs, lr=0.1)
    for w, expected in zip(ws, want):
        np.testing.assert_array_equal(w, expected)


def test_pairs_it_cannot_take_go_to_the_fallback(emulated):
    calls = []

    def fallback(w, g, **kw):
        calls.append((w.dtype, w.shape))
        return _reference(w, g, **kw)

    many = SGDMany(emulated, fallback, threads=32, chunk=64)
    ws = _arrays([(4, 6), (4, 6), (3,), (0,), (5,)], np.float32, 4)
    gs = _arrays([(6, 4), (4, 6), (3,), (0,), (5,)], np.float32, 5)
    gs[0] = gs[0].T                      # a strided gradient
    ws[2], gs[2] = ws[2].astype(np.float16), gs[2].astype(np.float16)  # half precision
    gs[4] = gs[4].astype(np.float64)     # a gradient of another dtype
    want = [_reference(w.copy(), g, lr=0.2) for w, g in zip(ws, gs)]
    many(ws, gs, lr=0.2)
    for w, expected in zip(ws, want):
        np.testing.assert_array_equal(w, expected)
    assert calls == [(np.float32, (4, 6)), (np.float16, (3,)), (np.float32, (0,)),
                     (np.float32, (5,))]


def test_an_array_given_twice_is_updated_twice_in_turn(emulated):
    """A weight two layers share: one launch must not update it from two blocks at once, so
    its second entry goes to the per-tensor update after the launch."""
    calls = []

    def fallback(w, g, **kw):
        calls.append(w.shape)
        return _reference(w, g, **kw)

    many = SGDMany(emulated, fallback, threads=32, chunk=64)
    shared, other = _arrays([(70,), (5,)], np.float32, 10)
    g1, g2, g3 = _arrays([(70,), (5,), (70,)], np.float32, 11)
    want_shared = _reference(_reference(shared.copy(), g1, lr=0.1), g3, lr=0.1)
    want_other = _reference(other.copy(), g2, lr=0.1)
    many([shared, other, shared], [g1, g2, g3], lr=0.1)
    np.testing.assert_array_equal(shared, want_shared)
    np.testing.assert_array_equal(other, want_other)
    assert calls == [(70,)]


def test_a_source_that_does_not_compile_falls_back():
    calls = []
    many = SGDMany(lambda code, name: None, lambda w, g, **kw: calls.append(w.shape))
    ws, gs = _arrays([(2,), (3,)], np.float32, 6), _arrays([(2,), (3,)], np.float32, 7)
    many(ws, gs, lr=0.1)
    assert calls == [(2,), (3,)]


def test_mismatched_lists_raise():
    many = SGDMany(lambda code, name: None, _reference)
    with pytest.raises(ValueError):
        many(_arrays([(2,)], np.float32, 0), [], lr=0.1)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("update", [SGD, ADAM], ids=["sgd", "adam"])
@pytest.mark.parametrize("dtype,most", [(np.float32, True), (np.float64, False)])
def test_kernels_compile_for_a_gpu(tmp_path, update, dtype, most):
    count = update.max_tensors if most else 1
    cuda_emulation.nvcc_compiles(update.code(dtype, count), str(tmp_path))
