"""Strided windows over the spatial axes: the machinery of convolution and pooling.

A convolution over ``n`` spatial axes is a **gather** of every kernel window followed by one
matrix product; its input gradient is the **adjoint** of the gather (a scatter-add of the
windows back onto the input). Both are written here once, for any number of spatial axes, on
**channels-last** arrays ``[B, *S, C]`` (layers permute their ``[B, C, *S]`` inputs, a free view
on numpy, CuPy and PyTorch). Channels last keeps the channel axis contiguous in the gathered
windows and in the padded input, so the matrix products need no further copies and the gather
and scatter-add move whole channel rows.

- :func:`pad_spatial` / :func:`crop_spatial`: constant padding of the spatial axes and its
  inverse (the standard has no ``pad``: a filled array plus one slice assignment);
- :func:`gather_windows`: ``x [B, *S, C]`` → ``cols [B, *O, K, C]`` with ``K = prod(kernel)``
  (kernel offsets in row-major order) and
  ``cols[b, o, j, c] = x[b, o·stride + offset_j·dilation, c]``;
- :func:`scatter_windows`: the adjoint, ``cols [B, *O, K, C]`` → ``x [B, *S, C]``, where
  overlapping windows add up (windows that tile without overlap, stride = kernel, need no
  additions: the scatter is then one reshape and permutation).

The reference paths use only the array API standard (strided basic slicing, ``stack``, slice
assignment) and loop over the ``K`` kernel offsets, never over the batch or output positions.
Backends may supply faster kernels by name (``backend.kernel(...)``):

- ``"im2col"``: ``(x, kernel, stride, dilation, out_shape) -> cols [B, *O, K, C]``, the
  contiguous gather itself, used instead of ``window_gather`` when present (numpy: one copy
  of a strided window view);
- ``"window_gather"``: ``(x, window, stride) -> view [*lead, *O, *window]`` over the trailing
  axes of ``x`` (numpy/CuPy ``sliding_window_view``, no copy);
- ``"window_scatter_add"``: ``(out, cols, kernel, stride, dilation) -> out`` adding
  ``cols [B, *O, K, C]`` into ``out [B, *S, C]`` in place (ufunc ``add`` with ``out=``, no
  temporaries).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

Array = Any
Pads = tuple[tuple[int, int], ...]


def window_count(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Number of windows along one axis of length ``size`` (already padded)."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def _offsets(kernel: tuple[int, ...]):
    return itertools.product(*(range(k) for k in kernel))


def _window_slices(offset, dilation, stride, out_shape) -> tuple[slice, ...]:
    return tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                 for o, d, s, n in zip(offset, dilation, stride, out_shape))


def _spatial_index(slices: tuple[slice, ...]) -> tuple[slice, ...]:
    """Index of ``[B, *S, C]`` selecting ``slices`` on the spatial axes."""
    return (slice(None),) + slices + (slice(None),)


def pad_spatial(backend, x: Array, pads: Pads, value: float = 0.0) -> Array:
    """Pad the spatial axes of ``x [B, *S, C]`` by ``(low, high)`` each with ``value``.

    Shapes: ``[B, *S, C]`` → ``[B, *(S + low + high), C]``. Returns ``x`` when no padding.
    """
    if all(lo == 0 and hi == 0 for lo, hi in pads):
        return x
    spatial = tuple(x.shape[1:-1])
    shape = ((x.shape[0],) + tuple(s + lo + hi for s, (lo, hi) in zip(spatial, pads))
             + (x.shape[-1],))
    out = backend.scratch(shape, dtype=x.dtype)
    # fill only the border (every element outside the interior, corners maybe twice), then
    # copy the interior: each element is written once or twice instead of zeros-then-copy
    full = (slice(None),) * len(spatial)
    for axis, (s, (lo, hi)) in enumerate(zip(spatial, pads)):
        for part in (slice(0, lo), slice(lo + s, lo + s + hi)):
            if part.stop > part.start:
                out[_spatial_index(full[:axis] + (part,) + full[axis + 1:])] = value
    out[_spatial_index(tuple(slice(lo, lo + s) for s, (lo, _) in zip(spatial, pads)))] = x
    return out


def crop_spatial(x: Array, pads: Pads) -> Array:
    """Inverse of :func:`pad_spatial`: drop ``(low, high)`` from each spatial axis."""
    if all(lo == 0 and hi == 0 for lo, hi in pads):
        return x
    spatial = tuple(x.shape[1:-1])
    return x[_spatial_index(tuple(slice(lo, s - hi) for s, (lo, hi) in zip(spatial, pads)))]


def gather_windows_reference(xp, x: Array, kernel: tuple[int, ...], stride: tuple[int, ...],
                             dilation: tuple[int, ...], out_shape: tuple[int, ...]) -> Array:
    """Array-API gather: one strided slice per kernel offset, stacked on a new axis.

    Shapes: ``x [B, *S, C]`` → ``[B, *out_shape, K, C]``.
    """
    parts = [x[_spatial_index(_window_slices(off, dilation, stride, out_shape))]
             for off in _offsets(kernel)]
    return xp.stack(parts, axis=len(kernel) + 1)


def gather_windows(backend, x: Array, kernel: tuple[int, ...], stride: tuple[int, ...],
                   dilation: tuple[int, ...], out_shape: tuple[int, ...] | None = None) -> Array:
    """All kernel windows of ``x``: ``[B, *S, C]`` → ``cols [B, *O, K, C]``.

    ``cols[b, o, j, c] = x[b, o·stride + offset_j·dilation, c]`` with kernel offsets in
    row-major order. ``out_shape`` (default: every complete window) may ask for fewer windows.
    """
    n = len(kernel)
    spatial = tuple(x.shape[1:-1])
    if out_shape is None:
        out_shape = tuple(window_count(s, k, st, d)
                          for s, k, st, d in zip(spatial, kernel, stride, dilation))
    xp = backend.xp
    im2col = backend.kernel("im2col")
    if im2col is not None:
        return im2col(x, tuple(kernel), tuple(stride), tuple(dilation), tuple(out_shape))
    fast = backend.kernel("window_gather")
    if fast is None:
        return gather_windows_reference(xp, x, kernel, stride, dilation, out_shape)
    extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    channels_first = xp.permute_dims(x, (0, n + 1) + tuple(range(1, n + 1)))
    view = fast(channels_first, extent, stride)  # [B, C, *O_all, *extent]
    view = view[(...,) + tuple(slice(0, o) for o in out_shape)
                + tuple(slice(None, None, d) for d in dilation)]
    perm = (0,) + tuple(range(2, 2 + 2 * n)) + (1,)
    view = xp.permute_dims(view, perm)  # [B, *O, *kernel, C]
    return xp.reshape(view, (x.shape[0],) + tuple(out_shape) + (math.prod(kernel), x.shape[-1]))


def scatter_windows_reference(backend, out: Array, cols: Array, kernel: tuple[int, ...],
                              stride: tuple[int, ...], dilation: tuple[int, ...]) -> Array:
    """Array-API adjoint of the gather: add ``cols [B, *O, K, C]`` into ``out [B, *S, C]``.

    One strided slice update per kernel offset; returns the updated ``out``.
    """
    out_shape = tuple(cols.shape[1:-2])
    for j, off in enumerate(_offsets(kernel)):
        idx = _spatial_index(_window_slices(off, dilation, stride, out_shape))
        out[idx] = out[idx] + cols[..., j, :]
    return out


def scatter_windows(backend, cols: Array, spatial: tuple[int, ...], kernel: tuple[int, ...],
                    stride: tuple[int, ...], dilation: tuple[int, ...]) -> Array:
    """Adjoint of :func:`gather_windows`: ``cols [B, *O, K, C]`` → ``[B, *spatial, C]``.

    Every window is added back at the positions it was read from (overlaps add up; positions
    no window reads stay zero).
    """
    shape = (cols.shape[0],) + tuple(spatial) + (cols.shape[-1],)
    if all(d == 1 and s == k for k, s, d in zip(kernel, stride, dilation)):
        return _untile(backend, cols, shape, kernel)
    out = backend.scratch(shape, dtype=cols.dtype)
    out[...] = 0
    fast = backend.kernel("window_scatter_add")
    if fast is None:
        return scatter_windows_reference(backend, out, cols, kernel, stride, dilation)
    return fast(out, cols, kernel, stride, dilation)


def _untile(backend, cols: Array, shape: tuple[int, ...], kernel: tuple[int, ...]) -> Array:
    """Scatter for windows that tile without overlap (stride = kernel, no dilation).

    Every input position belongs to at most one window, so the adjoint is a permutation:
    ``[B, *O, *k, C]`` → ``[B, O1, k1, O2, k2, ..., C]`` → ``[B, O1·k1, O2·k2, ..., C]``,
    placed in zeros when the windows do not reach the end of an axis.
    """
    xp = backend.xp
    n = len(kernel)
    out_shape = tuple(cols.shape[1:-2])
    tiles = xp.reshape(cols, (cols.shape[0],) + out_shape + tuple(kernel) + (cols.shape[-1],))
    perm = (0,) + tuple(i for a in range(n) for i in (1 + a, 1 + n + a)) + (2 * n + 1,)
    covered = tuple(o * k for o, k in zip(out_shape, kernel))
    tiles = xp.reshape(xp.permute_dims(tiles, perm),
                       (cols.shape[0],) + covered + (cols.shape[-1],))
    if covered == tuple(shape[1:-1]):
        return tiles
    out = backend.zeros(shape, dtype=cols.dtype)
    out[_spatial_index(tuple(slice(0, c) for c in covered))] = tiles
    return out


def to_channels_last(xp, x: Array) -> Array:
    """``[B, C, *S]`` → ``[B, *S, C]`` (a view where the library allows)."""
    return xp.permute_dims(x, (0,) + tuple(range(2, x.ndim)) + (1,))


def to_channels_first(xp, x: Array) -> Array:
    """``[B, *S, C]`` → ``[B, C, *S]`` (a view where the library allows)."""
    return xp.permute_dims(x, (0, x.ndim - 1) + tuple(range(1, x.ndim - 1)))
