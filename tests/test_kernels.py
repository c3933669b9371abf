"""Every fast kernel a backend registers, against the array-API reference path it replaces.

The kernel checks are keyed by kernel name; :func:`test_every_registered_kernel_matches_reference`
runs the check of every kernel the backend under test registers (numpy and torch here, the fused
CuPy kernels where a GPU is usable) and fails on a registered kernel that has no check. The
layer tests at the end run whole layers and optimizers with and without the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

from loomx.layers import (
    AvgPool1D,
    AvgPool2D,
    LayerNorm,
    MaxPool1D,
    MaxPool2D,
    RMSNorm,
    Softmax,
)
from loomx.layers._windows import (
    crop_spatial,
    gather_windows,
    gather_windows_reference,
    pad_spatial,
    scatter_windows,
    scatter_windows_reference,
)
from loomx.layers.activations import ACTIVATIONS
from loomx.layers.conv import Conv1D, Conv2D, Conv3D, ConvTranspose2D
from loomx.layers.dense import Activation, Dense
from loomx.layers.ffn import SwiGLU, silu_gate_backward, silu_gate_forward
from loomx.layers.recurrent import (
    GRU,
    LSTM,
    RNN,
    gru_cell_backward,
    gru_cell_forward,
    lstm_cell_backward,
    lstm_cell_forward,
)
from loomx.layers.softmax import log_softmax, log_softmax_vjp, softmax, softmax_vjp
from loomx.train.losses import cross_entropy_reference
from loomx.train.optim import SGD, Adam, AdamW
from tests.conftest import assert_close, cudnn_tolerance

FUSED_ACTIVATIONS = ("identity", "relu", "scaled_relu", "leaky_relu", "loom_leaky_relu",
                     "sigmoid", "tanh", "gelu", "gelu_tanh", "silu")


def reference_backend(backend):
    """The same backend without fast kernels: every caller takes its reference path."""
    return backend.without_kernels()


def _rand(backend, shape, seed, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    return backend.from_host(rng.standard_normal(shape) * scale + shift)


# ---------------------------------------------------------------------- kernel checks
def check_bias_act(backend, kernel, name):
    act = ACTIVATIONS[name.split(":", 1)[1]]
    x = _rand(backend, (3, 5, 7), 0, scale=2.0)
    bias = _rand(backend, (7,), 1)
    z, y = kernel(x, bias)
    ref_z = x + bias
    assert_close(z, backend.to_host(ref_z), backend)
    assert_close(y, backend.to_host(act.forward(backend, ref_z)), backend, rtol=1e-5,
                 atol=2e-6)
    z0, y0 = kernel(x, None)
    assert_close(z0, backend.to_host(x), backend)
    assert_close(y0, backend.to_host(act.forward(backend, x)), backend, rtol=1e-5, atol=2e-6)


def check_bias_act_inplace(backend, kernel, name):
    """The in-place variant overwrites its input with ``y`` and returns it as ``z`` too; the
    activation's backward must give the reference gradient from that ``z``."""
    act = ACTIVATIONS[name.split(":", 1)[1]]
    x = _rand(backend, (3, 5, 7), 6, scale=2.0)
    bias = _rand(backend, (7,), 7)
    dy = _rand(backend, (3, 5, 7), 8)
    ref_z = x + bias
    ref_y = act.forward(backend, ref_z)
    for b in (bias, None):
        owned = backend.xp.asarray(x, copy=True)
        z, y = kernel(owned, b)
        want_z = ref_z if b is not None else x
        want_y = ref_y if b is not None else act.forward(backend, x)
        assert_close(y, backend.to_host(want_y), backend, rtol=1e-6, atol=1e-7)
        assert_close(act.backward(backend, z, y, dy),
                     backend.to_host(act.backward(backend, want_z, want_y, dy)), backend)


def check_act_backward(backend, kernel, name):
    """Random points and the kink ``z = 0`` itself (where the ReLU family's one-sided
    derivative is the reference's, PyTorch's: the left one)."""
    act = ACTIVATIONS[name.split(":", 1)[1]]
    z = _rand(backend, (4, 9), 2, scale=2.0)
    z[0, :] = 0.0
    y = act.forward(backend, z)
    dy = _rand(backend, (4, 9), 3)
    expected = act.backward(backend, z, y, dy)
    assert_close(kernel(z, y, dy), backend.to_host(expected), backend, rtol=1e-5, atol=2e-6)


def check_act_backward_inplace(backend, kernel, name):
    """The in-place backward overwrites ``dy`` with exactly the reference gradient (zeros
    included: a negative ``dy`` where ``z ≤ 0`` gives ``-0.0`` in both)."""
    act = ACTIVATIONS[name.split(":", 1)[1]]
    xp = backend.xp
    z = _rand(backend, (4, 9, 6), 9, scale=2.0)
    z[0, 0, :] = 0.0  # the kink itself: derivative 0, as the reference
    y = act.forward(backend, z)
    dy = _rand(backend, (4, 9, 6), 10)
    expected = backend.to_host(act.backward(backend, z, y, dy))
    owned = xp.asarray(dy, copy=True)
    out = kernel(z, y, owned)
    got = backend.to_host(out)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(expected))
    np.testing.assert_array_equal(backend.to_host(owned), expected)  # written in place


def check_softmax(backend, kernel, name):
    xp = backend.xp
    x = _rand(backend, (2, 3, 37), 4, scale=3.0)
    ref = softmax(xp, x) if name == "softmax" else log_softmax(xp, x)
    assert_close(kernel(x), backend.to_host(ref), backend, rtol=1e-5, atol=1e-6)


def check_softmax_backward(backend, kernel, name):
    xp = backend.xp
    x = _rand(backend, (5, 300), 5, scale=2.0)
    g = _rand(backend, (5, 300), 6)
    if name == "softmax_backward":
        y = softmax(xp, x)
        ref = softmax_vjp(xp, y, g)
    else:
        y = log_softmax(xp, x)
        ref = log_softmax_vjp(xp, y, g)
    assert_close(kernel(y, g), backend.to_host(ref), backend, rtol=1e-5, atol=1e-6)


def _norm_pair(backend, cls, opts):
    """The same randomised norm layer built on ``backend`` and on its reference copy."""
    layers = []
    for b in (backend, reference_backend(backend)):
        layer = cls(**opts)
        layer.build((3, 40), b)
        for i, ref in enumerate(layer.parameters()):
            ref.value = _rand(b, tuple(ref.value.shape), 10 + i, scale=0.5, shift=1.0)
        layers.append(layer)
    return layers


def _check_norm_layer(backend, cls, opts):
    fast, slow = _norm_pair(backend, cls, opts)
    x = _rand(backend, (2, 3, 40), 7, scale=2.0, shift=0.5)
    dy = _rand(backend, (2, 3, 40), 8)
    results = []
    for layer in (fast, slow):
        layer.zero_grad()
        y, ctx = layer.forward(x, True)
        dx = layer.backward(dy, ctx)
        results.append((y, dx, {r.name: r.grad for r in layer.parameters()}))
    (y1, dx1, g1), (y2, dx2, g2) = results
    assert_close(y1, backend.to_host(y2), backend, rtol=1e-5, atol=1e-5)
    assert_close(dx1, backend.to_host(dx2), backend, rtol=1e-4, atol=1e-5)
    assert g1.keys() == g2.keys()
    for k in g1:
        assert_close(g1[k], backend.to_host(g2[k]), backend, rtol=1e-4, atol=1e-4)


def check_layer_norm(backend, kernel, name):
    for opts in (dict(), dict(bias=False), dict(affine=False), dict(eps=1e-3)):
        _check_norm_layer(backend, LayerNorm, opts)


def check_rms_norm(backend, kernel, name):
    for opts in (dict(), dict(unit_offset=True)):
        _check_norm_layer(backend, RMSNorm, opts)


def _grad_in_layout(b, shape, seed, transposed):
    """A random gradient of ``shape``; ``transposed`` lays 2-d ones out column-major (as a
    convolution's weight gradient can be), with the same values."""
    if not transposed or len(shape) != 2:
        return _rand(b, shape, seed)
    return b.xp.permute_dims(b.from_host(np.ascontiguousarray(
        np.random.default_rng(seed).standard_normal(shape).T)), (1, 0))


def _three_steps_both_ways(backend, make_opt, transposed, seed):
    """A ``Dense(6)`` stepped three times by ``make_opt(layer)`` on ``backend`` and on it without
    kernels, from the same gradients (in the layout ``transposed`` says); ``[(layer, opt)]``
    with kernels first."""
    results = []
    for b in (backend, reference_backend(backend)):
        layer = Dense(6)
        layer.build((5,), b, rng=0)
        opt = make_opt(layer)
        for step in range(3):
            layer.zero_grad()
            for i, ref in enumerate(layer.parameters()):
                ref.grad = _grad_in_layout(b, tuple(ref.value.shape), seed + 3 * i + step,
                                           transposed)
            opt.step()
        results.append((layer, opt))
    return results


def check_adam(backend, kernel, name):
    cases = [(Adam, {}, False), (Adam, {"weight_decay": 0.1}, False), (AdamW, {}, False),
             (Adam, {}, True), (AdamW, {"weight_decay": 0.1}, True)]
    for cls, opts, transposed in cases:
        (fast, fast_opt), (slow, slow_opt) = _three_steps_both_ways(
            backend, lambda layer, cls=cls, opts=opts: cls(layer, lr=0.01, **opts), transposed,
            20)
        for r1, r2 in zip(fast.parameters(), slow.parameters()):
            assert_close(r1.value, backend.to_host(r2.value), backend, rtol=1e-5, atol=1e-6)
            for key in ("exp_avg", "exp_avg_sq"):
                assert_close(fast_opt.state[r1.name][key],
                             backend.to_host(slow_opt.state[r2.name][key]), backend,
                             rtol=1e-5, atol=1e-7)


def check_sgd(backend, kernel, name):
    """Plain SGD (with and without weight decay), gradients in both layouts, three steps,
    against the same optimizer on the backend without kernels."""
    for opts, transposed in (({}, False), ({"weight_decay": 0.1}, False), ({}, True)):
        (fast, _), (slow, _) = _three_steps_both_ways(
            backend, lambda layer, opts=opts: SGD(layer, lr=0.05, **opts), transposed, 30)
        for r1, r2 in zip(fast.parameters(), slow.parameters()):
            assert_close(r1.value, backend.to_host(r2.value), backend, rtol=1e-6, atol=1e-7)


def check_sgd_many(backend, kernel, name):
    """The optimizer's step through the kernel (``check_sgd``), and the kernel alone on
    parameters of several shapes and sizes, one with a transposed (strided) gradient and
    one of another dtype than the rest, with and without weight decay."""
    check_sgd(backend, kernel, name)
    xp = backend.xp
    shapes = [(7, 5), (300,), (3, 4, 5), (1,), (64, 70)]
    for decay in (0.0, 0.1):
        ws = [_rand(backend, s, 80 + i) for i, s in enumerate(shapes)]
        ws.append(xp.astype(_rand(backend, (9, 3), 86), xp.float64))
        gs = [_rand(backend, s, 90 + i) for i, s in enumerate(shapes)]
        gs[0] = xp.permute_dims(_rand(backend, (5, 7), 89), (1, 0))
        gs.append(xp.astype(_rand(backend, (9, 3), 96), xp.float64))
        want = [backend.to_host(w) - 0.05 * (backend.to_host(g)
                                             + (decay * backend.to_host(w) if decay else 0))
                for w, g in zip(ws, gs)]
        assert kernel(ws, gs, lr=0.05, weight_decay=decay) is None
        for i, (w, expected) in enumerate(zip(ws, want)):
            assert_close(w, expected, backend, rtol=1e-6, atol=1e-7,
                         dtype=xp.float64 if i == len(shapes) else None)


def check_softmax_cross_entropy(backend, kernel, name):
    """Hard (one-hot) and soft targets, rows wider than a warp; mixed dtypes are declined
    (``None``: the caller takes the reference path)."""
    xp = backend.xp
    x = _rand(backend, (6, 45), 61, scale=3.0)
    hard = xp.astype(xp.reshape(xp.arange(6 * 45, device=backend.device) % 45, (6, 45))
                     == xp.reshape(xp.arange(6, device=backend.device) * 7, (6, 1)), x.dtype)
    soft = xp.abs(_rand(backend, (6, 45), 62))
    for t in (hard, soft / xp.sum(soft, axis=1, keepdims=True), soft):
        value, grad = kernel(x, t)
        ref_value, ref_grad = cross_entropy_reference(xp, x, t)
        assert value.shape == () and value.dtype == x.dtype and grad.dtype == x.dtype
        assert_close(value, backend.to_host(ref_value), backend, rtol=1e-5, atol=1e-6)
        assert_close(grad, backend.to_host(ref_grad), backend, rtol=1e-5, atol=1e-7)
    assert kernel(x, xp.astype(hard, xp.float64)) is None


def check_rope(backend, kernel, name):
    """Both styles, a partial rotation, the inverse (``-sin``) and a strided input, against
    the array-API reference; tables of another shape and mixed dtypes are declined."""
    from loomx.layers.rope import apply_rope_reference

    xp = backend.xp
    x = _rand(backend, (2, 3, 5, 8), 63)
    cos, sin = _rand(backend, (5, 4), 64), _rand(backend, (5, 4), 65)
    strided = xp.permute_dims(_rand(backend, (2, 5, 3, 8), 66), (0, 2, 1, 3))
    for style in ("half", "interleaved"):
        for rot, c, s, inp in ((8, cos, sin, x), (4, cos[:, :2], sin[:, :2], x),
                               (8, cos, -sin, strided)):
            out = kernel(inp, c, s, rot, style)
            ref = apply_rope_reference(xp, inp, c, s, rot, style)
            assert tuple(out.shape) == tuple(ref.shape) and out.dtype == ref.dtype
            assert_close(out, backend.to_host(ref), backend, rtol=1e-6, atol=1e-6)
    assert kernel(x, cos[:4], sin[:4], 8, "half") is None
    assert kernel(x, xp.astype(cos, xp.float64), xp.astype(sin, xp.float64), 8, "half") is None


def check_recurrent_sequence(backend, kernel, name):
    """RNN, LSTM and GRU through the whole-sequence kernels against the per-step reference:
    outputs, final state, input, parameter and initial-state gradients, with and without
    bias and initial state (a strided view), every step or the last; a second backward on
    the same context adds the same gradients again; a forward without ``train`` still allows
    backward; ``need_input_grad=False``."""
    xp = backend.xp
    for cls in (RNN, LSTM, GRU):
        for sequences, bias, given in ((True, True, True), (False, True, False),
                                       (True, False, False)):
            results = []
            for b in (backend, reference_backend(backend)):
                layer = cls(5, return_sequences=sequences, bias=bias)
                layer.build((4, 3), b, rng=0)
                h0 = xp.permute_dims(_rand(b, (5, 2), 71), (1, 0))  # a strided view
                state = ((_rand(b, (2, 5), 70), h0) if cls is LSTM else h0) if given else None
                x = _rand(b, (2, 4, 3), 72)
                y, ctx = layer.forward(x, True, initial_state=state)
                dy = _rand(b, tuple(y.shape), 73)
                dx = layer.backward(dy, ctx)
                first = [xp.asarray(r.grad, copy=True) for r in layer.parameters()]
                layer.backward(dy, ctx)  # gradients add up
                twice = [r.grad for r in layer.parameters()]
                _, eval_ctx = layer.forward(x, False, initial_state=state)
                layer.zero_grad()
                dx_eval = layer.backward(dy, eval_ctx)
                _, ctx_no_dx = layer.forward(x, True, initial_state=state)
                assert layer.backward(dy, ctx_no_dx, need_input_grad=False) is None

                def flat(v):
                    return list(v) if isinstance(v, tuple) else [v]

                results.append((y, dx, dx_eval, *flat(layer.initial_state_grad(ctx)),
                                *flat(layer.final_state(ctx)), *first, *twice,
                                *flat(layer.initial_state_grad(ctx_no_dx))))
            for got, want in zip(*results, strict=True):
                assert_close(got, backend.to_host(want), backend,
                             **cudnn_tolerance(backend, {"rtol": 1e-4, "atol": 1e-5}))


def check_linear(backend, kernel, name):
    """2-d and stacked inputs, with and without bias, against the reference ``linear``; mixed
    dtypes are declined; and a Dense layer through it against one without kernels."""
    from loomx.layers.dense import linear

    xp = backend.xp
    w, b = _rand(backend, (5, 7), 31), _rand(backend, (5,), 32)
    for shape in ((6, 7), (2, 3, 7), (0, 7)):
        x = _rand(backend, shape, 33)
        for bias in (b, None):
            want = linear(xp, x, w, bias)
            assert_close(kernel(x, w, bias), backend.to_host(want), backend, rtol=1e-5,
                         atol=1e-6)
    assert kernel(xp.astype(_rand(backend, (2, 7), 34), xp.float64), w, b) is None
    assert kernel(_rand(backend, (2, 7), 34), w, xp.astype(b, xp.float64)) is None
    outs = []
    for be in (backend, reference_backend(backend)):
        layer = Dense(5, activation="relu")
        layer.build((7,), be, rng=0)
        y, ctx = layer.forward(_rand(be, (4, 7), 35), True)
        outs.append((y, layer.backward(_rand(be, (4, 5), 36), ctx), layer.grads["bias"]))
    for fast, slow in zip(*outs):
        assert_close(fast, backend.to_host(slow), backend, rtol=1e-5, atol=1e-6)


def check_sum_rows(backend, kernel, name):
    a = _rand(backend, (513, 7), 30)
    assert_close(kernel(a), backend.to_host(backend.xp.sum(a, axis=0)), backend, rtol=1e-5,
                 atol=1e-4)


WINDOW_CASES = [  # kernel, stride, dilation, spatial
    ((3,), (1,), (1,), (11,)),
    ((3, 3), (1, 1), (1, 1), (7, 6)),
    ((3, 3), (2, 2), (1, 1), (9, 8)),
    ((2, 3), (2, 1), (2, 1), (9, 7)),
    ((2, 2, 2), (1, 2, 1), (1, 1, 2), (4, 5, 5)),
]


def check_window_gather(backend, kernel, name):
    xp = backend.xp
    backend = type(backend)(name=backend.name, xp=xp, device=backend.device,
                            float_dtype=backend.float_dtype, library=backend.library,
                            kernels={"window_gather": kernel})
    for k, s, d, spatial in WINDOW_CASES:
        x = _rand(backend, (2, *spatial, 3), 31)
        fast = gather_windows(backend, x, k, s, d)
        out = tuple(fast.shape[1:-2])
        assert_close(fast, backend.to_host(gather_windows_reference(xp, x, k, s, d, out)),
                     backend, rtol=0, atol=0)
        fewer = tuple(max(o - 1, 1) for o in out)
        assert_close(gather_windows(backend, x, k, s, d, fewer),
                     backend.to_host(gather_windows_reference(xp, x, k, s, d, fewer)),
                     backend, rtol=0, atol=0)


def check_im2col(backend, kernel, name):
    """Contiguous windows equal to the reference gather, for one and several channels, all
    windows or fewer, and a channels-last view of a channels-first array."""
    xp = backend.xp
    for k, s, d, spatial in WINDOW_CASES:
        for channels in (1, 3):
            x = _rand(backend, (2, *spatial, channels), 34)
            first = _rand(backend, (2, channels, *spatial), 35)
            view = xp.permute_dims(first, (0, *range(2, len(spatial) + 2), 1))
            out = tuple((n - dd * (kk - 1) - 1) // ss + 1
                        for n, kk, ss, dd in zip(spatial, k, s, d))
            for src in (x, view):
                for o in (out, tuple(max(m - 1, 1) for m in out)):
                    got = kernel(src, k, s, d, o)
                    assert tuple(got.shape) == (2, *o, math.prod(k), channels)
                    assert_close(got, backend.to_host(
                        gather_windows_reference(xp, src, k, s, d, o)), backend, rtol=0, atol=0)
    with pytest.raises(ValueError, match="beyond"):
        kernel(_rand(backend, (1, 5, 5, 2), 36), (3, 3), (1, 1), (1, 1), (4, 3))


def check_window_scatter_add(backend, kernel, name):
    xp = backend.xp
    for k, s, d, spatial in WINDOW_CASES:
        out = tuple((n - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, dd in zip(spatial, k, s, d))
        kk = math.prod(k)
        cols = _rand(backend, (2, *out, kk, 3), 32)
        expected = scatter_windows_reference(backend, backend.zeros((2, *spatial, 3)), cols,
                                             k, s, d)
        got = scatter_windows(backend, cols, spatial, k, s, d)
        assert_close(got, backend.to_host(expected), backend, rtol=1e-6, atol=1e-6)
        # offset-major windows seen through a permuted view (as convolutions pass them)
        major = _rand(backend, (kk, 2, *out, 3), 33)
        n = len(k)
        view = xp.permute_dims(major, tuple(range(1, n + 2)) + (0, n + 2))
        expected = scatter_windows_reference(backend, backend.zeros((2, *spatial, 3)), view,
                                             k, s, d)
        assert_close(scatter_windows(backend, view, spatial, k, s, d),
                     backend.to_host(expected), backend, rtol=1e-6, atol=1e-6)


@contextlib.contextmanager
def _chunks_of_one_image(kernel):
    """Make a chunked kernel (``CHUNK_BYTES`` in its module) take one image per chunk; kernels
    whose module declares ``CHUNKED = False`` (PyTorch's, through ATen's convolution) run as
    they are."""
    module = sys.modules.get(getattr(kernel, "__module__", ""), None)
    if getattr(module, "CHUNKED", True) is False:
        yield
        return
    saved = getattr(module, "CHUNK_BYTES", None)
    assert saved is not None, f"{kernel!r} has no CHUNK_BYTES in its module"
    module.CHUNK_BYTES = 1
    try:
        yield
    finally:
        module.CHUNK_BYTES = saved


def _window_matmul_cases(backend):
    """``(x [3, *S, C], w [4, K·C], dz [3·P, 4], kernel, stride, dilation, pads, out_shape,
    cols)`` over the window cases, without and with padding, for one, three and eight
    channels (the compiled loops' case), plus a channels-last view of channels-first data."""
    xp = backend.xp
    for i, (k, s, d, spatial) in enumerate(WINDOW_CASES):
        for pads in (((0, 0),) * len(k), tuple((1, j % 2) for j in range(len(k)))):
            padded = tuple(n + lo + hi for n, (lo, hi) in zip(spatial, pads))
            out = tuple((n - dd * (kk - 1) - 1) // ss + 1
                        for n, kk, ss, dd in zip(padded, k, s, d))
            for channels in (1, 3, 8):
                x = _rand(backend, (3, *spatial, channels), 90 + i)
                if channels == 8 and len(k) == 2:  # a channels-last view
                    first = _rand(backend, (3, channels, *spatial), 100 + i)
                    x = xp.permute_dims(first, (0, 2, 3, 1))
                width = math.prod(k) * channels
                w = _rand(backend, (4, width), 110 + i)
                dz = _rand(backend, (3 * math.prod(out), 4), 120 + i)
                xpad = pad_spatial(backend, x, pads)
                cols = xp.reshape(gather_windows_reference(xp, xpad, k, s, d, out), (-1, width))
                yield x, w, dz, k, s, d, pads, out, cols


def _rows_into(seen: list, chunk) -> None:
    """An epilogue that records each chunk's row count and doubles the rows in place."""
    seen.append(chunk.shape[0])
    chunk *= 2


def check_window_matmul(backend, kernel, name):
    xp = backend.xp
    for x, w, _, k, s, d, pads, out, cols in _window_matmul_cases(backend):
        expected = backend.to_host(xp.matmul(cols, xp.matrix_transpose(w)))
        for chunked in (False, True):
            with _chunks_of_one_image(kernel) if chunked else contextlib.nullcontext():
                assert_close(kernel(x, w, k, s, d, pads, out), expected, backend, rtol=1e-5,
                             atol=1e-5)
                seen: list[int] = []
                doubled = kernel(x, w, k, s, d, pads, out,
                                 epilogue=functools.partial(_rows_into, seen))
                assert sum(seen) == expected.shape[0] and len(seen) >= 1
                assert_close(doubled, 2 * expected, backend, rtol=1e-5, atol=1e-5)


def check_window_matmul_backward(backend, kernel, name):
    xp = backend.xp
    for x, w, dz, k, s, d, pads, out, cols in _window_matmul_cases(backend):
        dw_ref = backend.to_host(xp.matmul(xp.matrix_transpose(dz), cols))
        dcols = xp.reshape(xp.matmul(dz, w), (x.shape[0], *out, math.prod(k), x.shape[-1]))
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], pads))
        dx_ref = backend.to_host(crop_spatial(scatter_windows_reference(
            backend, backend.zeros((x.shape[0], *padded, x.shape[-1])), dcols, k, s, d), pads))
        for chunked in (False, True):
            with _chunks_of_one_image(kernel) if chunked else contextlib.nullcontext():
                dw, dx = kernel(x, dz, w, k, s, d, pads, out, True)
                assert_close(dw, dw_ref, backend, rtol=1e-5, atol=1e-5)
                assert_close(dx, dx_ref, backend, rtol=1e-5, atol=1e-5)
                dw, none = kernel(x, dz, w, k, s, d, pads, out, False)
                assert none is None
                assert_close(dw, dw_ref, backend, rtol=1e-5, atol=1e-5)
    # an empty batch: zero weight gradient, an empty input gradient
    x, w, dz, k, s, d, pads, out, _ = next(_window_matmul_cases(backend))
    dw, dx = kernel(x[:0], dz[:0], w, k, s, d, pads, out, True)
    assert_close(dw, np.zeros(tuple(w.shape), np.float32), backend)
    assert tuple(dx.shape) == (0, *x.shape[1:])


POOL_CASES = [  # layer class, arguments, per-sample input shape
    ((3,), {"stride": 2}, (8, 9, 9)),
    ((2,), {}, (8, 6, 7)),
    (((3, 2),), {"stride": (1, 2), "padding": (1, 1)}, (9, 5, 6)),
    ((3,), {"stride": 2, "padding": 1}, (8, 11)),
    ((3,), {"stride": 2}, (3, 9, 9)),  # few channels: the kernels decline
]


def check_pool(backend, kernel, name):
    """Max and average pooling with the backend's kernels against its reference path:
    maxima exactly, with ties (integer values) going to the first maximum; means; padding;
    channels-first input. Gradients to rounding: where windows overlap, a position's
    gradients may be added in another order (PyTorch's); the numba kernels' equality to the
    bit is checked in tests/test_numba_kernels.py."""
    reference = reference_backend(backend)
    kinds = {"max": (MaxPool1D, MaxPool2D), "avg": (AvgPool1D, AvgPool2D)}[name[:3]]
    tol = 0 if name.startswith("max") else 1e-6
    for args, kw, shape in POOL_CASES:
        x = np.random.default_rng(60).integers(-3, 4, (2, *shape)).astype(np.float32)
        results = []
        for b in (backend, reference):
            layer = kinds[len(shape) - 2](*args, **kw)
            layer.build(shape, b, rng=0)
            y, ctx = layer.forward(b.from_host(x), True)
            dy = _rand(b, tuple(y.shape), 61)
            results.append((y, layer.backward(dy, ctx)))
        (y, dx), (y_ref, dx_ref) = results
        assert_close(y, backend.to_host(y_ref), backend, rtol=tol, atol=tol)
        assert_close(dx, backend.to_host(dx_ref), backend, rtol=1e-6, atol=1e-6)


def _step_buffer(backend, steps, batch, width, strided):
    """Zeros ``[steps, batch, width]``: a time-major gradient buffer, C-contiguous or (with
    ``strided``) a permuted view of a batch-major array."""
    if not strided:
        return backend.zeros((steps, batch, width))
    return backend.xp.permute_dims(backend.zeros((batch, steps, width)), (1, 0, 2))


def _lstm_step_inputs(backend, batch=3, hidden=5, seed=40):
    return (_rand(backend, (batch, 4 * hidden), seed, scale=1.5),
            _rand(backend, (batch, 4 * hidden), seed + 1, scale=1.5),
            _rand(backend, (batch, hidden), seed + 2))


def check_lstm_cell_forward(backend, kernel, name):
    """The backend's dtype, then a float64 cell state that promotes (as the reference)."""
    xp = backend.xp
    xw, hw, c_prev = _lstm_step_inputs(backend)
    for c, dtype in ((c_prev, None), (xp.astype(c_prev, xp.float64), xp.float64)):
        got = kernel(xw, hw, c)
        want = lstm_cell_forward(xp, xw, hw, c)
        assert len(got) == len(want) == 7
        for a, b in zip(got, want):
            assert_close(a, backend.to_host(b), backend, rtol=1e-5, atol=2e-6,
                         dtype=b.dtype if dtype is not None else None)


def check_lstm_cell_backward(backend, kernel, name):
    """Every step of a 3-step buffer, with and without the incoming cell gradient; rows of
    ``dpx`` other than step ``t`` stay untouched."""
    xp = backend.xp
    steps, batch, hidden = 3, 3, 5
    saved = lstm_cell_forward(xp, *_lstm_step_inputs(backend, batch, hidden))
    i, f, g, o, _, tc, _ = saved
    c_prev = _rand(backend, (batch, hidden), 44)
    dh = _rand(backend, (batch, hidden), 45)
    # a float64 dc_next promotes; array-api-strict refuses the float64 → float32 write
    mixed = () if backend.library == "array_api_strict" else (
        xp.astype(_rand(backend, (batch, hidden), 47), xp.float64),)

    def buffer(strided):
        return _step_buffer(backend, steps, batch, 4 * hidden, strided)

    # dc_next: none, the backend's dtype, float64 (promotes); dpx: contiguous, then a view
    for dc_next in (None, _rand(backend, (batch, hidden), 46), *mixed):
        for strided in (False, True):
            for t in range(steps):
                dpx, ref = buffer(strided), buffer(strided)
                dc = kernel(i, f, g, o, c_prev, tc, dh, dc_next, dpx, t)
                want = lstm_cell_backward(xp, i, f, g, o, c_prev, tc, dh, dc_next, ref, t)
                assert_close(dc, backend.to_host(want), backend, rtol=1e-5, atol=2e-6,
                             dtype=want.dtype)
                assert_close(dpx, backend.to_host(ref), backend, rtol=1e-5, atol=2e-6)


def check_gru_cell_forward(backend, kernel, name):
    xp = backend.xp
    xw, hw = _rand(backend, (3, 15), 70, scale=1.5), _rand(backend, (3, 15), 71, scale=1.5)
    h_prev = _rand(backend, (3, 5), 72)
    got, want = kernel(xw, hw, h_prev), gru_cell_forward(xp, xw, hw, h_prev)
    assert len(got) == len(want) == 5
    for a, b in zip(got, want):
        assert_close(a, backend.to_host(b), backend, rtol=1e-5, atol=2e-6, dtype=b.dtype)


def check_gru_cell_backward(backend, kernel, name):
    """Every step of a 3-step pair of buffers, contiguous and strided; other steps' rows stay
    untouched."""
    xp = backend.xp
    steps, batch, hidden = 3, 3, 5
    r, z, n, hn, _ = gru_cell_forward(xp, _rand(backend, (batch, 3 * hidden), 73),
                                      _rand(backend, (batch, 3 * hidden), 74),
                                      _rand(backend, (batch, hidden), 75))
    h_prev, dh = _rand(backend, (batch, hidden), 76), _rand(backend, (batch, hidden), 77)

    def buffer(strided):
        return _step_buffer(backend, steps, batch, 3 * hidden, strided)

    for strided in (False, True):
        for t in range(steps):
            bufs, refs = (buffer(strided), buffer(strided)), (buffer(strided), buffer(strided))
            got = kernel(r, z, n, hn, h_prev, dh, *bufs, t)
            want = gru_cell_backward(xp, r, z, n, hn, h_prev, dh, *refs, t)
            assert_close(got, backend.to_host(want), backend, rtol=1e-5, atol=2e-6)
            for a, b in zip(bufs, refs):
                assert_close(a, backend.to_host(b), backend, rtol=1e-5, atol=2e-6)


def check_silu_gate_forward(backend, kernel, name):
    g, u = _rand(backend, (4, 6), 80, scale=3.0), _rand(backend, (4, 6), 81)
    for a, b in zip(kernel(g, u), silu_gate_forward(backend.xp, g, u), strict=True):
        assert_close(a, backend.to_host(b), backend, rtol=1e-5, atol=1e-6, dtype=b.dtype)


def check_silu_gate_backward(backend, kernel, name):
    g, u = _rand(backend, (4, 6), 82, scale=3.0), _rand(backend, (4, 6), 83)
    s, _ = silu_gate_forward(backend.xp, g, u)
    dh = _rand(backend, (4, 6), 84)
    for a, b in zip(kernel(g, u, s, dh), silu_gate_backward(backend.xp, g, u, s, dh),
                    strict=True):
        assert_close(a, backend.to_host(b), backend, rtol=1e-5, atol=1e-6, dtype=b.dtype)


KERNEL_CHECKS = {
    **{f"bias_act:{a}": check_bias_act for a in FUSED_ACTIVATIONS},
    **{f"act_backward:{a}": check_act_backward for a in FUSED_ACTIVATIONS},
    **{f"bias_act_inplace:{a}": check_bias_act_inplace
       for a in ("relu", "scaled_relu", "leaky_relu", "loom_leaky_relu")},
    **{f"act_backward_inplace:{a}": check_act_backward_inplace
       for a in ("relu", "scaled_relu")},
    "softmax": check_softmax,
    "log_softmax": check_softmax,
    "softmax_backward": check_softmax_backward,
    "log_softmax_backward": check_softmax_backward,
    "layer_norm_forward": check_layer_norm,
    "layer_norm_backward": check_layer_norm,
    "rms_norm_forward": check_rms_norm,
    "rms_norm_backward": check_rms_norm,
    "adam_update": check_adam,
    "sgd_update": check_sgd,
    "sgd_update_many": check_sgd_many,
    "adam_update_many": check_adam,  # the optimizer's step takes it
    "lstm_cell_forward": check_lstm_cell_forward,
    "lstm_cell_backward": check_lstm_cell_backward,
    "recurrent_sequence_forward": check_recurrent_sequence,
    "recurrent_sequence_backward": check_recurrent_sequence,
    "gru_cell_forward": check_gru_cell_forward,
    "gru_cell_backward": check_gru_cell_backward,
    "silu_gate_forward": check_silu_gate_forward,
    "silu_gate_backward": check_silu_gate_backward,
    "sum_rows": check_sum_rows,
    "linear": check_linear,
    "softmax_cross_entropy": check_softmax_cross_entropy,
    "rope": check_rope,
    "window_gather": check_window_gather,
    "im2col": check_im2col,
    "window_scatter_add": check_window_scatter_add,
    "window_matmul": check_window_matmul,
    **{f"{kind}_pool_{part}": check_pool for kind in ("max", "avg")
       for part in ("forward", "backward")},
    "window_matmul_backward": check_window_matmul_backward,
}


def test_every_registered_kernel_matches_reference(backend):
    names = sorted(backend.kernels)
    unchecked = [n for n in names if n not in KERNEL_CHECKS]
    assert not unchecked, f"kernels without a reference check: {unchecked}"
    if not names:
        pytest.skip(f"{backend.name} registers no fast kernels")
    for name in names:
        KERNEL_CHECKS[name](backend, backend.kernel(name), name)


def test_kernel_lookup_of_unknown_name_is_none(backend):
    assert backend.kernel("no_such_kernel") is None


def test_kernel_for_finds_a_built_backends_kernels_by_the_arrays_library():
    from loomx.backends import get_backend, kernel_for, use_backend

    backend = get_backend("numpy")
    x = backend.zeros((2, 3))
    assert kernel_for(x, "sum_rows") is backend.kernel("sum_rows") is not None
    assert kernel_for(x, "no_such_kernel") is None
    assert kernel_for([1.0, 2.0], "sum_rows") is None  # not an array of any backend
    with use_backend(backend.without_kernels("sum_rows")):  # the enclosing backend first
        assert kernel_for(x, "sum_rows") is None


# ---------------------------------------------------------------------- layers with kernels
def _same_layer_both_ways(backend, make, input_shape, x_shape, train=True, tol=1.0,
                          mixed=False):
    """Forward + backward of a layer with the backend's kernels and on the reference path
    (``tol`` scales the tolerances, for layers that compute in a narrower dtype; ``mixed``:
    the layer's dtype is not the backend's, so each result must have the reference's dtype
    instead of the backend's float dtype)."""
    results = []
    for b in (backend, reference_backend(backend)):
        layer = make()
        layer.build(input_shape, b, rng=0)
        for i, ref in enumerate(layer.parameters()):  # keeping each parameter's dtype
            ref.value = b.xp.astype(_rand(b, tuple(ref.value.shape), 40 + i, scale=0.5),
                                    ref.value.dtype)
        x = _rand(b, x_shape, 50, scale=2.0)
        layer.zero_grad()
        y, ctx = layer.forward(x, train)
        dx = layer.backward(b.xp.astype(_rand(b, tuple(y.shape), 51), y.dtype), ctx)
        results.append((y, dx, [r.grad for r in layer.parameters()]))
    (y1, dx1, g1), (y2, dx2, g2) = results

    def dtype(ref):
        return ref.dtype if mixed else None

    assert_close(y1, backend.to_host(y2), backend, rtol=1e-5 * tol, atol=1e-5 * tol,
                 dtype=dtype(y2))
    assert_close(dx1, backend.to_host(dx2), backend, rtol=1e-4 * tol, atol=1e-5 * tol,
                 dtype=dtype(dx2))
    for a, b in zip(g1, g2):
        assert_close(a, backend.to_host(b), backend, rtol=1e-4 * tol, atol=1e-4 * tol,
                     dtype=dtype(b))


@pytest.mark.parametrize("make", [
    lambda: LayerNorm(dtype="float16"), lambda: RMSNorm(dtype="float16"),
    lambda: LayerNorm(dtype="float64"), lambda: RMSNorm(dtype="float64"),
    lambda: Dense(6, activation="gelu", dtype="float16"),
    lambda: Dense(6, activation="relu", dtype="float64"),
], ids=["ln16", "rms16", "ln64", "rms64", "dense_gelu16", "dense_relu64"])
def test_layers_of_another_dtype_than_the_network_same_with_and_without_kernels(backend, make):
    """A layer whose parameters have another float dtype than its input: the fused kernels
    must not read one dtype's bytes as another's (the CuPy norms did), nor refuse the mix."""
    if backend.name == "strict":
        pytest.skip("array-api-strict does not promote across float dtypes")
    _same_layer_both_ways(backend, make, (7,), (3, 7), tol=100.0, mixed=True)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "sigmoid", "scaled_relu"])
def test_dense_and_activation_layers_same_with_and_without_kernels(backend, activation):
    _same_layer_both_ways(backend, lambda: Dense(6, activation=activation), (5,), (4, 5))
    _same_layer_both_ways(backend, lambda: Activation(activation), (3, 5), (2, 3, 5))


@pytest.mark.parametrize("make, input_shape", [
    (lambda: Conv2D(4, 3, stride=2, padding=1, activation="relu"), (3, 9, 8)),
    (lambda: Conv2D(4, 3, groups=2, activation="tanh"), (4, 6, 6)),
    (lambda: Conv1D(3, 3, dilation=2, padding="same"), (2, 10)),
    (lambda: Conv3D(2, 2, stride=(1, 2, 1)), (2, 4, 5, 4)),
    (lambda: ConvTranspose2D(3, 3, stride=2, padding=1, activation="gelu"), (2, 4, 5)),
])
def test_conv_layers_same_with_and_without_kernels(backend, make, input_shape):
    _same_layer_both_ways(backend, make, input_shape, (2, *input_shape))


@pytest.mark.parametrize("variant", ["standard", "temperature", "masked", "adaptive"])
def test_softmax_layer_same_with_and_without_kernels(backend, variant):
    opts = {"masked": {"mask": [True, False, True, True, True, False, True]},
            "temperature": {"temperature": 0.7}}.get(variant, {})
    _same_layer_both_ways(backend, lambda: Softmax(variant, **opts), (7,), (3, 7))


# ---------------------------------------------------------------------- CuPy sources
def _cupy_kernels_module():
    path = pathlib.Path(__file__).resolve().parents[1] / "backends" / "cupy_kernels.py"
    spec = importlib.util.spec_from_file_location("loomx_cupy_kernels_source", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cupy_kernel_names_all_have_checks_and_activations_exist():
    """Runs without a GPU: the CuPy registry (built without importing CuPy) is fully checked
    by the GPU tests, and every fused activation is a loomx activation of the same name."""
    module = _cupy_kernels_module()
    names = set(module.cupy_kernels())
    assert names <= set(KERNEL_CHECKS), sorted(names - set(KERNEL_CHECKS))
    assert set(module.ACTIVATION_BODIES) == set(FUSED_ACTIVATIONS)
    for name in FUSED_ACTIVATIONS:
        assert ACTIVATIONS[name].name == name


@pytest.mark.gpu
def test_cupy_backend_registers_the_fused_kernels():
    from loomx.backends import get_backend
    from loomx.backends.cupy_backend import cupy_status

    ok, reason = cupy_status()
    if not ok:
        pytest.skip(f"cupy backend unusable: {reason}")
    backend = get_backend("cupy")
    for name in ("bias_act:relu", "act_backward:gelu", "softmax", "log_softmax",
                 "layer_norm_forward", "rms_norm_backward", "adam_update",
                 "lstm_cell_forward", "lstm_cell_backward", "sum_rows", "sgd_update",
                 "bias_act_inplace:relu", "silu_gate_forward", "silu_gate_backward",
                 "softmax_cross_entropy", "rope", "window_matmul", "window_matmul_backward"):
        assert backend.kernel(name) is not None, name


@pytest.mark.parametrize("sequences", [True, False])
def test_lstm_layer_same_with_and_without_kernels(backend, sequences):
    _same_layer_both_ways(backend, lambda: LSTM(5, return_sequences=sequences), (4, 3),
                          (2, 4, 3))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_swiglu_layer_same_with_and_without_kernels(backend, activation):
    _same_layer_both_ways(backend, lambda: SwiGLU(7, activation=activation), (3, 5), (2, 3, 5))


@pytest.mark.parametrize("sequences", [True, False])
def test_gru_layer_same_with_and_without_kernels(backend, sequences):
    _same_layer_both_ways(backend, lambda: GRU(5, return_sequences=sequences), (4, 3),
                          (2, 4, 3))


def test_lstm_initial_state_and_its_gradient_same_with_and_without_kernels(backend):
    """A given (h0, c0), c0 a strided view, and the gradient of both after backward."""
    xp = backend.xp
    results = []
    for b in (backend, reference_backend(backend)):
        layer = LSTM(5, return_sequences=True)
        layer.build((4, 3), b, rng=0)
        h0 = _rand(b, (2, 5), 60)
        c0 = xp.permute_dims(_rand(b, (5, 2), 61), (1, 0))
        y, ctx = layer.forward(_rand(b, (2, 4, 3), 62), True, initial_state=(h0, c0))
        dx = layer.backward(_rand(b, tuple(y.shape), 63), ctx)
        results.append((y, dx, *layer.initial_state_grad(ctx), *layer.final_state(ctx)))
    for got, want in zip(*results):
        assert_close(got, backend.to_host(want), backend, rtol=1e-4, atol=1e-5)


def test_torch_lstm_and_pooling_kernels_in_inference_mode_and_mixed_dtypes():
    """PyTorch's fused LSTM trains inside ``torch.inference_mode()`` (on copies of the
    inference tensors) like the per-step path, and its max-pooling gradient takes ``dy``'s
    dtype."""
    torch = pytest.importorskip("torch")
    from loomx.backends import get_backend

    backend = get_backend("torch")
    results = []
    for b in (backend, backend.without_kernels()):
        layer = LSTM(5, return_sequences=True)
        layer.build((4, 3), b, rng=0)
        with torch.inference_mode():
            x = _rand(b, (2, 4, 3), 80)
            y, ctx = layer.forward(x, True)
            dx = layer.backward(_rand(b, tuple(y.shape), 81), ctx)
        _, eval_ctx = layer.forward(x, False)  # x is an inference tensor
        dx_eval = layer.backward(_rand(b, tuple(y.shape), 81), eval_ctx)
        results.append((y, dx, dx_eval, *[r.grad for r in layer.parameters()]))
    for got, want in zip(*results, strict=True):
        assert_close(got, backend.to_host(want), backend, rtol=1e-4, atol=1e-5)
    fwd, back = backend.kernel("max_pool_forward"), backend.kernel("max_pool_backward")
    x = _rand(backend, (2, 6, 6, 8), 82)
    y, idx = fwd(x, (2, 2), (2, 2), ((0, 0), (0, 0)))
    dx = back(backend.xp.astype(_rand(backend, tuple(y.shape), 83), backend.xp.float64), idx,
              (6, 6), (2, 2), (2, 2), ((0, 0), (0, 0)))
    assert dx.dtype == torch.float64 and tuple(dx.shape) == (2, 6, 6, 8)


def _numpy_lstm_kernels(np_):
    """numpy stand-ins with the CuPy ElementwiseKernels' calling convention, which insist on
    what the kernels need: one dtype, contiguous raw operands, the output written at ``off``."""

    def forward(xw, hw, c_prev, hidden):
        h = int(hidden)
        assert xw.dtype == hw.dtype == c_prev.dtype and xw.flags.c_contiguous
        assert hw.flags.c_contiguous
        u = np_.tanh(xw + hw)
        gi, gf, go = (0.5 * u[:, k * h:(k + 1) * h] + 0.5 for k in range(3))
        gg = u[:, 3 * h:]
        c = gf * c_prev + gi * gg
        tc = np_.tanh(c)
        return tuple(np_.ascontiguousarray(a) for a in (gi, gf, gg, go, c, tc, go * tc))

    def backward(gi, gf, gg, go, c_prev, tc, dh, dcn, hidden, off, dc_prev, dpx):
        off = int(off)
        assert all(a.dtype == dpx.dtype for a in (gi, gf, gg, go, c_prev, tc, dh, dc_prev))
        assert np_.asarray(dcn).dtype == dpx.dtype and dpx.flags.c_contiguous
        dc = dh * go * (1 - tc * tc) + dcn
        block = np_.stack([dc * gg * gi * (1 - gi), dc * c_prev * gf * (1 - gf),
                           dc * gi * (1 - gg * gg), dh * tc * go * (1 - go)], axis=1)
        dpx.reshape(-1)[off:off + block.size] = block.reshape(-1)
        dc_prev[...] = dc * gf

    return forward, backward


def test_cupy_lstm_wrappers_promote_and_copy_like_the_reference():
    """Runs without a GPU: the CuPy LSTM wrappers with numpy standing in for CuPy and its
    kernels. Mixed and half dtypes, strided inputs and strided or foreign-dtype gradient
    buffers must give the reference's values and dtypes."""
    from loomx.backends import get_backend

    module = _cupy_kernels_module()
    module._cupy = lambda: np
    module._lstm_kernels = lambda: _numpy_lstm_kernels(np)
    rng = np.random.default_rng(3)
    b, h, steps = 3, 5, 3

    def r(*shape, dt=np.float32):
        return rng.standard_normal(shape).astype(dt)

    def close(got, want, half):
        assert got.dtype == want.dtype
        tol = 3e-3 if half else 1e-6
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=tol, atol=tol)

    xp = get_backend("numpy").xp
    for dts in [(np.float32,) * 3, (np.float32, np.float32, np.float64), (np.float16,) * 3,
                (np.float64, np.float32, np.float32)]:
        xw, hw, c = r(b, 4 * h, dt=dts[0]), r(b, 4 * h, dt=dts[1]), r(b, h, dt=dts[2])
        for got, want in zip(module.lstm_cell_forward(xw, hw, c),
                             lstm_cell_forward(xp, xw, hw, c)):
            close(got, want, np.float16 in dts)
    strided = r(b, 8 * h)[:, :4 * h]
    hw, c = r(b, 4 * h), r(b, h)
    for got, want in zip(module.lstm_cell_forward(strided, hw, c),
                         lstm_cell_forward(xp, strided, hw, c)):
        close(got, want, False)
    i, f, g, o, _, tc, _ = lstm_cell_forward(xp, r(b, 4 * h), r(b, 4 * h), r(b, h))
    c_prev, dh = r(b, h), r(b, h)
    def buffer(layout, dtype):
        if layout == "contiguous":
            return np.zeros((steps, b, 4 * h), dtype)
        return np.zeros((b, steps, 4 * h), dtype).transpose(1, 0, 2)

    for dpx_dtype in (np.float32, np.float16, np.float64):
        for dc_next in (None, r(b, h), r(b, h, dt=np.float64)):
            for layout in ("contiguous", "strided"):
                for t in range(steps):
                    got_dpx, want_dpx = buffer(layout, dpx_dtype), buffer(layout, dpx_dtype)
                    got = module.lstm_cell_backward(i, f, g, o, c_prev, tc, dh, dc_next,
                                                    got_dpx, t)
                    want = lstm_cell_backward(xp, i, f, g, o, c_prev, tc, dh, dc_next,
                                              want_dpx, t)
                    close(got, want, False)
                    close(got_dpx, want_dpx, dpx_dtype == np.float16)


@pytest.mark.parametrize("opt_cls", [Adam, AdamW])
def test_numpy_adam_kernel_updates_in_place_and_copies_read_only_weights(opt_cls):
    from loomx.backends import get_backend

    b = get_backend("numpy")
    layer = Dense(4)
    layer.build((3,), b, rng=0)
    opt = opt_cls(layer, lr=0.1, weight_decay=0.01)
    w = layer.params["weight"]
    frozen = np.array(layer.params["bias"])
    frozen.flags.writeable = False  # a bias memory-mapped from a checkpoint
    layer.params["bias"] = frozen
    for _ in range(2):
        layer.zero_grad()
        for r in layer.parameters():
            r.grad = b.from_host(np.ones(tuple(r.value.shape), np.float32))
        opt.step()
    assert layer.params["weight"] is w  # updated in place
    assert layer.params["bias"] is not frozen and layer.params["bias"].flags.writeable
    np.testing.assert_array_equal(frozen, 0.0)  # the read-only original is untouched
    assert np.all(layer.params["bias"] < 0)


def test_numpy_adam_state_restored_from_read_only_host_arrays_can_be_updated():
    from loomx.backends import get_backend

    b = get_backend("numpy")
    layer = Dense(4)
    layer.build((3,), b, rng=0)
    opt = AdamW(layer, lr=0.1)
    layer.zero_grad()
    for r in layer.parameters():
        r.grad = b.from_host(np.ones(tuple(r.value.shape), np.float32))
    opt.step()
    state = opt.state_dict()
    for bufs in state["buffers"].values():
        for host in bufs.values():
            host.flags.writeable = False  # as np.load(..., mmap_mode="r") gives them
    opt.load_state_dict(state)
    opt.step()  # writes into the restored buffers in place
    assert all(v.flags.writeable for bufs in opt.state.values() for v in bufs.values())


@pytest.mark.parametrize("shape", [(64, 32), (50, 32), (7, 3), (3, 600), (4, 5, 6), (2, 1)])
@pytest.mark.parametrize("name", ["relu", "scaled_relu", "leaky_relu"])
def test_numpy_bias_relu_in_wide_rows_equals_the_reference_exactly(shape, name):
    from loomx.backends import get_backend

    b = get_backend("numpy")
    act = ACTIVATIONS[name]
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[0] = np.nan
    bias = rng.standard_normal(shape[-1]).astype(np.float32)
    want = b.to_host(act.forward(b, x + bias))
    for strided in (False, True):
        owned = np.array(x, copy=True) if not strided else np.array(x.T, copy=True).T
        z, y = b.kernel(f"bias_act_inplace:{name}")(owned, bias)
        assert z is owned and y is owned
        np.testing.assert_array_equal(owned, want)
        np.testing.assert_array_equal(np.signbit(owned), np.signbit(want))
