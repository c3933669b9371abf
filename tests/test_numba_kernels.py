"""The numpy backend's compiled kernels (numba): bit-equal to the reference, fall back outside
their case, lazily imported, switched off by ``LOOMX_NUMBA=0``.

``test_kernels.py`` already runs every registered kernel against the reference within
tolerances on the numpy backend; here the compiled ones are held to exact equality, on the
shapes and values (NaN, ±0, ±inf) where a different order of operations would show.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import array_api_compat.numpy as xp
import numpy as np
import pytest

pytest.importorskip("numba")

from loomx.backends import numba_kernels  # noqa: E402
from loomx.backends.numpy_backend import SCRATCH, _im2col, make_numpy_backend  # noqa: E402
from loomx.backends.window_matmul import make_window_matmul  # noqa: E402

from loomx.layers import Conv1D, Conv2D  # noqa: E402
from loomx.layers._windows import scatter_windows_reference  # noqa: E402
from loomx.layers.activations import ACTIVATIONS  # noqa: E402
from loomx.layers.ffn import silu_gate_backward, silu_gate_forward  # noqa: E402
from loomx.layers.recurrent import (  # noqa: E402
    gru_cell_backward,
    gru_cell_forward,
    lstm_cell_backward,
    lstm_cell_forward,
)

RELU_FAMILY = ("relu", "scaled_relu", "leaky_relu", "loom_leaky_relu")


@pytest.fixture(scope="module")
def backends():
    """``(compiled, plain)``: the numpy backend with the numba kernels and without them."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LOOMX_NUMBA", "0")
    plain = make_numpy_backend()
    mp.setenv("LOOMX_NUMBA", "1")
    compiled = make_numpy_backend()
    mp.undo()
    return compiled, plain


def _rand(shape, dtype, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _specials(a):
    """``a`` with NaN, ±0 and ±inf in its first elements (where it has room)."""
    flat = a.reshape(-1)
    for k, v in enumerate((np.nan, 0.0, -0.0, np.inf, -np.inf)[:flat.size]):
        flat[k] = v
    return a


def _equal(got, want):
    np.testing.assert_array_equal(got, want)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_registered_when_numba_is_installed_and_not_with_loomx_numba_0(backends):
    compiled, plain = backends
    assert compiled.kernel("lstm_cell_forward") is numba_kernels.lstm_cell_forward
    assert compiled.kernel("lstm_cell_backward") is numba_kernels.lstm_cell_backward
    assert plain.kernel("lstm_cell_forward") is None
    assert compiled.kernel("sgd_update") is numba_kernels.sgd_update
    assert plain.kernel("act_backward:relu") is None and plain.kernel("sgd_update") is None
    for name in ("bias_act_inplace:relu", "act_backward_inplace:scaled_relu",
                 "window_scatter_add"):
        assert compiled.kernel(name) is not plain.kernel(name)
        assert "numba_kernels" in compiled.kernel(name).__module__
        assert "numba_kernels" not in plain.kernel(name).__module__


def _forward_both_ways(kernel, reference, gates, batch, hidden, dtype, seed):
    """A recurrent cell's forward through ``kernel`` and ``reference`` from the same inputs
    (pre-activations ``[B, gates·H]``, a state ``[B, H]``), checked equal; returns
    ``(got, want, inputs)``."""
    inputs = (_rand((batch, gates * hidden), dtype, seed) * 2,
              _rand((batch, gates * hidden), dtype, seed + 1) * 2,
              _rand((batch, hidden), dtype, seed + 2))
    got, want = kernel(*inputs), reference(xp, *inputs)
    for a, b in zip(got, want, strict=True):
        _equal(a, b)
    return got, want, inputs


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch, hidden", [(1, 1), (3, 5), (64, 128), (5, 33)])
def test_lstm_cell_equals_the_reference_to_the_bit(dtype, batch, hidden):
    _, want, (_, _, c_prev) = _forward_both_ways(
        numba_kernels.lstm_cell_forward, lstm_cell_forward, 4, batch, hidden, dtype, 1)
    i, f, g, o, _, tc, _ = want
    dh = _rand((batch, hidden), dtype, 4)
    for dc_next in (None, _rand((batch, hidden), dtype, 5)):
        for t in range(2):
            dpx, ref = np.full((2, batch, 4 * hidden), 7, dtype), np.full((2, batch, 4 * hidden), 7,
                                                                          dtype)
            dc = numba_kernels.lstm_cell_backward(i, f, g, o, c_prev, tc, dh, dc_next, dpx, t)
            want_dc = lstm_cell_backward(xp, i, f, g, o, c_prev, tc, dh, dc_next, ref, t)
            _equal(dc, want_dc)
            _equal(dpx, ref)  # the other step's rows untouched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch, hidden", [(1, 1), (3, 5), (64, 128), (5, 33)])
def test_gru_cell_equals_the_reference_to_the_bit(dtype, batch, hidden):
    got, want, (xw, hw, h_prev) = _forward_both_ways(
        numba_kernels.gru_cell_forward, gru_cell_forward, 3, batch, hidden, dtype, 21)
    dh = _rand((batch, hidden), dtype, 24)
    for t in range(2):
        bufs = [np.full((2, batch, 3 * hidden), 7, dtype) for _ in range(4)]
        _equal(numba_kernels.gru_cell_backward(*got[:4], h_prev, dh, *bufs[:2], t),
               gru_cell_backward(xp, *want[:4], h_prev, dh, *bufs[2:], t))
        _equal(bufs[0], bufs[2])
        _equal(bufs[1], bufs[3])
    # outside the compiled case: mixed dtypes, a strided buffer
    mixed = (xw, hw, h_prev.astype(np.float16))
    for a, b in zip(numba_kernels.gru_cell_forward(*mixed), gru_cell_forward(xp, *mixed),
                    strict=True):
        _equal(a, b)
    strided = [np.zeros((batch, 2, 3 * hidden), dtype).transpose(1, 0, 2) for _ in range(2)]
    refs = [np.zeros((2, batch, 3 * hidden), dtype) for _ in range(2)]
    _equal(numba_kernels.gru_cell_backward(*want[:4], h_prev, dh, *strided, 1),
           gru_cell_backward(xp, *want[:4], h_prev, dh, *refs, 1))
    _equal(np.ascontiguousarray(strided[0]), refs[0])


def test_lstm_cell_outside_the_compiled_case_takes_the_reference_path():
    h = 4
    xw, hw = _rand((3, 4 * h), np.float32, 1), _rand((3, 4 * h), np.float32, 2)
    cases = [(xw, hw, _rand((3, h), np.float64, 3)),  # mixed dtypes promote
             (xw.astype(np.float16), hw.astype(np.float16), _rand((3, h), np.float16, 3)),
             (np.asfortranarray(xw), hw[:, ::-1], np.asfortranarray(_rand((3, h), np.float32, 3)))]
    for args in cases:
        for a, b in zip(numba_kernels.lstm_cell_forward(*args), lstm_cell_forward(xp, *args),
                        strict=True):
            _equal(a, b)
    i, f, g, o, c, tc, _ = lstm_cell_forward(xp, *cases[0][:2], cases[0][2].astype(np.float32))
    dh = _rand((3, h), np.float32, 4)
    strided = np.zeros((3, 2, 4 * h), np.float32).transpose(1, 0, 2)  # not C-contiguous
    ref = np.zeros((2, 3, 4 * h), np.float32)
    for dpx, dc_next in ((strided, None), (np.zeros((2, 3, 4 * h), np.float32),
                                           _rand((3, h), np.float64, 5))):
        ref = np.zeros(dpx.shape, dpx.dtype)
        dc = numba_kernels.lstm_cell_backward(i, f, g, o, c, tc, dh, dc_next, dpx, 1)
        _equal(dc, lstm_cell_backward(xp, i, f, g, o, c, tc, dh, dc_next, ref, 1))
        _equal(np.asarray(dpx), ref)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf · 0
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 32), (7, 3), (3, 600), (4, 5, 6), (2, 1), (1,)])
@pytest.mark.parametrize("name", RELU_FAMILY)
def test_bias_relu_and_its_gradient_equal_the_reference_to_the_bit(backends, name, shape,
                                                                  dtype):
    compiled, plain = backends
    act = ACTIVATIONS[name]
    x = _specials(_rand(shape, dtype, 6))
    for bias in (None, _rand(shape[-1:], dtype, 7)):
        z = x if bias is None else x + bias
        want = act.forward(plain, z)
        owned = np.array(x, copy=True)
        got_z, got_y = compiled.kernel(f"bias_act_inplace:{name}")(owned, bias)
        assert got_z is owned and got_y is owned
        _equal(owned, want)
    dy = _specials(_rand(shape, dtype, 8)[..., ::-1].copy())
    want = act.backward(plain, x, act.forward(plain, x), dy)
    kept = np.array(dy, copy=True)
    _equal(compiled.kernel(f"act_backward:{name}")(x, None, dy), want)
    _equal(dy, kept)  # a new array; dy untouched
    backward = compiled.kernel(f"act_backward_inplace:{name}")
    if backward is not None:  # the leaky ones have no in-place gradient kernel
        _equal(backward(x, None, np.array(dy, copy=True)), want)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf · 0
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 688), (2, 3, 5)])
def test_silu_gate_equals_the_reference_to_the_bit(dtype, shape):
    g, u = _specials(_rand(shape, dtype, 31) * 4), _rand(shape, dtype, 32)
    s, h = numba_kernels.silu_gate_forward(g, u)
    want_s, want_h = silu_gate_forward(xp, g, u)
    _equal(s, want_s)
    _equal(h, want_h)
    dh = _rand(shape, dtype, 33)
    for a, b in zip(numba_kernels.silu_gate_backward(g, u, want_s, dh),
                    silu_gate_backward(xp, g, u, want_s, dh), strict=True):
        _equal(a, b)
    # outside the compiled case: mixed dtypes, a strided input
    for args in ((g, u.astype(np.float16)), (g.T, u.T)):
        for a, b in zip(numba_kernels.silu_gate_forward(*args), silu_gate_forward(xp, *args),
                        strict=True):
            _equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sgd_update_in_place_equals_the_reference_to_the_bit(dtype, weight_decay):
    w, g = _rand((7, 5), dtype, 11), _specials(_rand((7, 5), dtype, 12))
    want = w - 0.03 * (g + weight_decay * w if weight_decay else g)
    got = numba_kernels.sgd_update(w, g, lr=0.03, weight_decay=weight_decay)
    assert got is w  # in place
    _equal(got, want)
    frozen = _rand((7, 5), dtype, 11)
    frozen.flags.writeable = False  # as a memory-mapped checkpoint gives it
    got = numba_kernels.sgd_update(frozen, g, lr=0.03, weight_decay=weight_decay)
    assert got is not frozen and got.flags.writeable
    _equal(got, want)
    _equal(numba_kernels.sgd_update(_rand((7, 5), dtype, 11), g.T.copy().T, lr=0.03,
                                    weight_decay=weight_decay), want)  # strided: reference


@pytest.mark.parametrize("kernel, stride, dilation", [
    ((3, 3), (2, 2), (1, 1)), ((3, 3), (1, 1), (1, 1)), ((2, 3), (1, 2), (2, 1)),
    ((3,), (2,), (1,)), ((4,), (1,), (2,)),
])
@pytest.mark.parametrize("channels", [1, 8, 32])
def test_window_scatter_add_equals_the_reference_to_the_bit(backends, kernel, stride, dilation,
                                                           channels):
    compiled, plain = backends
    out_shape = (4,) * len(kernel)
    spatial = tuple((o - 1) * s + (k - 1) * d + 2
                    for o, k, s, d in zip(out_shape, kernel, stride, dilation))
    cols = _rand((3, *out_shape, int(np.prod(kernel)), channels), np.float32, 9)
    base = _rand((3, *spatial, channels), np.float32, 10)
    want = scatter_windows_reference(plain, np.array(base, copy=True), cols, kernel, stride,
                                     dilation)
    got = compiled.kernel("window_scatter_add")(np.array(base, copy=True), cols, kernel, stride,
                                                dilation)
    _equal(got, want)


def test_numba_is_imported_at_the_first_kernel_call_not_with_loomx():
    code = ("import sys, numpy as np, loomx\n"
            "from loomx.layers import LSTM\n"
            "b = loomx.get_backend('numpy')\n"
            "assert 'numba' not in sys.modules, 'imported with the backend'\n"
            "layer = LSTM(4)\n"
            "layer.build((3, 2), backend=b, rng=0)\n"
            "layer(np.ones((2, 3, 2), np.float32))\n"
            "assert 'numba' in sys.modules, 'not used by the LSTM'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_numba_that_fails_to_import_warns_once_and_leaves_the_reference_path(monkeypatch):
    import loomx.backends

    numba_kernels._loops.cache_clear()
    monkeypatch.setitem(sys.modules, "loomx.backends._numba_loops", None)  # import fails
    monkeypatch.delattr(loomx.backends, "_numba_loops", raising=False)
    try:
        args = (_rand((2, 8), np.float32, 1), _rand((2, 8), np.float32, 2),
                _rand((2, 2), np.float32, 3))
        with pytest.warns(RuntimeWarning, match="numba is installed but could not be imported"):
            got = numba_kernels.lstm_cell_forward(*args)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            numba_kernels.lstm_cell_forward(*args)  # once only
        for a, b in zip(got, lstm_cell_forward(xp, *args), strict=True):
            _equal(a, b)
    finally:
        monkeypatch.undo()
        numba_kernels._loops.cache_clear()


@pytest.mark.parametrize("setting, line", [
    ("1", "compiled CPU kernels: on (numba; LOOMX_NUMBA=0 turns them off)"),
    ("0", "compiled CPU kernels: off (LOOMX_NUMBA=0)")])
def test_info_says_whether_the_compiled_kernels_are_on(setting, line):
    import os

    env = {**os.environ, "LOOMX_NUMBA": setting}
    out = subprocess.run([sys.executable, "-m", "loomx", "info"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert line in out.stdout.splitlines()


def test_benchmark_report_names_the_numba_state():
    from benchmarks.report import _numba_line

    assert _numba_line({}) == []
    assert _numba_line({"numba": "0.68.1", "numba_kernels": True}) == [
        "- numba 0.68.1: loomx's compiled CPU kernels on (backends/numba_kernels.py)"]
    assert "off (LOOMX_NUMBA=0)" in _numba_line({"numba": "0.68.1", "numba_kernels": False})[0]
    assert _numba_line({"numba": "not installed", "numba_kernels": False})[0].startswith(
        "- numba not installed: loomx's compiled CPU kernels off (")


def _declined(*args) -> bool:
    return False


@pytest.mark.parametrize("kernel, stride, dilation, pads", [
    ((3, 3), (2, 2), (1, 1), ((1, 1), (1, 1))), ((3, 3), (1, 1), (1, 1), ((0, 0), (0, 0))),
    ((2, 3), (1, 2), (2, 1), ((1, 0), (2, 2))), ((3,), (2,), (1,), ((1, 1),)),
    ((2, 2, 2), (1, 1, 1), (1, 1, 1), ((1, 1),) * 3),
])
@pytest.mark.parametrize("channels", [1, 8, 32])
def test_window_matmul_with_compiled_windows_equals_numpy_windows_to_the_bit(
        backends, kernel, stride, dilation, pads, channels):
    """The compiled loops fold the padding into the gather and the scatter; numpy's path pads
    each chunk into a buffer: the same copies and the same additions in the same order. (The
    kernels are registered with numba only: numpy's path was slower on 2 BLAS threads.)"""
    compiled, plain = backends
    assert plain.kernel("window_matmul") is None
    # numpy's gather and scatter on the same chunks (compiled loops declined)
    numpy_windows = make_window_matmul(_im2col, plain.kernel("window_scatter_add"), SCRATCH,
                                       numba_kernels.windows_compiled, _declined, _declined)
    spatial = (7,) * len(kernel)
    out = tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
                for n, (lo, hi), k, s, d in zip(spatial, pads, kernel, stride, dilation))
    width = int(np.prod(kernel)) * channels
    first = _rand((5, channels, *spatial), np.float32, 12)
    x = np.moveaxis(first, 1, -1)  # channels-last view, as convolutions pass it
    w = _rand((6, width), np.float32, 13)
    dz = _rand((5 * int(np.prod(out)), 6), np.float32, 14)
    args = (kernel, stride, dilation, pads, out)
    _equal(compiled.kernel("window_matmul")(x, w, *args),
           numpy_windows["window_matmul"](x, w, *args))
    for got, want in zip(compiled.kernel("window_matmul_backward")(x, dz, w, *args, True),
                         numpy_windows["window_matmul_backward"](x, dz, w, *args, True)):
        _equal(got, want)


@pytest.mark.parametrize("channels, kernel, chunked", [
    (32, (3, 3), True), (8, (3,), True), (3, (3, 3), False), (8, (2, 2, 2), False),
])
def test_window_matmul_chunks_only_windows_the_compiled_loops_take(backends, monkeypatch,
                                                                   channels, kernel, chunked):
    """Windows the compiled loops take go a few images at a time; others (fewer than 8
    channels, 3 spatial axes) in one chunk of the whole batch."""
    from loomx.backends import window_matmul

    compiled, _ = backends
    monkeypatch.setattr(window_matmul, "CHUNK_BYTES", 1)  # one image per chunk where chunked
    x = _rand((4, *(6,) * len(kernel), channels), np.float32, 15)
    width = int(np.prod(kernel)) * channels
    out = tuple(6 - k + 1 for k in kernel)
    seen = []
    compiled.kernel("window_matmul")(x, _rand((5, width), np.float32, 16), kernel,
                                     (1,) * len(kernel), (1,) * len(kernel),
                                     ((0, 0),) * len(kernel), out,
                                     epilogue=lambda z: seen.append(z.shape[0]))
    assert len(seen) == (4 if chunked else 1)


CHUNKED_LAYERS = [  # (layer, per-sample input shape, dtype)
    (lambda: Conv2D(8, 3, stride=2, padding=1, activation="relu"), (16, 9, 9), "float32"),
    (lambda: Conv2D(6, (2, 3), stride=(3, 1), padding=(1, 2), dilation=(1, 2),
                    activation="sigmoid"), (8, 7, 9), "float32"),
    (lambda: Conv2D(16, 1, stride=2, activation="leaky_relu"), (8, 6, 6), "float64"),  # tall
    (lambda: Conv1D(4, 5, dilation=2, padding=3, activation="scaled_relu"), (8, 20), "float64"),
]


def _layer_both_ways(compiled, make, shape, dtype, images_per_chunk, monkeypatch):
    """Forward, two backward calls (gradients accumulate; the second without the input
    gradient) of a layer in chunks of ``images_per_chunk`` images and on the reference path,
    with a random bias and a read-only input of 5 images (as from a memory-mapped dataset)."""
    from loomx.backends import get_backend, window_matmul

    compiled = get_backend(compiled, dtype=dtype)
    results = []
    for backend in (compiled, compiled.without_kernels()):
        layer = make()
        layer.build(shape, backend, rng=3)
        layer.params["bias"] = _rand((layer.out_channels,), dtype, 19)
        per_image = (math.prod(layer._out_spatial) * math.prod(layer._k) * shape[0]
                     * np.dtype(dtype).itemsize)
        monkeypatch.setattr(window_matmul, "CHUNK_BYTES", images_per_chunk * per_image)
        x = _rand((5, *shape), dtype, 17)
        x.flags.writeable = False
        y, ctx = layer.forward(x, True)
        dy = _rand(tuple(y.shape), dtype, 18)
        dx = layer.backward(dy, ctx)
        assert layer.backward(dy, ctx, need_input_grad=False) is None
        results.append([y, dx, *(p.grad for p in layer.parameters())])
    return results


@pytest.mark.parametrize("images_per_chunk", [1, 2])  # 2: chunks of 2, 2 and 1 images
@pytest.mark.parametrize("make, shape, dtype", CHUNKED_LAYERS)
def test_conv_layer_in_chunks_equals_the_whole_batch_reference(backends, monkeypatch, make,
                                                               shape, dtype, images_per_chunk):
    """Strides larger than the kernel, asymmetric padding with dilation, a 1×1 kernel whose
    weight gradient takes the tall product order, float64, activations whose gradient needs
    ``y`` (sigmoid): the chunked layer gives the reference's outputs and gradients."""
    tol = 1e-5 if dtype == "float32" else 1e-12
    for got, want in zip(*_layer_both_ways(backends[0], make, shape, dtype, images_per_chunk,
                                           monkeypatch)):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        assert got.dtype == want.dtype and got.shape == want.shape


def test_chunked_conv_backward_refuses_a_gradient_of_another_batch(backends):
    """As the reference's matrix product does, instead of reading only the first images: the
    layer refuses it, and so does the kernel when called directly."""
    layer = Conv2D(4, 3, padding=1)
    layer.build((8, 5, 5), backends[0], rng=0)
    y, ctx = layer.forward(_rand((1, 8, 5, 5), np.float32, 20), True)
    with pytest.raises(ValueError, match=r"expected dy of shape \[1, 4, 5, 5\]"):
        layer.backward(_rand((4, 4, 5, 5), np.float32, 21), ctx)
    kernel = backends[0].kernel("window_matmul_backward")
    x = _rand((1, 5, 5, 8), np.float32, 22)
    w = _rand((4, 72), np.float32, 23)
    with pytest.raises(ValueError, match="dz has shape"):
        kernel(x, _rand((100, 4), np.float32, 24), w, (3, 3), (1, 1), (1, 1),
               ((1, 1), (1, 1)), (5, 5))


def test_chunked_conv_backward_after_the_kernels_went_away(backends):
    """A forward through the chunked kernels, then a backward on a backend without them (the
    network moved between the calls), still gives the reference's gradients."""
    compiled, _ = backends
    x, dy = _rand((3, 8, 6, 6), np.float32, 22), _rand((3, 4, 3, 3), np.float32, 23)
    grads = []
    for swap in (True, False):
        layer = Conv2D(4, 3, stride=2, padding=1, activation="relu")
        layer.build((8, 6, 6), compiled, rng=0)
        y, ctx = layer.forward(x, True)
        if swap:
            layer.backend = compiled.without_kernels()
        grads.append([layer.backward(dy, ctx), *(p.grad for p in layer.parameters())])
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel, stride, padding, shape", [
    (3, 2, 0, (8, 9, 9)), (2, 2, 0, (16, 6, 7)), ((3, 2), (1, 2), (1, 1), (8, 5, 6)),
    (3, 2, 1, (8, 11)),
])
def test_pool_kernels_equal_the_reference_to_the_bit(backends, kind, dtype, kernel, stride,
                                                     padding, shape):
    """Maxima with NaN, ±0 and ±inf among the values (numpy's ``maximum``: NaN propagates, of
    equal values the second), ties to the first maximum, means in numpy's order of additions,
    padding, and finite gradients added in the reference's order. (Where windows tile without
    overlap the reference's gradient holds ``dy·0``, −0 for a negative ``dy``, outside the
    maxima, or its shares without an addition; the kernels' hold +0 there.)"""
    from loomx.layers import AvgPool1D, AvgPool2D, MaxPool1D, MaxPool2D

    compiled, plain = backends
    classes = {"max": (MaxPool1D, MaxPool2D), "avg": (AvgPool1D, AvgPool2D)}[kind]
    cls = classes[len(shape) - 2]
    x = np.random.default_rng(24).integers(-2, 3, (3, *shape)).astype(dtype)
    if kind == "max":  # the mean of any window with NaN or ±inf is NaN or ±inf alike
        x.reshape(-1)[[0, 7, 40, 41, 90, 200]] = [np.nan, -0.0, np.inf, -np.inf, -0.0, np.nan]
    else:
        x = x + np.random.default_rng(28).standard_normal(x.shape).astype(dtype)
    results = []
    for backend in (compiled, plain):
        layer = cls(kernel, stride=stride, padding=padding)
        layer.build(shape, backend.with_dtype(np.dtype(dtype).name), rng=0)
        y, ctx = layer.forward(x, True)
        dy = _rand(tuple(y.shape), dtype, 25)
        results.append((y, layer.backward(dy, ctx)))
    (y, dx), (y_ref, dx_ref) = results
    _equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)  # -0 == +0
    assert dx.dtype == dx_ref.dtype and dx.shape == dx_ref.shape


def test_max_pool_kernel_takes_a_window_of_minus_infinity_like_the_reference(backends):
    """Every real value -inf: the first -inf of the window takes the gradient, in the padding
    too (where it is dropped), as on the reference path."""
    from loomx.layers import MaxPool2D

    compiled, plain = backends
    x = np.full((1, 8, 3, 3), -np.inf, np.float32)
    x[0, :, 2, 2] = 1.0
    results = []
    for backend in (compiled, plain):
        layer = MaxPool2D(3, stride=2, padding=1)
        layer.build((8, 3, 3), backend, rng=0)
        y, ctx = layer.forward(x, True)
        results.append((y, layer.backward(np.ones(y.shape, np.float32), ctx)))
    for got, want in zip(*results):
        _equal(got, want)


@pytest.mark.parametrize("kind", ["MaxPool2D", "AvgPool2D"])
def test_pool_backward_follows_its_forward_when_the_backend_changes(backends, kind):
    """The forward's context carries the backward kernel, so a network moved to a backend
    without kernels between the calls still finishes the step it began."""
    import loomx.layers

    compiled, plain = backends
    x = _rand((2, 8, 7, 7), np.float32, 26)
    grads = []
    for swap in (True, False):
        layer = getattr(loomx.layers, kind)(3, stride=2)
        layer.build((8, 7, 7), compiled if swap else plain, rng=0)
        y, ctx = layer.forward(x, True)
        if swap:
            layer.backend = plain
        grads.append(layer.backward(_rand(tuple(y.shape), np.float32, 27), ctx))
    np.testing.assert_allclose(*grads, rtol=1e-6, atol=1e-7)
