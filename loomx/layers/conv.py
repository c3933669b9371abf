"""Convolutions over 1, 2 or 3 spatial axes, and their transposes, as gather + one matmul.

One generic N-d implementation serves every layer here (:mod:`loomx.layers._windows`):

- forward of ``ConvND``: view the input channels-last, pad, gather every kernel window
  (``cols [B·P, K·C]``, kept for the backward pass), then one matrix product with the weight
  viewed as ``[F, K·C]`` (one per group when ``groups > 1``);
- backward: ``dW`` by one matrix product of ``dz`` with the gathered windows, ``dx`` by the
  adjoint of the gather (scatter-add of ``dz·W``) and a crop of the padding;
- a backend with the ``window_matmul`` kernels (numpy with numba) runs the same products a few
  images at a time instead (``groups == 1``): the forward keeps the input, not the windows,
  and applies bias + ReLU chunk by chunk; the backward gathers the windows again;
- ``ConvTransposeND`` is the adjoint of ``ConvND``: its forward is the conv's input gradient and
  its input gradient is the conv's forward, with the same machinery.

Layouts follow PyTorch: input ``[B, C, *S]``, conv weight ``[F, C/groups, *k]``, transposed-conv
weight ``[C, F/groups, *k]``, bias ``[F]``. Outputs are ``[B, F, *O]`` arrays that are
channels-last in memory where the library has views (numpy, CuPy, PyTorch), so a following
convolution or pooling layer reads them without a copy.
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
from .activations import activation_backward, bias_activation, get_activation
from .base import Array, Layer, Shape, config_int, register_layer
from .base import as_int as _as_int
from .dense import sum_rows
from .init import init_weight

IntOrTuple = int | tuple[int, ...] | list[int]


def _ntuple(value, n: int, what: str, owner: str, minimum: int) -> tuple[int, ...]:
    """``int`` → ``(v,)*n``; a length-``n`` sequence of ints → tuple; else ConfigError."""
    single = _as_int(value)
    if single is not None:
        out = (single,) * n
    elif isinstance(value, (tuple, list)) and len(value) == n and all(
            _as_int(v) is not None for v in value):
        out = tuple(_as_int(v) for v in value)
    else:
        raise ConfigError(f"{owner} {what} must be an int or a list of {n} ints, got {value!r}")
    if any(v < minimum for v in out):
        where = " on every axis" if n > 1 else ""
        raise ConfigError(f"{owner} {what} must be >= {minimum}{where}, got {value!r}")
    return out


def _config_value(value):
    """Plain config value: sequences as tuples of ints (``get_config`` writes lists), integers
    as Python ints, anything else (``None``, padding strings) unchanged."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_int(v) if _as_int(v) is not None else v for v in value)
    single = _as_int(value)
    return value if single is None else single


def _split_groups(xp, a: Array, rows: int, k: int, groups: int) -> Array:
    """``a`` read as ``[rows, k, C]`` → ``[groups, rows, k·C/groups]`` (sizes spelled out,
    not ``-1``: an empty batch has no inferable axis)."""
    c = a.shape[-1]
    if groups == 1:
        return xp.reshape(a, (1, rows, k * c))
    a = xp.permute_dims(xp.reshape(a, (rows, k, groups, c // groups)), (2, 0, 1, 3))
    return xp.reshape(a, (groups, rows, k * c // groups))


def _merge_groups(xp, a: Array, k: int) -> Array:
    """Inverse of :func:`_split_groups`: ``[groups, rows, k·C/groups]`` → ``[rows, k, C]``."""
    groups, rows, per = a.shape[0], a.shape[1], a.shape[2] // k
    if groups == 1:
        return xp.reshape(a, (rows, k, per))
    a = xp.permute_dims(xp.reshape(a, (groups, rows, k, per)), (1, 2, 0, 3))
    return xp.reshape(a, (rows, k, groups * per))


def _weight_rows(xp, w: Array, groups: int) -> Array:
    """Weight ``[A, D, *k]`` → ``[groups, A/groups, K·D]`` (kernel offset major, like cols)."""
    a, d = w.shape[0], w.shape[1]
    w = xp.reshape(w, (groups, a // groups, d, -1))
    return xp.reshape(xp.permute_dims(w, (0, 1, 3, 2)), (groups, a // groups, -1))


def _weight_from_rows(xp, rows: Array, shape: tuple[int, ...]) -> Array:
    """Inverse of :func:`_weight_rows`: ``[groups, A/groups, K·D]`` → ``shape = [A, D, *k]``."""
    g, ag = rows.shape[0], rows.shape[1]
    rows = xp.reshape(rows, (g, ag, -1, shape[1]))
    return xp.reshape(xp.permute_dims(rows, (0, 1, 3, 2)), shape)


class _ConvBase(Layer):
    """Shared configuration of convolutions and transposed convolutions over ``ndim`` axes."""

    ndim: ClassVar[int] = 0
    float_input = True

    def __init__(self, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: IntOrTuple | str = 0, dilation: IntOrTuple = 1, groups: int = 1,
                 bias: bool = True, activation: str = "identity",
                 in_channels: int | None = None, **kw):
        super().__init__(**kw)
        owner = type(self).__name__
        n = self.ndim
        (out_channels,) = _ntuple(out_channels, 1, "out_channels", owner, 1)
        (groups,) = _ntuple(groups, 1, "groups", owner, 1)
        if out_channels % groups:
            raise ConfigError(f"{owner} out_channels={out_channels} is not divisible by "
                              f"groups={groups}: choose groups dividing both channel counts")
        self.out_channels = out_channels
        self.kernel_size = _config_value(kernel_size)
        self.stride = _config_value(stride)
        self.dilation = _config_value(dilation)
        self.groups = groups
        self.bias = bool(bias)
        self.activation = activation
        self.in_channels = config_int(in_channels, "in_channels", owner, optional=True)
        if self.in_channels is not None and self.in_channels % groups:
            raise ConfigError(f"{owner} in_channels={self.in_channels} is not divisible by "
                              f"groups={groups}: choose groups dividing both channel counts")
        self._k = _ntuple(self.kernel_size, n, "kernel_size", owner, 1)
        self._s = _ntuple(self.stride, n, "stride", owner, 1)
        self._d = _ntuple(self.dilation, n, "dilation", owner, 1)
        self._act = get_activation(activation)
        self.padding = padding.lower() if isinstance(padding, str) else _config_value(padding)

    def _check_in_channels(self, input_shape: Shape) -> int:
        n = self.ndim
        if len(input_shape) != n + 1:
            axes = ", ".join(["C"] + ["D", "H", "W"][3 - n:])
            raise ShapeError(f"{self.describe()} expects per-sample input [{axes}] "
                             f"({n} spatial axes) but the input shape is {list(input_shape)}")
        c = input_shape[0]
        if self.in_channels is not None and self.in_channels != c:
            raise ShapeError(f"{self.describe()} expected {self.in_channels} input channels "
                             f"but the input shape is {list(input_shape)}")
        if c % self.groups:
            raise ConfigError(f"{self.describe()}: {c} input channels are not divisible by "
                              f"groups={self.groups}")
        self.in_channels = c
        return c

    def _finish(self, zcl: Array) -> tuple[Array, Array]:
        """Channels-last pre-activation ``[B, *O, F]`` (a fresh array: the bias is added in
        place) → ``(z, y)`` as ``[B, F, *O]``."""
        zcl, ycl = bias_activation(self.backend, self._act, zcl,
                                   self.params["bias"] if self.bias else None, owned=True)
        return to_channels_first(self.xp, zcl), to_channels_first(self.xp, ycl)

    def _create_params(self, rng: RandomSource, scheme: str, weight_shape: Shape, fan_in: int,
                       fan_out: int) -> None:
        """``weight`` of ``weight_shape`` drawn with ``scheme``, and a zero ``bias [F]``."""
        dt = self.float_dtype
        self.params["weight"] = init_weight(rng, scheme, weight_shape, fan_in, fan_out, dt)
        if self.bias:
            self.params["bias"] = self.backend.zeros((self.out_channels,), dtype=dt)

    def _bias_grad(self, dzcl: Array) -> None:
        """Accumulate the bias gradient from a channels-last ``dz [B, *O, F]``."""
        if self.bias:
            xp = self.xp
            self._accumulate("bias", sum_rows(self.backend,
                                              xp.reshape(dzcl, (-1, dzcl.shape[-1]))))


class ConvND(_ConvBase):
    """N-d cross-correlation (PyTorch's ``convNd``), ``y = act(conv(x, W) + b)``.

    Shapes: ``x [B, C, *S]`` → ``y [B, F, *O]`` with, per axis,
    ``O = floor((S + pad_lo + pad_hi - dilation·(k-1) - 1) / stride) + 1``.

    Padding: an int or one int per axis (zeros on both sides), ``"valid"`` (none) or ``"same"``
    (``O = S``; stride 1 only; total ``dilation·(k-1)``, the odd extra on the high side, as in
    PyTorch). Parameters: ``weight [F, C/groups, *k]``, ``bias [F]``.
    ``init="he"`` is Loom's ``InitConv2DLayer``: N(0, sqrt(2 / (C/groups · prod(k)))), zero bias.
    """

    config_fields = ("out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "bias", "activation", "in_channels", "init")

    def __init__(self, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: IntOrTuple | str = 0, dilation: IntOrTuple = 1, groups: int = 1,
                 bias: bool = True, activation: str = "identity",
                 in_channels: int | None = None, init: str = "he", **kw):
        super().__init__(out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         activation, in_channels, **kw)
        self.init = init
        self._pads = self._resolve_padding()

    def _resolve_padding(self) -> tuple[tuple[int, int], ...]:
        owner, n, p = type(self).__name__, self.ndim, self.padding
        if p == "valid":
            return ((0, 0),) * n
        if p == "same":
            if any(s != 1 for s in self._s):
                raise ConfigError(f"{owner} padding='same' needs stride 1, got stride "
                                  f"{self.stride!r}: use an explicit padding for strided convs")
            totals = [d * (k - 1) for k, d in zip(self._k, self._d)]
            return tuple((t // 2, t - t // 2) for t in totals)
        if isinstance(p, str):
            raise ConfigError(f"{owner} padding must be an int, a list of {n} ints, 'same' or "
                              f"'valid', got {p!r}")
        return tuple((v, v) for v in _ntuple(p, n, "padding", owner, 0))

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        c = self._check_in_channels(input_shape)
        spatial = input_shape[1:]
        out = tuple(window_count(s + lo + hi, k, st, d) for s, (lo, hi), k, st, d
                    in zip(spatial, self._pads, self._k, self._s, self._d))
        if any(o < 1 for o in out):
            raise ShapeError(f"{self.describe()}: input {list(input_shape)} is smaller than the "
                             f"dilated kernel {list(self._k)} (dilation {list(self._d)}) after "
                             f"padding {list(self._pads)}; use a larger input or more padding")
        self._out_spatial = out
        k, g = math.prod(self._k), self.groups
        self._create_params(rng, self.init, (self.out_channels, c // g, *self._k),
                            (c // g) * k, self.out_channels * k)
        return (self.out_channels, *out)

    def forward(self, x: Array, train: bool = False):
        self.check_input(x)
        xp = self.xp
        k = math.prod(self._k)
        w = _weight_rows(xp, self.params["weight"], self.groups)  # [g, F/g, K·C/g]
        lead = (x.shape[0], *self._out_spatial)
        fused = self.backend.kernel("window_matmul") if self.groups == 1 else None
        if fused is not None:  # a few images at a time; the backward gathers them again
            xcl = to_channels_last(xp, x)
            args = (xcl, w[0, ...], self._k, self._s, self._d, self._pads, self._out_spatial)
            inplace = self.backend.kernel("bias_act_inplace:" + self._act.name)
            if inplace is None:
                z, y = self._finish(xp.reshape(fused(*args), (*lead, self.out_channels)))
                return y, (None, xcl, z, y)
            bias = self.params["bias"] if self.bias else None

            def bias_act(zc: Array) -> None:  # each chunk's rows, in place: z = y (ReLU family)
                out, _ = inplace(zc, bias)
                if out is not zc:
                    zc[...] = out

            z = fused(*args, epilogue=bias_act)
            z = to_channels_first(xp, xp.reshape(z, (*lead, self.out_channels)))
            return z, (None, xcl, z, z)
        xcl = pad_spatial(self.backend, to_channels_last(xp, x), self._pads)
        cols = gather_windows(self.backend, xcl, self._k, self._s, self._d)  # [B, *O, K, C]
        cols = _split_groups(xp, cols, math.prod(lead), k, self.groups)  # [g, B·P, K·C/g]
        z = _merge_groups(xp, self.backend.scratch_matmul(cols, xp.matrix_transpose(w)),
                          1)  # [B·P, 1, F]
        z, y = self._finish(xp.reshape(z, (*lead, self.out_channels)))
        return y, (cols, None, z, y)

    def _window_grads(self, dz2: Array, batch: int, k: int) -> Array:
        """Gradient of the gathered windows, ``dz2 [g, B·P, F/g]`` → ``[B, *O, K, C]``.

        Without groups it is computed kernel-offset major (``[K, B·P, C]``, one batched matrix
        product) and returned as a permuted view, so that the scatter-add reads each offset's
        slice contiguously (measured 1.6× faster scatter on numpy).
        """
        xp, n, c = self.xp, self.ndim, self.in_channels
        lead = (batch, *self._out_spatial)
        if self.groups == 1:
            w = self.params["weight"]
            wk = xp.permute_dims(xp.reshape(w, (w.shape[0], c, k)), (2, 0, 1))  # [K, F, C]
            dk = xp.reshape(self.backend.scratch_matmul(dz2[0, ...], wk),
                            (k, *lead, c))  # [K, B, *O, C]
            return xp.permute_dims(dk, tuple(range(1, n + 2)) + (0, n + 2))
        w = _weight_rows(xp, self.params["weight"], self.groups)
        dcols = _merge_groups(xp, xp.matmul(dz2, w), k)  # [B·P, K, C]
        return xp.reshape(dcols, (*lead, k, c))

    def backward(self, dy: Array, ctx, need_input_grad: bool = True) -> Array | None:
        cols, xcl, z, y = ctx
        self.check_grad(dy, y.shape)
        xp = self.xp
        g, k = self.groups, math.prod(self._k)
        rows = dy.shape[0] * math.prod(self._out_spatial)
        # work channels-last: z and y already are in memory; dy is copied once if it is not
        # (into recycled memory on numpy), and that copy then receives dz in place
        dycl, owned = self.backend.contiguous_scratch(to_channels_last(xp, dy))
        dzcl = activation_backward(self.backend, self._act, to_channels_last(xp, z),
                                   to_channels_last(xp, y), dycl, owned=owned)
        self._bias_grad(dzcl)
        dz2 = _split_groups(xp, dzcl, rows, 1, g)  # [g, B·P, F/g]
        wshape = tuple(self.params["weight"].shape)
        fused = self.backend.kernel("window_matmul_backward") if cols is None else None
        if fused is not None:  # the forward took the backend's window_matmul kernel
            w = _weight_rows(xp, self.params["weight"], 1)
            dw, dxcl = fused(xcl, dz2[0, ...], w[0, ...], self._k, self._s, self._d,
                             self._pads, self._out_spatial, need_input_grad)
            self._accumulate("weight", _weight_from_rows(xp, dw[None, ...], wshape))
            return None if dxcl is None else to_channels_first(xp, dxcl)
        if cols is None:  # the backend's kernels went away since the forward: gather here
            xpad = pad_spatial(self.backend, xcl, self._pads)
            cols = _split_groups(xp, gather_windows(self.backend, xpad, self._k, self._s,
                                                    self._d), rows, k, g)
        if cols.shape[-1] < dz2.shape[-1]:  # few window columns (e.g. one input channel):
            # colsᵀ·dz is the faster order for BLAS there (measured 0.64 vs 0.94 ms, conv 1→32)
            dw = xp.matrix_transpose(xp.matmul(xp.matrix_transpose(cols), dz2))
        else:
            dw = xp.matmul(xp.matrix_transpose(dz2), cols)  # [g, F/g, K·C/g]
        self._accumulate("weight", _weight_from_rows(xp, dw, wshape))
        if not need_input_grad:
            return None
        dcols = self._window_grads(dz2, dy.shape[0], k)
        padded = tuple(s + lo + hi for s, (lo, hi) in zip(self.input_shape[1:], self._pads))
        dxcl = scatter_windows(self.backend, dcols, padded, self._k, self._s, self._d)
        return to_channels_first(xp, crop_spatial(dxcl, self._pads))


class ConvTransposeND(_ConvBase):
    """N-d transposed convolution (PyTorch's ``conv_transposeNd``): the adjoint of ``ConvND``.

    Shapes: ``x [B, C, *S]`` → ``y [B, F, *O]`` with, per axis,
    ``O = (S - 1)·stride - 2·padding + dilation·(k-1) + output_padding + 1``.
    ``output_padding`` (smaller than stride or dilation) adds zeros' worth of extent on the high
    side so that strided convs can be inverted to every input size.
    Parameters: ``weight [C, F/groups, *k]``, ``bias [F]``; initialised
    N(0, sqrt(2 / (C/groups · prod(k)))), zero bias.
    """

    config_fields = ("out_channels", "kernel_size", "stride", "padding", "output_padding",
                     "dilation", "groups", "bias", "activation", "in_channels")

    def __init__(self, out_channels: int, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
                 padding: IntOrTuple = 0, output_padding: IntOrTuple = 0,
                 dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 activation: str = "identity", in_channels: int | None = None, **kw):
        super().__init__(out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         activation, in_channels, **kw)
        owner, n = type(self).__name__, self.ndim
        if isinstance(self.padding, str):
            raise ConfigError(f"{owner} padding must be an int or a list of {n} ints, "
                              f"got {self.padding!r}")
        self.output_padding = _config_value(output_padding)
        self._p = _ntuple(self.padding, n, "padding", owner, 0)
        self._op = _ntuple(self.output_padding, n, "output_padding", owner, 0)
        for op, s, d in zip(self._op, self._s, self._d):
            if op >= max(s, d):
                raise ConfigError(f"{owner} output_padding {self.output_padding!r} must be "
                                  f"smaller than stride {self.stride!r} or dilation "
                                  f"{self.dilation!r} on every axis")
        self._pads = tuple((p, p) for p in self._p)

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        c = self._check_in_channels(input_shape)
        spatial = input_shape[1:]
        out = tuple((s - 1) * st - 2 * p + d * (k - 1) + op + 1 for s, st, p, d, k, op
                    in zip(spatial, self._s, self._p, self._d, self._k, self._op))
        if any(o < 1 for o in out):
            raise ShapeError(f"{self.describe()}: input {list(input_shape)} gives an empty "
                             f"output {list(out)} with padding {list(self._p)}; reduce padding")
        self._out_spatial = out
        k, g = math.prod(self._k), self.groups
        self._create_params(rng, "he", (c, self.out_channels // g, *self._k), (c // g) * k,
                            self.out_channels * k)
        return (self.out_channels, *out)

    def forward(self, x: Array, train: bool = False):
        self.check_input(x)
        xp = self.xp
        g, k = self.groups, math.prod(self._k)
        spatial = self.input_shape[1:]
        rows = x.shape[0] * math.prod(spatial)
        x2 = _split_groups(xp, to_channels_last(xp, x), rows, 1, g)  # [g, B·P, C/g]
        w = _weight_rows(xp, self.params["weight"], g)  # [g, C/g, K·F/g]
        cols = _merge_groups(xp, xp.matmul(x2, w), k)  # [B·P, K, F]
        cols = xp.reshape(cols, (x.shape[0], *spatial, k, self.out_channels))
        padded = tuple(o + 2 * p for o, p in zip(self._out_spatial, self._p))
        zcl = scatter_windows(self.backend, cols, padded, self._k, self._s, self._d)
        z, y = self._finish(crop_spatial(zcl, self._pads))
        return y, (x2, z, y)

    def backward(self, dy: Array, ctx, need_input_grad: bool = True) -> Array | None:
        x2, z, y = ctx
        self.check_grad(dy, y.shape)
        xp = self.xp
        g, k = self.groups, math.prod(self._k)
        spatial = self.input_shape[1:]
        dzcl = activation_backward(self.backend, self._act, to_channels_last(xp, z),
                                   to_channels_last(xp, y), to_channels_last(xp, dy))
        self._bias_grad(dzcl)
        dzcl = pad_spatial(self.backend, dzcl, self._pads)
        cols = gather_windows(self.backend, dzcl, self._k, self._s, self._d,
                              out_shape=spatial)  # [B, *S, K, F]
        cols = _split_groups(xp, cols, x2.shape[1], k, g)  # [g, B·P, K·F/g]
        dw = xp.matmul(xp.matrix_transpose(x2), cols)  # [g, C/g, K·F/g]
        self._accumulate("weight", _weight_from_rows(xp, dw, tuple(self.params["weight"].shape)))
        if not need_input_grad:
            return None
        w = _weight_rows(xp, self.params["weight"], g)
        dx = _merge_groups(xp, xp.matmul(cols, xp.matrix_transpose(w)), 1)  # [B·P, 1, C]
        return to_channels_first(xp, xp.reshape(dx, (dy.shape[0], *spatial, self.in_channels)))


@register_layer
class Conv1D(ConvND):
    """1-d convolution: ``[B, C, L]`` → ``[B, F, L']`` (see :class:`ConvND`)."""

    type_name = "conv1d"
    ndim = 1


@register_layer
class Conv2D(ConvND):
    """2-d convolution: ``[B, C, H, W]`` → ``[B, F, H', W']`` (see :class:`ConvND`)."""

    type_name = "conv2d"
    ndim = 2


@register_layer
class Conv3D(ConvND):
    """3-d convolution: ``[B, C, D, H, W]`` → ``[B, F, D', H', W']`` (see :class:`ConvND`)."""

    type_name = "conv3d"
    ndim = 3


@register_layer
class ConvTranspose1D(ConvTransposeND):
    """1-d transposed convolution: ``[B, C, L]`` → ``[B, F, L']`` (see :class:`ConvTransposeND`)."""

    type_name = "conv_transpose1d"
    ndim = 1


@register_layer
class ConvTranspose2D(ConvTransposeND):
    """2-d transposed convolution: ``[B, C, H, W]`` → ``[B, F, H', W']``."""

    type_name = "conv_transpose2d"
    ndim = 2
