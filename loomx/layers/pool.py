"""Max and average pooling over 1 or 2 spatial axes, and global average pooling.

Pooling reuses the convolution machinery (:mod:`loomx.layers._windows`): view the input
channels-last, pad, gather every window into ``cols [B, *O, K, C]``, reduce over ``K``; the
backward pass scatters the window gradients back (the adjoint of the gather). No Python loop
over batch or output positions.
"""

from __future__ import annotations

import math
from typing import ClassVar

from ..backends import RandomSource
from ..errors import ConfigError, ShapeError
from ._windows import (
    crop_spatial,
    gather_windows,
    pad_spatial,
    scatter_windows,
    to_channels_first,
    to_channels_last,
    window_count,
)
from .base import Array, Layer, Shape, register_layer
from .conv import IntOrTuple, _config_value, _ntuple


class _PoolND(Layer):
    """Shared configuration: ``kernel_size``, ``stride=None`` (= kernel), ``padding=0``.

    Shapes: ``x [B, C, *S]`` → ``y [B, C, *O]``, ``O = floor((S + 2·padding - k) / stride) + 1``.
    Padding must be at most half the kernel on every axis (as in PyTorch), so every window holds
    at least one real input value.
    """

    ndim: ClassVar[int] = 0
    config_fields = ("kernel_size", "stride", "padding")
    float_input = True
    pad_value: ClassVar[float] = 0.0

    def __init__(self, kernel_size: IntOrTuple, stride: IntOrTuple | None = None,
                 padding: IntOrTuple = 0, **kw):
        super().__init__(**kw)
        owner, n = type(self).__name__, self.ndim
        self.kernel_size = _config_value(kernel_size)
        self.stride = _config_value(stride)
        self.padding = _config_value(padding)
        self._k = _ntuple(self.kernel_size, n, "kernel_size", owner, 1)
        self._s = self._k if stride is None else _ntuple(self.stride, n, "stride", owner, 1)
        p = _ntuple(self.padding, n, "padding", owner, 0)
        if any(pi > ki // 2 for pi, ki in zip(p, self._k)):
            raise ConfigError(f"{owner} padding {self.padding!r} must be at most half of "
                              f"kernel_size {self.kernel_size!r} on every axis")
        self._pads = tuple((pi, pi) for pi in p)
        self._ones = (1,) * n

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        n = self.ndim
        if len(input_shape) != n + 1:
            axes = ", ".join(["C"] + ["H", "W"][2 - n:])
            raise ShapeError(f"{self.describe()} expects per-sample input [{axes}] "
                             f"({n} spatial axes) but the input shape is {list(input_shape)}")
        out = tuple(window_count(s + lo + hi, k, st, 1) for s, (lo, hi), k, st
                    in zip(input_shape[1:], self._pads, self._k, self._s))
        if any(o < 1 for o in out):
            raise ShapeError(f"{self.describe()}: input {list(input_shape)} is smaller than the "
                             f"pooling window {list(self._k)}; use a larger input or padding")
        self._out_spatial = out
        return (input_shape[0], *out)

    def _windows(self, x: Array) -> Array:
        """``x [B, C, *S]`` → ``cols [B, *O, K, C]`` (padding filled with ``pad_value``)."""
        xcl = pad_spatial(self.backend, to_channels_last(self.xp, x), self._pads, self.pad_value)
        return gather_windows(self.backend, xcl, self._k, self._s, self._ones)

    def _scatter(self, dcols: Array) -> Array:
        """Adjoint of :meth:`_windows`: ``dcols [B, *O, K, C]`` → ``dx [B, C, *S]``."""
        padded = tuple(s + lo + hi for s, (lo, hi) in zip(self.input_shape[1:], self._pads))
        dxcl = scatter_windows(self.backend, dcols, padded, self._k, self._s, self._ones)
        return to_channels_first(self.xp, crop_spatial(dxcl, self._pads))


class MaxPoolND(_PoolND):
    """Maximum over each window; padding counts as ``-inf`` (never selected).

    Backward routes each output gradient to the first maximum of its window (row-major window
    order, as PyTorch does for ties): one comparison per kernel offset with the window maximum,
    masked by "no earlier offset was a maximum" (no argmax, no boolean-mask indexing). A
    backend with the ``max_pool_forward`` / ``max_pool_backward`` kernels (numpy with numba)
    finds each window's maximum and the offset of its first maximum in one pass instead, and
    the forward's context carries that backward kernel.
    """

    pad_value = -math.inf

    def forward(self, x: Array, train: bool = False):
        self.check_input(x)
        xp = self.xp
        fast = self.backend.kernel("max_pool_forward")
        back = self.backend.kernel("max_pool_backward")
        found = None if fast is None or back is None else fast(
            to_channels_last(xp, x), self._k, self._s, self._pads)
        if found is not None:  # maxima and the offset of each first maximum, in one pass
            ycl, offsets = found
            return to_channels_first(xp, ycl), (None, (offsets, back), x.shape[0])
        cols = self._windows(x)  # [B, *O, K, C]
        ycl = cols[..., 0, :]
        for j in range(1, cols.shape[-2]):
            ycl = xp.maximum(ycl, cols[..., j, :])  # [B, *O, C]
        return to_channels_first(xp, ycl), (cols, ycl, x.shape[0])

    def backward(self, dy: Array, ctx) -> Array:
        cols, ycl, batch = ctx
        self.check_grad(dy, (batch, *self.output_shape))
        xp = self.xp
        if cols is None:  # the forward took max_pool_forward: the offsets and its backward
            offsets, back = ycl
            dxcl = back(to_channels_last(xp, dy), offsets, tuple(self.input_shape[1:]),
                        self._k, self._s, self._pads)
            return to_channels_first(xp, dxcl)
        dycl = xp.reshape(xp.reshape(to_channels_last(xp, dy), (-1,)), tuple(ycl.shape))
        taken = None
        parts = []
        for j in range(cols.shape[-2]):
            hit = cols[..., j, :] == ycl
            if taken is None:
                taken = hit
            else:
                hit = xp.logical_and(hit, xp.logical_not(taken))
                taken = xp.logical_or(taken, hit)
            parts.append(dycl * xp.astype(hit, dycl.dtype))
        return self._scatter(xp.stack(parts, axis=self.ndim + 1))


class AvgPoolND(_PoolND):
    """Mean over each window; zero padding counts in the divisor (PyTorch's default
    ``count_include_pad=True``), so every output divides by ``prod(kernel_size)``. A backend
    with the ``avg_pool_forward`` / ``avg_pool_backward`` kernels (numpy with numba) computes
    the means in one pass without gathering the windows."""

    def forward(self, x: Array, train: bool = False):
        self.check_input(x)
        xp = self.xp
        fast = self.backend.kernel("avg_pool_forward")
        back = self.backend.kernel("avg_pool_backward")
        ycl = None if fast is None or back is None else fast(
            to_channels_last(xp, x), self._k, self._s, self._pads)
        if ycl is not None:  # window means in one pass; the context carries the backward
            return to_channels_first(xp, ycl), (x.shape[0], back)
        cols = self._windows(x)
        return to_channels_first(xp, xp.mean(cols, axis=self.ndim + 1)), (x.shape[0], None)

    def backward(self, dy: Array, ctx) -> Array:
        batch, ctx = ctx
        self.check_grad(dy, (batch, *self.output_shape))
        xp = self.xp
        if ctx is not None:  # the forward took avg_pool_forward
            return to_channels_first(xp, ctx(to_channels_last(xp, dy),
                                             tuple(self.input_shape[1:]), self._k, self._s,
                                             self._pads))
        k = math.prod(self._k)
        share = xp.expand_dims(to_channels_last(xp, dy) * (1.0 / k), axis=self.ndim + 1)
        shape = (dy.shape[0], *self._out_spatial, k, dy.shape[1])
        return self._scatter(xp.broadcast_to(share, shape))


@register_layer
class MaxPool1D(MaxPoolND):
    """1-d max pooling: ``[B, C, L]`` → ``[B, C, L']`` (see :class:`MaxPoolND`)."""

    type_name = "max_pool1d"
    ndim = 1


@register_layer
class MaxPool2D(MaxPoolND):
    """2-d max pooling: ``[B, C, H, W]`` → ``[B, C, H', W']`` (see :class:`MaxPoolND`)."""

    type_name = "max_pool2d"
    ndim = 2


@register_layer
class AvgPool1D(AvgPoolND):
    """1-d average pooling: ``[B, C, L]`` → ``[B, C, L']`` (see :class:`AvgPoolND`)."""

    type_name = "avg_pool1d"
    ndim = 1


@register_layer
class AvgPool2D(AvgPoolND):
    """2-d average pooling: ``[B, C, H, W]`` → ``[B, C, H', W']`` (see :class:`AvgPoolND`)."""

    type_name = "avg_pool2d"
    ndim = 2


@register_layer
class GlobalAvgPool(Layer):
    """Mean over every spatial axis: ``[B, C, *S]`` → ``[B, C]`` (any number of axes ≥ 1)."""

    type_name = "global_avg_pool"
    float_input = True

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        if len(input_shape) < 2:
            raise ShapeError(f"{self.describe()} expects per-sample input [C, *spatial] with at "
                             f"least one spatial axis but the input shape is "
                             f"{list(input_shape)}")
        return (input_shape[0],)

    def forward(self, x: Array, train: bool = False):
        self.check_input(x)
        return self.xp.mean(x, axis=tuple(range(2, x.ndim))), x.shape[0]

    def backward(self, dy: Array, ctx) -> Array:
        self.check_grad(dy, (ctx, *self.output_shape))
        xp = self.xp
        spatial = self.input_shape[1:]
        share = xp.reshape(dy * (1.0 / math.prod(spatial)), tuple(dy.shape) + (1,) * len(spatial))
        return self.backend.zeros((dy.shape[0], *self.input_shape), dtype=dy.dtype) + share
