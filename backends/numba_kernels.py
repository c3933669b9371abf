"""Compiled CPU kernels for the numpy backend, through numba (optional).

numpy runs each elementwise operation as its own pass with its own call. Where a chain of them
works on small arrays, the calls cost more than the arithmetic: one LSTM step on ``[64, 128]``
gates is about 40 numpy calls. With numba installed (``pip install "loomx[jit]"``), the numpy
backend registers the kernels below, each one compiled loop for such a chain:

- ``lstm_cell_forward``: the gate and cell-state arithmetic of one step. The two ``tanh`` stay
  numpy's (vectorised, and the same values as the reference); the rest is one loop.
- ``lstm_cell_backward``: the whole step backwards in one loop.
- ``gru_cell_forward`` / ``gru_cell_backward``: the same for a GRU step.
- ``bias_act_inplace:<ReLU family>``, ``act_backward_inplace:<relu, scaled_relu>`` and
  ``act_backward:<ReLU family>``: bias + activation and its gradient in one pass each.
- ``window_scatter_add``: a convolution's window gradient (col2im), per image;
  :func:`gather_padded` and :func:`scatter_add_cropped`, the same loops with the padding
  folded in, serve the numpy backend's ``window_matmul`` kernels.
- ``silu_gate_forward`` / ``silu_gate_backward``: SwiGLU's ``g·σ(g)·u`` and its gradients.
- ``sgd_update``: plain SGD in place, one pass.
- ``max_pool_forward`` / ``max_pool_backward``: max pooling's maxima with the offset of each
  window's first maximum, and the gradient routed there; ``avg_pool_forward`` /
  ``avg_pool_backward``: window means and their gradient, without the gathered windows.

Results equal the array-API reference to the bit (same operations in the same order, no
``fastmath``). Inputs outside the compiled case (mixed dtypes, float16, a strided gradient
buffer) take the numpy backend's own kernel where it has one, else the reference path.

``LOOMX_NUMBA=0`` turns them off. numba is imported at the first call of a kernel, not with
loomx; each loop is compiled the first time it meets a dtype (about half a second) and cached
on disk for later processes. When numba is installed but fails to import (for example, a numpy newer
than it supports), loomx warns once and uses the reference path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def numba_enabled() -> bool:
    """Whether the numpy backend registers these kernels: numba is installed and
    ``LOOMX_NUMBA`` is not ``0`` (checked without importing numba)."""
    if os.environ.get("LOOMX_NUMBA", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _loops() -> Any:
    """The compiled loops (:mod:`loomx.backends._numba_loops`), or ``None`` when numba fails
    to import (warned once)."""
    try:
        from . import _numba_loops
    except Exception as exc:  # noqa: BLE001 - numba raises ImportError, or others when broken
        warnings.warn(f"numba is installed but could not be imported ({exc}); the numpy "
                      f"backend uses its reference paths. Set LOOMX_NUMBA=0 to silence this.",
                      RuntimeWarning, stacklevel=3)
        return None
    return _numba_loops


def _reference(name: str, module: str = "recurrent"):
    """The array-API reference of a kernel (a function of ``loomx.layers.<module>``), bound to
    numpy's namespace."""
    import importlib

    import array_api_compat.numpy as xp

    return functools.partial(getattr(importlib.import_module(f"loomx.layers.{module}"), name),
                             xp)


def _cell_case(xw_t, hw, state, gates: int) -> bool:
    """Whether a recurrent cell's forward inputs are the compiled case: one float32/float64
    dtype, ``state [B, H]``, both pre-activations ``[B, gates·H]``."""
    dt = state.dtype
    return (dt in _FLOATS and xw_t.dtype == hw.dtype == dt and state.ndim == 2
            and xw_t.shape == hw.shape == (state.shape[0], gates * state.shape[1]))


def lstm_cell_forward(xw_t, hw, c_prev):
    """``lstm_cell_forward``: ``(xw_t [B, 4H], hw [B, 4H], c_prev [B, H])`` →
    ``(i, f, g, o, c, tanh(c), h)``, each ``[B, H]`` (views of one ``[7, B, H]`` array), gate
    blocks as in :func:`loomx.layers.recurrent.lstm_cell_forward`."""
    loops = _loops()
    if loops is None or not _cell_case(xw_t, hw, c_prev, 4):
        return _reference("lstm_cell_forward")(xw_t, hw, c_prev)
    dt, (rows, width) = c_prev.dtype, c_prev.shape
    u = np.add(xw_t, hw)
    np.tanh(u, out=u)
    s = np.empty((7, rows, width), dtype=dt)
    loops.lstm_gates(u, c_prev, s)
    np.tanh(s[4], out=s[5])
    np.multiply(s[3], s[5], out=s[6])
    return tuple(s)


def lstm_cell_backward(i, f, g, o, c_prev, tc, dh, dc_next, dpx, t: int):
    """``lstm_cell_backward``: writes the step's pre-activation gradient into ``dpx[t]`` of the
    time-major ``[T, B, 4H]`` buffer and returns ``dc_prev [B, H]``, as
    :func:`loomx.layers.recurrent.lstm_cell_backward`."""
    loops = _loops()
    dt, shape = dpx.dtype, i.shape
    has_next = dc_next is not None
    operands = (i, f, g, o, c_prev, tc, dh, dc_next if has_next else dh)
    if (loops is None or dt not in _FLOATS or not dpx.flags.c_contiguous or len(shape) != 2
            or dpx.shape[1:] != (shape[0], 4 * shape[1])
            or not all(a.dtype == dt and a.shape == shape for a in operands)):
        return _reference("lstm_cell_backward")(i, f, g, o, c_prev, tc, dh, dc_next, dpx, t)
    dc_prev = np.empty(shape, dtype=dt)
    loops.lstm_backward(*operands, has_next, dpx[t], dc_prev)
    return dc_prev


def gru_cell_forward(xw_t, hw, h_prev):
    """``gru_cell_forward``: ``(xw_t [B, 3H], hw [B, 3H], h_prev [B, H])`` →
    ``(r, z, n, hn, h)``, each ``[B, H]`` (views of one ``[5, B, H]`` array), as
    :func:`loomx.layers.recurrent.gru_cell_forward`: numpy's ``tanh`` for the two gates'
    nonlinearities, two compiled loops for the rest."""
    loops = _loops()
    if loops is None or not _cell_case(xw_t, hw, h_prev, 3):
        return _reference("gru_cell_forward")(xw_t, hw, h_prev)
    dt, (rows, width) = h_prev.dtype, h_prev.shape
    u = np.add(xw_t[:, :2 * width], hw[:, :2 * width])
    np.multiply(u, 0.5, out=u)
    np.tanh(u, out=u)
    s = np.empty((5, rows, width), dtype=dt)
    loops.gru_gates(u, xw_t, hw, s)
    np.tanh(s[2], out=s[2])
    loops.gru_output(s[1], s[2], h_prev, s[4])
    return tuple(s)


def gru_cell_backward(r, z, n, hn, h_prev, dh, dpx, dph, t: int):
    """``gru_cell_backward``: writes ``dpx[t]`` and ``dph[t]`` and returns ``dh·z``, as
    :func:`loomx.layers.recurrent.gru_cell_backward`."""
    loops = _loops()
    dt, shape = dpx.dtype, r.shape
    operands = (r, z, n, hn, h_prev, dh)
    if (loops is None or dt not in _FLOATS or len(shape) != 2 or dph.dtype != dt
            or not (dpx.flags.c_contiguous and dph.flags.c_contiguous)
            or not dpx.shape[1:] == dph.shape[1:] == (shape[0], 3 * shape[1])
            or not all(a.dtype == dt and a.shape == shape for a in operands)):
        return _reference("gru_cell_backward")(r, z, n, hn, h_prev, dh, dpx, dph, t)
    dhz = np.empty(shape, dtype=dt)
    loops.gru_backward(*operands, dpx[t], dph[t], dhz)
    return dhz


def silu_gate_forward(g, u):
    """``silu_gate_forward``: ``(σ(g), g·σ(g)·u)`` as
    :func:`loomx.layers.ffn.silu_gate_forward`; numpy's ``tanh``, then one compiled pass."""
    loops = _loops()
    if loops is None or not _same_float(g, u):
        return _reference("silu_gate_forward", "ffn")(g, u)
    t = np.multiply(g, 0.5)
    np.tanh(t, out=t)
    h = np.empty_like(g)
    loops.silu_gate(t.reshape(-1), g.reshape(-1), u.reshape(-1), h.reshape(-1))
    return t, h


def silu_gate_backward(g, u, s, dh):
    """``silu_gate_backward``: ``(dg, du)`` as :func:`loomx.layers.ffn.silu_gate_backward`,
    in one compiled pass."""
    loops = _loops()
    if loops is None or not _same_float(g, u, s, dh):
        return _reference("silu_gate_backward", "ffn")(g, u, s, dh)
    dg, du = np.empty_like(g), np.empty_like(g)
    loops.silu_gate_backward(g.reshape(-1), u.reshape(-1), s.reshape(-1), dh.reshape(-1),
                             dg.reshape(-1), du.reshape(-1))
    return dg, du


def _same_float(*arrays) -> bool:
    """Whether ``arrays`` are C-contiguous, of one shape and of one dtype, float32 or float64."""
    first = arrays[0]
    return first.dtype in _FLOATS and all(
        a.flags.c_contiguous and a.dtype == first.dtype and a.shape == first.shape
        for a in arrays)


def _bias_act_inplace(numpy_kernel, scale: float, slope: float):
    """``bias_act_inplace:<ReLU family>`` (``(x, bias | None) -> (x, x)``, see the numpy
    backend's kernel): one pass over ``x``, viewed as rows of its last axis."""

    def kernel(x, bias=None):
        loops = _loops()
        if (loops is None or x.ndim == 0 or x.size == 0 or not x.flags.writeable
                or not _same_float(x) or (bias is not None and (
                    bias.dtype != x.dtype or bias.shape != (x.shape[-1],)))):
            return numpy_kernel(x, bias)
        rows = x.reshape(-1, x.shape[-1])
        kind = x.dtype.type
        loops.bias_relu(rows, rows[0] if bias is None else bias, bias is not None,
                        kind(scale), kind(slope))
        return x, x

    return kernel


def _act_backward_inplace(numpy_kernel, scale: float):
    """``act_backward_inplace:<relu|scaled_relu>`` (``(z, y, dy) -> dy``): one pass."""

    def kernel(z, y, dy):
        loops = _loops()
        if loops is None or not dy.flags.writeable or not _same_float(dy, z):
            return numpy_kernel(z, y, dy)
        loops.relu_backward(z.reshape(-1), dy.reshape(-1), dy.dtype.type(scale))
        return dy

    return kernel


def _act_backward(name: str, scale: float, slope: float):
    """``act_backward:<ReLU family>`` (``(z, y, dy) -> dz``, a new array): one pass instead
    of the reference's mask, cast and product."""

    def kernel(z, y, dy):
        loops = _loops()
        if loops is None or not _same_float(dy, z):
            import array_api_compat.numpy as xp

            from loomx.layers.activations import ACTIVATIONS

            # the reference reads only ``backend.xp``
            return ACTIVATIONS[name].backward(SimpleNamespace(xp=xp), z, y, dy)
        out = np.empty_like(dy)
        kind = dy.dtype.type
        loops.relu_family_backward(z.reshape(-1), dy.reshape(-1), out.reshape(-1), kind(scale),
                                   kind(slope))
        return out

    return kernel


def sgd_update(w, g, *, lr: float, weight_decay: float = 0.0):
    """``sgd_update``: plain SGD (no momentum), ``w ← w − lr·(g + weight_decay·w)``, in place
    (a read-only ``w``, memory-mapped from a checkpoint, is copied first); returns ``w``. Other
    inputs (mixed dtypes, strided arrays) get the reference's new array."""
    loops = _loops()
    if loops is None or not _same_float(w, g):
        if weight_decay:
            g = g + weight_decay * w
        return w - lr * g
    if not w.flags.writeable:
        w = np.array(w, copy=True)
    kind = w.dtype.type
    loops.sgd_update(w.reshape(-1), g.reshape(-1), kind(lr), kind(weight_decay))
    return w


#: Channels below this stay with numpy's strided adds, faster there (1 channel: 0.6 against
#: 1.2 ms for the windows of a ``[64, 28, 28]`` 3×3 convolution).
_MIN_SCATTER_CHANNELS = 8


def _as_2d(kernel, stride, dilation, pads) -> tuple[int, ...]:
    """Loop arguments ``(kh, kw, sh, sw, dh, dw, ph, pw)`` of a 1-d or 2-d window (a 1-d one
    as height 1); ``pads`` are ``(front, back)`` per axis, of which the loops need the front."""
    if len(kernel) == 1:
        return (1, kernel[0], 1, stride[0], 1, dilation[0], 0, pads[0][0])
    return (*kernel, *stride, *dilation, pads[0][0], pads[1][0])


def _spatial_2d(a, ndim: int):
    """``a [B, *S, ...]`` with one spatial axis given height 1 (a view), else ``a``."""
    return a[:, None] if ndim == 1 else a


def _compiled_case(grid, cols) -> bool:
    """Whether the compiled window loops take ``grid [B, *S, C]`` and ``cols [B, *O, K, C]``:
    1 or 2 spatial axes, at least 8 channels (fewer make the per-window overhead dominate),
    one float dtype, ``cols`` C-contiguous."""
    n = cols.ndim - 3
    return (n in (1, 2) and grid.ndim == n + 2 and cols.shape[-1] >= _MIN_SCATTER_CHANNELS
            and grid.dtype in _FLOATS and grid.dtype == cols.dtype
            and cols.flags.c_contiguous)


def _window_scatter_add(numpy_kernel):
    """``window_scatter_add`` (``(out [B, *S, C], cols [B, *O, K, C], kernel, stride,
    dilation) -> out``) for 1 and 2 spatial axes: one compiled loop, each image's windows
    added offset by offset (the reference's order of additions)."""

    def kernel(out, cols, kernel_size, stride, dilation):
        loops = _loops()
        n = len(kernel_size)
        if (loops is None or not out.flags.writeable or not out.flags.c_contiguous
                or cols.ndim != n + 3 or not _compiled_case(out, cols)):
            return numpy_kernel(out, cols, kernel_size, stride, dilation)
        loops.scatter_add_2d(_spatial_2d(out, n), _spatial_2d(cols, n),
                             *_as_2d(kernel_size, stride, dilation, ((0, 0),) * n))
        return out

    return kernel


def windows_compiled(x, kernel) -> bool:
    """Whether :func:`gather_padded` and :func:`scatter_add_cropped` take the windows of
    ``x [B, *S, C]`` (numba imports here, at the first convolution that asks)."""
    return (len(kernel) in (1, 2) and x.ndim == len(kernel) + 2
            and x.shape[-1] >= _MIN_SCATTER_CHANNELS and x.dtype in _FLOATS
            and _loops() is not None)


def gather_padded(x, out, kernel, stride, dilation, pads) -> bool:
    """Gather the windows of ``x [B, *S, C]`` (any strides), padded by ``pads`` with zeros,
    into ``out [B, *O, K, C]``; ``False`` (nothing written) outside the compiled case."""
    loops = _loops()
    if loops is None or not out.flags.writeable or not _compiled_case(x, out):
        return False
    n = len(kernel)
    loops.im2col_2d(_spatial_2d(x, n), _spatial_2d(out, n),
                    *_as_2d(kernel, stride, dilation, pads))
    return True


def scatter_add_cropped(out, cols, kernel, stride, dilation, pads) -> bool:
    """Adjoint of :func:`gather_padded`: add ``cols [B, *O, K, C]`` into the unpadded
    ``out [B, *S, C]`` (C-contiguous), skipping the padding; ``False`` (nothing written)
    outside the compiled case."""
    loops = _loops()
    if (loops is None or not out.flags.writeable or not out.flags.c_contiguous
            or not _compiled_case(out, cols)):
        return False
    n = len(kernel)
    loops.scatter_add_2d(_spatial_2d(out, n), _spatial_2d(cols, n),
                         *_as_2d(kernel, stride, dilation, pads))
    return True


def _channels_contiguous(a):
    """``a [B, *S, C]``, copied to C-contiguous unless it already is (a channels-last view of
    channels-first data reads its channels ``H·W`` apart: 4.3 against 0.3 ms for the max-pool
    gradient of ``[64, 13, 13, 32]``)."""
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _pool_args(kernel, stride, pads) -> tuple[int, ...]:
    """Loop arguments ``(kh, kw, sh, sw, ph, pw)`` of a 1-d or 2-d pooling window."""
    kh, kw, sh, sw, _, _, ph, pw = _as_2d(kernel, stride, (1,) * len(kernel), pads)
    return kh, kw, sh, sw, ph, pw


def max_pool_forward(x, kernel, stride, pads):
    """``max_pool_forward``: ``(x [B, *S, C] channels-last (any strides), kernel, stride,
    pads) -> (y [B, *O, C], idx [B, *O, C] uint8)``, the window maxima (padding counts as
    ``-inf``) and the offset of each window's first maximum (``prod(kernel)`` where none equals
    it: NaN); ``None`` outside the compiled case (1-2 spatial axes, at least 8 channels, float32
    or float64, at most 254 offsets), where the layer takes its reference path."""
    found = _pooled(x, kernel, stride, pads)
    if found is None:
        return None
    x, y = found
    n = len(kernel)
    idx = np.empty(y.shape, np.uint8)
    _loops().max_pool_2d(_spatial_2d(x, n), _spatial_2d(y, n), _spatial_2d(idx, n),
                         *_pool_args(kernel, stride, pads))
    return y, idx


def max_pool_backward(dy, idx, spatial, kernel, stride, pads):
    """``max_pool_backward``: ``(dy [B, *O, C] (any strides), idx from max_pool_forward,
    spatial, kernel, stride, pads) -> dx [B, *spatial, C]``: each gradient added at its
    window's first maximum, in the reference's order of additions."""
    n = len(kernel)
    dy = _channels_contiguous(dy)
    dx = np.zeros((dy.shape[0], *spatial, dy.shape[-1]), dy.dtype)
    _loops().pool_2d_backward(_spatial_2d(dy, n), _spatial_2d(idx, n), _spatial_2d(dx, n),
                              *_pool_args(kernel, stride, pads), True)
    return dx


def _pooled(x, kernel, stride, pads):
    """``x`` channels-contiguous and its pooled output ``[B, *O, C]`` (uninitialised), or
    ``None`` outside the compiled pooling case (1-2 spatial axes, at least 8 channels,
    float32 or float64, at most 254 offsets)."""
    n = len(kernel)
    if (_loops() is None or n not in (1, 2) or x.ndim != n + 2 or x.dtype not in _FLOATS
            or x.shape[-1] < _MIN_SCATTER_CHANNELS or int(np.prod(kernel)) > 254):
        return None
    x = _channels_contiguous(x)
    out = tuple((size + lo + hi - k) // st + 1
                for size, (lo, hi), k, st in zip(x.shape[1:-1], pads, kernel, stride))
    return x, np.empty((x.shape[0], *out, x.shape[-1]), x.dtype)


def avg_pool_forward(x, kernel, stride, pads):
    """``avg_pool_forward``: ``(x [B, *S, C] channels-last (any strides), kernel, stride,
    pads) -> y [B, *O, C]``, window means with zero padding counted; ``None`` outside the
    compiled case (as :func:`max_pool_forward`)."""
    found = _pooled(x, kernel, stride, pads)
    if found is None:
        return None
    x, y = found
    n = len(kernel)
    _loops().avg_pool_2d(_spatial_2d(x, n), _spatial_2d(y, n), *_pool_args(kernel, stride, pads))
    return y


def avg_pool_backward(dy, spatial, kernel, stride, pads):
    """``avg_pool_backward``: ``(dy [B, *O, C] (any strides), spatial, kernel, stride, pads)
    -> dx [B, *spatial, C]``: each window's ``dy / prod(kernel)`` added at its positions."""
    n = len(kernel)
    dy = _channels_contiguous(dy)
    dx = np.zeros((dy.shape[0], *spatial, dy.shape[-1]), dy.dtype)
    unread = np.zeros((1,) * (n + 2), np.uint8)  # no offsets: every position gets a share
    _loops().pool_2d_backward(_spatial_2d(dy, n), _spatial_2d(unread, n), _spatial_2d(dx, n),
                              *_pool_args(kernel, stride, pads), False)
    return dx


#: ``bias_act_inplace`` / ``act_backward_inplace`` activations: (scale, slope).
_RELU_FAMILY = {"relu": (1.0, 0.0), "scaled_relu": (1.1, 0.0), "leaky_relu": (1.0, 0.01),
                "loom_leaky_relu": (1.0, 0.1)}


def numba_kernels(numpy_kernels: dict) -> dict:
    """The compiled kernels by name, for :func:`loomx.backends.numpy_backend.make_numpy_backend`;
    ``numpy_kernels`` are the numpy backend's own, which those replacing them fall back to."""
    kernels = {"lstm_cell_forward": lstm_cell_forward, "lstm_cell_backward": lstm_cell_backward,
               "gru_cell_forward": gru_cell_forward, "gru_cell_backward": gru_cell_backward,
               "silu_gate_forward": silu_gate_forward, "silu_gate_backward": silu_gate_backward,
               "sgd_update": sgd_update, "max_pool_forward": max_pool_forward,
               "max_pool_backward": max_pool_backward, "avg_pool_forward": avg_pool_forward,
               "avg_pool_backward": avg_pool_backward}
    for name, (scale, slope) in _RELU_FAMILY.items():
        kernels[f"act_backward:{name}"] = _act_backward(name, scale, slope)
        key = f"bias_act_inplace:{name}"
        if key in numpy_kernels:
            kernels[key] = _bias_act_inplace(numpy_kernels[key], scale, slope)
        key = f"act_backward_inplace:{name}"
        if key in numpy_kernels and slope == 0.0:
            kernels[key] = _act_backward_inplace(numpy_kernels[key], scale)
    if "window_scatter_add" in numpy_kernels:
        kernels["window_scatter_add"] = _window_scatter_add(numpy_kernels["window_scatter_add"])
    return kernels
