"""A convolution's window products and pooling on PyTorch tensors, through ATen's own ops.

The reference convolution (:mod:`loomx.layers.conv`) gathers every kernel window into
``cols [B·P, K·C]`` and multiplies; PyTorch's ``aten.convolution`` (oneDNN on the CPU, cuDNN on
CUDA) computes the same products without the window array, and ``aten.convolution_backward``
both gradients in one call. Same contracts as the numpy and CuPy kernels (``docs/kernels.md``):

- ``window_matmul(x [B, *S, C], w [F, K·C], kernel, stride, dilation, pads, out_shape,
  epilogue=None) -> z [B·P, F]``: ``x`` is viewed channels-first (free for a channels-last view
  of channels-first data, the convolutions' case), ``w`` as ``[F, C, *kernel]``; unequal front
  and back padding is applied with ``F.pad`` first;
- ``window_matmul_backward(x, dz [B·P, F], w, ..., need_input_grad) -> (dw [F, K·C],
  dx [B, *S, C] | None)``.

Mixed dtypes are computed in the promoted dtype and returned in the reference's dtypes.

Max and average pooling of 1 or 2 spatial axes (``max_pool_forward`` / ``_backward``,
``avg_pool_forward`` / ``_backward``) are ``aten.max_pool2d_with_indices`` and
``aten.avg_pool2d`` and their backward ops, where the padding is symmetric and at most half
the kernel (ATen's limits); elsewhere the forward kernels return ``None`` and the layer takes
its reference path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention

from .base import check_window_reach
from .torch_precision import full_float32

_aten = torch.ops.aten

#: these kernels take the whole batch at once (the kernel checks run no chunked variant)
CHUNKED = False


def _channels_first(a, n: int):
    """``[B, *S, C]`` → ``[B, C, *S]`` (a view)."""
    return a.permute(0, n + 1, *range(1, n + 1))


def _channels_last(a, n: int):
    """``[B, C, *S]`` → ``[B, *S, C]`` (a view)."""
    return a.permute(0, *range(2, n + 2), 1)


class _Conv:
    """One call's operands in ATen's layout: the (padded) channels-first input, the
    ``[F, C, *kernel]`` weight and ATen's symmetric padding."""

    def __init__(self, x, w, kernel, stride, dilation, pads, out_shape, dtype):
        n = len(kernel)
        if x.ndim != n + 2:
            raise ValueError(f"window_matmul expects x [B, *S, C] with {n} spatial axes, got "
                             f"{tuple(x.shape)}")
        check_window_reach(tuple(x.shape[1:-1]), tuple(kernel), tuple(stride), tuple(dilation),
                           tuple(pads), tuple(out_shape))
        self.n, self.pads, self.out_shape = n, tuple(pads), tuple(out_shape)
        self.stride, self.dilation = list(stride), list(dilation)
        channels = x.shape[-1]
        self.weight = _channels_first(w.to(dtype).reshape(w.shape[0], *kernel, channels), n)
        xcf = _channels_first(x.to(dtype), n)
        self.symmetric = all(lo == hi for lo, hi in pads)
        if self.symmetric:
            self.input, self.padding = xcf, [lo for lo, _ in pads]
        else:  # F.pad lists the last axis first
            flat = [p for lo_hi in reversed(self.pads) for p in lo_hi]
            self.input, self.padding = F.pad(xcf, flat), [0] * n
        self.full = tuple((m + 2 * p - d * (k - 1) - 1) // s + 1 for m, p, k, s, d in zip(
            self.input.shape[2:], self.padding, kernel, stride, dilation))

    def crop(self, a):
        """The first ``out_shape`` positions of ``a [B, F, *full]``."""
        if self.full == self.out_shape:
            return a
        return a[(slice(None), slice(None), *(slice(0, o) for o in self.out_shape))]

    def uncrop(self, a):
        """``a [B, F, *out_shape]`` in zeros of ``[B, F, *full]``."""
        if self.full == self.out_shape:
            return a
        out = a.new_zeros((*a.shape[:2], *self.full))
        out[(slice(None), slice(None), *(slice(0, o) for o in self.out_shape))] = a
        return out


def window_matmul(x, w, kernel, stride, dilation, pads, out_shape, epilogue=None):
    """``window_matmul``: ``z [B·P, F] = gather(pad(x)) · wᵀ``; ``epilogue(z)`` runs on the
    rows after the product."""
    dtype = torch.promote_types(x.dtype, w.dtype)
    conv = _Conv(x, w, kernel, stride, dilation, pads, out_shape, dtype)
    with full_float32(conv.input):
        y = conv.crop(_aten.convolution(conv.input, conv.weight, None, conv.stride,
                                        conv.padding, conv.dilation, False, [0] * conv.n, 1))
    z = _channels_last(y, conv.n).reshape(-1, w.shape[0])
    if epilogue is not None:
        epilogue(z)
    return z


def window_matmul_backward(x, dz, w, kernel, stride, dilation, pads, out_shape,
                           need_input_grad=True):
    """``window_matmul_backward``: ``(dw [F, K·C], dx [B, *S, C] | None)``."""
    batch, filters = x.shape[0], w.shape[0]
    if tuple(dz.shape) != (batch * math.prod(out_shape), filters):
        raise ValueError(f"dz has shape {tuple(dz.shape)}; the windows of x {tuple(x.shape)} "
                         f"need ({batch * math.prod(out_shape)}, {filters})")
    dtype = torch.promote_types(torch.promote_types(x.dtype, w.dtype), dz.dtype)
    conv = _Conv(x, w, kernel, stride, dilation, pads, out_shape, dtype)
    grad = conv.uncrop(_channels_first(dz.to(dtype).reshape(batch, *out_shape, filters),
                                       conv.n))
    with full_float32(conv.input):
        dx, dw, _ = _aten.convolution_backward(
            grad, conv.input, conv.weight, None, conv.stride, conv.padding, conv.dilation,
            False, [0] * conv.n, 1, [bool(need_input_grad), True, False])
    dw = _channels_last(dw, conv.n).reshape(filters, -1).to(torch.result_type(dz, x))
    if not need_input_grad:
        return dw, None
    if not conv.symmetric:  # the gradient of F.pad: the interior
        dx = dx[(slice(None), slice(None),
                 *(slice(lo, lo + m) for (lo, _), m in zip(conv.pads, x.shape[1:-1])))]
    return dw, _channels_last(dx, conv.n).to(torch.result_type(dz, w))


# ---------------------------------------------------------------------- pooling
def _to_aten_2d(a, n: int):
    """The kernels' ``[B, *S, C]`` as ATen's 2-d pooling layout ``[B, C, H, W]`` (a view; 1-d
    over a unit axis)."""
    a = _channels_first(a, n)
    return a.unsqueeze(2) if n == 1 else a


def _from_aten_2d(a, n: int):
    """ATen's ``[B, C, H, W]`` as the kernels' ``[B, *S, C]`` (a view)."""
    return _channels_last(a.squeeze(2) if n == 1 else a, n)


def _pool_args(kernel, stride, pads) -> tuple[list[int], list[int], list[int]]:
    """ATen's 2-d ``(kernel, stride, padding)`` of a 1-d (over a unit axis) or 2-d window."""
    if len(kernel) == 1:
        return [1, *kernel], [1, *stride], [0, pads[0][0]]
    return list(kernel), list(stride), [lo for lo, _ in pads]


def _pool_case(x, kernel, stride, pads) -> bool:
    """Whether ATen's pooling takes these windows: 1 or 2 spatial axes of a float ``x`` and
    symmetric padding of at most half the kernel."""
    n = len(kernel)
    return (n in (1, 2) and x.ndim == n + 2 and x.is_floating_point()
            and all(lo == hi and 2 * lo <= k for (lo, hi), k in zip(pads, kernel)))


def _backward_args(dy, spatial, kernel, stride, pads):
    """``(grad, like, kernel, stride, padding)`` of ATen's pooling backward: ``dy`` in ATen's
    layout and an uninitialised input of ``spatial`` size in ``dy``'s dtype (ATen reads only
    its shape, and ``dx`` takes its dtype, as on the reference path)."""
    n = len(kernel)
    grad = _to_aten_2d(dy, n)
    like = grad.new_empty((*grad.shape[:2], *([1] if n == 1 else []), *spatial))
    return (grad, like, *_pool_args(kernel, stride, pads))


def max_pool_forward(x, kernel, stride, pads):
    """``max_pool_forward``: ``(x [B, *S, C], kernel, stride, pads) -> (y [B, *O, C], idx)``
    through ``aten.max_pool2d_with_indices`` (padding as ``-inf``, the first maximum of a
    window taking its gradient, as the reference); ``idx`` is ATen's indices, private to
    :func:`max_pool_backward`. ``None`` outside ATen's case (see :func:`_pool_case`)."""
    if not _pool_case(x, kernel, stride, pads):
        return None
    y, indices = _aten.max_pool2d_with_indices(_to_aten_2d(x, len(kernel)),
                                               *_pool_args(kernel, stride, pads), [1, 1], False)
    return _from_aten_2d(y, len(kernel)), indices


def max_pool_backward(dy, idx, spatial, kernel, stride, pads):
    """``max_pool_backward``: ``(dy [B, *O, C], idx, spatial, kernel, stride, pads) ->
    dx [B, *spatial, C]``, each gradient at its window's first maximum."""
    dx = _aten.max_pool2d_with_indices_backward(
        *_backward_args(dy, spatial, kernel, stride, pads), [1, 1], False, idx)
    return _from_aten_2d(dx, len(kernel))


def avg_pool_forward(x, kernel, stride, pads):
    """``avg_pool_forward``: ``(x [B, *S, C], kernel, stride, pads) -> y [B, *O, C]``, window
    means with the padding counted in the divisor (``aten.avg_pool2d``); ``None`` outside
    ATen's case."""
    if not _pool_case(x, kernel, stride, pads):
        return None
    y = _aten.avg_pool2d(_to_aten_2d(x, len(kernel)), *_pool_args(kernel, stride, pads), False,
                         True, None)
    return _from_aten_2d(y, len(kernel))


def avg_pool_backward(dy, spatial, kernel, stride, pads):
    """``avg_pool_backward``: ``(dy [B, *O, C], spatial, kernel, stride, pads) ->
    dx [B, *spatial, C]``, each window's share of its gradient at every position it covers."""
    dx = _aten.avg_pool2d_backward(*_backward_args(dy, spatial, kernel, stride, pads), False,
                                   True, None)
    return _from_aten_2d(dx, len(kernel))
