"""The numpy backend (CPU): array-api-compat's numpy namespace plus fast CPU kernels."""

from __future__ import annotations

import functools
import math

import numpy as np

from .allocator import tune_host_allocator
from .base import Backend, offset_slices, window_scatter_add_with
from .numba_kernels import (
    gather_padded,
    numba_enabled,
    numba_kernels,
    scatter_add_cropped,
    windows_compiled,
)
from .scratch import ScratchPool
from .window_matmul import make_window_matmul

#: Large temporaries of every numpy backend (and its dtype variants), recycled per thread.
SCRATCH = ScratchPool()
#: Matrix products with fewer output elements than this skip the scratch bookkeeping.
_SCRATCH_MIN_ITEMS = 1 << 16


def _window_gather(x, window: tuple[int, ...], stride: tuple[int, ...]):
    """Strided windows over the trailing ``len(window)`` axes (a read-only view).

    Shapes: ``x [*lead, *spatial]`` → ``[*lead, *out_spatial, *window]``.
    """
    n = len(window)
    view = np.lib.stride_tricks.sliding_window_view(x, window, axis=tuple(range(-n, 0)))
    index = (Ellipsis,) + tuple(slice(None, None, s) for s in stride) + (slice(None),) * n
    return view[index]


def _im2col(x, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
            out_shape: tuple[int, ...], out=None):
    """All kernel windows of a channels-last ``x`` copied into one contiguous array.

    Shapes: ``x [B, *S, C]`` → ``cols [B, *O, K, C]`` with ``K = prod(kernel)`` (offsets
    row-major), ``cols[b, o, j, c] = x[b, o·stride + offset_j·dilation, c]``. It is one copy
    from a strided view ``[B, *O, *kernel, C]`` of ``x``, except for one channel, where that
    copy's innermost runs would be ``kernel[-1]`` elements long: then it is one strided copy
    per kernel offset (measured about 3× faster for a 3×3 kernel). ``out`` (C-contiguous, of
    the result's shape and ``x``'s dtype) receives the windows instead of recycled memory.
    """
    reach = tuple((o - 1) * s + (k - 1) * d + 1
                  for o, k, s, d in zip(out_shape, kernel, stride, dilation))
    if any(r > n for r, n in zip(reach, x.shape[1:-1])):
        raise ValueError(f"windows {out_shape} of kernel {kernel} reach {reach}, beyond the "
                         f"input's spatial shape {tuple(x.shape[1:-1])}")
    shape = (x.shape[0], *out_shape, math.prod(kernel), x.shape[-1])
    cols = SCRATCH.empty(shape, x.dtype) if out is None else out
    if tuple(cols.shape) != shape or not cols.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous array of shape {shape}, "
                         f"got {tuple(cols.shape)}")
    if x.shape[-1] == 1:
        for j, spatial in enumerate(offset_slices(kernel, stride, dilation, out_shape)):
            cols[..., j, :] = x[(slice(None), *spatial)]
        return cols
    sb, *ss, sc = x.strides
    view = np.lib.stride_tricks.as_strided(
        x, (x.shape[0], *out_shape, *kernel, x.shape[-1]),
        (sb, *(a * s for a, s in zip(ss, stride)), *(a * d for a, d in zip(ss, dilation)), sc),
        writeable=False)
    np.copyto(cols.reshape(view.shape), view)
    return cols


def _add_into(view, part):
    np.add(view, part, out=view)


#: Elementwise rows of at least this many elements keep numpy's inner loops long.
_MIN_ROW = 256


def _wide_rows(x, width: int):
    """``x`` (C-contiguous, last axis ``width``) as a 2-D view ``[R, k·width]`` of ``k`` of its
    rows per row: the smallest power of two that makes a row ``_MIN_ROW`` elements long, as
    far as powers of two divide the row count. Returns ``(view, k)``."""
    rows = x.size // width
    k = 1
    while k * width < _MIN_ROW and rows % (2 * k) == 0:
        k *= 2
    return x.reshape(rows // k, k * width), k


def _relu_inplace(slope: float = 0.0, scale: float = 1.0):
    """``bias_act_inplace:<relu family>``: ``(x, bias | None) -> (x, x)``, overwriting ``x``.

    ``x += bias`` then ``x = max(scale·x, slope·scale·x)``; the same array serves as ``z`` and
    ``y``. Valid for the ReLU family only, whose derivative depends on the sign of ``z``
    alone, which the output keeps (``y > 0`` exactly where ``z > 0``).

    A C-contiguous ``x`` is processed as rows of at least 256 elements (:func:`_wide_rows`):
    the bias tiled to the row, ``max`` against a row of zeros. numpy's loops for a short
    broadcast bias (a convolution's 32 channels) and for ``maximum`` with a scalar are 1.8×
    and 2.2× slower than these on a ``[50176, 32]`` output (``docs/kernels.md``). The values
    are the same.
    """

    def kernel(x, bias=None):
        wide = (x.flags.c_contiguous and x.ndim >= 1 and x.size > 0
                and (bias is None or tuple(bias.shape) == (x.shape[-1],)))
        view, k = _wide_rows(x, x.shape[-1]) if wide else (x, 1)
        if bias is not None:
            np.add(view, np.tile(bias, k) if k > 1 else bias, out=view)
        if scale != 1.0:
            np.multiply(view, scale, out=view)
        if slope == 0.0:
            zero = _filled(view.shape[-1], 0.0, view.dtype) if wide else 0.0
            np.maximum(view, zero, out=view)
        else:
            np.maximum(view, view * slope, out=view)
        return x, x

    return kernel


def _relu_backward_inplace(scale: float = 1.0):
    """``act_backward_inplace:<relu|scaled_relu>``: ``(z, y, dy) -> dy`` overwritten with
    ``dz = dy·[z > 0]·scale`` (the same values as the reference ``dy * step(z) * scale``)."""

    def kernel(z, y, dy):
        mask = SCRATCH.empty(z.shape, np.bool_)
        np.greater(z, 0, out=mask)
        np.multiply(dy, mask, out=dy)
        if scale != 1.0:
            np.multiply(dy, scale, out=dy)
        return dy

    return kernel


def _adam_update(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """``adam_update``: one Adam (``decoupled=False``) or AdamW step, in place.

    The reference's arithmetic (``loomx.train.optim.Adam``) with ``out=`` and one recycled
    temporary instead of a fresh array per operation. ``m`` and ``v`` are updated in place;
    so is ``w`` unless it is read-only (a weight memory-mapped from a checkpoint), which is
    copied first. Returns the updated weight.
    """
    if not w.flags.writeable:
        w = np.array(w, copy=True)
    # half-precision weights: the step's arithmetic in float32 (eps = 1e-8 is 0 in float16,
    # and sqrt(v) + eps would divide by zero), the moments kept in the weight's dtype
    tmp = SCRATCH.empty(w.shape, np.promote_types(w.dtype, np.float32))
    if weight_decay and decoupled:
        w *= 1.0 - lr * weight_decay
    elif weight_decay:
        g = g + weight_decay * w
    m *= beta1
    np.multiply(g, 1.0 - beta1, out=tmp)
    m += tmp
    v *= beta2
    np.multiply(g, g, out=tmp)
    tmp *= 1.0 - beta2
    v += tmp
    np.sqrt(v, out=tmp)
    tmp /= math.sqrt(1.0 - beta2 ** step)
    tmp += eps
    np.divide(m, tmp, out=tmp)
    tmp *= lr / (1.0 - beta1 ** step)
    w -= tmp
    return w


@functools.lru_cache(maxsize=64)
def _filled(n: int, value: float, dtype: np.dtype) -> np.ndarray:
    """A cached read-only vector of ``n`` elements equal to ``value`` (ones for the BLAS
    column sums, a row of zeros for the ReLU kernels)."""
    row = np.full(n, value, dtype=dtype)
    row.flags.writeable = False
    return row


@functools.lru_cache(maxsize=256)
def _zeros_view(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A cached read-only view of ``shape`` zeros of ``dtype``, all strides 0 (one element in
    memory; shared safely, since nothing can write into it)."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def _sum_rows(a):
    """Sum of ``a [R, N]`` over its rows → ``[N]`` as ``ones [R] @ a`` (BLAS gemv).

    Several times faster than ``np.sum(a, axis=0)`` for tall matrices (the reduction runs in
    BLAS, not in numpy's strided add loop); integer and half-precision input use ``np.sum``.
    """
    if a.ndim != 2 or a.dtype not in (np.float32, np.float64):
        return np.sum(a, axis=0)
    return _filled(a.shape[0], 1.0, a.dtype) @ a


# Cephes ``ndtr.c`` rational approximations: erf(x) = x·T(x²)/U(x²) for |x| < 1, and
# erfc(x) = e^(-x²)·P(x)/Q(x) for 1 ≤ x < 8, e^(-x²)·R(x)/S(x) beyond (highest degree first).
_ERF_T = [9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3,
          7.00332514112805075473e3, 5.55923013010394962768e4]
_ERF_U = [1.0, 3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3,
          2.26290000613890934246e4, 4.92673942608635921086e4]
_ERFC_P = [2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0,
           4.86371970985681366614e1, 1.96520832956077098242e2, 5.26445194995477358631e2,
           9.34528527171957607540e2, 1.02755188689515710272e3, 5.57535335369399327526e2]
_ERFC_Q = [1.0, 1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2,
           9.75708501743205489753e2, 1.82390916687909736289e3, 2.24633760818710981792e3,
           1.65666309194161350182e3, 5.57535340817727675546e2]
_ERFC_R = [5.64189583547755073984e-1, 1.27536670759978104416e0, 5.01905042251180477414e0,
           6.16021097993053585195e0, 7.40974269950448939160e0, 2.97886665372100240670e0]
_ERFC_S = [1.0, 2.26052863220117276590e0, 9.39603524938001434673e0, 1.20489539808096656605e1,
           1.70814450747565897222e1, 9.60896809063285878198e0, 3.36907645100081516050e0]


def _erf(x: np.ndarray) -> np.ndarray:
    """Vectorised float64 erf (Cephes); NaN propagates, ±inf gives ±1."""
    a = np.abs(x)
    z = np.minimum(x * x, 1.0)
    small = x * np.polyval(_ERF_T, z) / np.polyval(_ERF_U, z)
    t = np.clip(a, 1.0, 30.0)
    erfc = np.exp(-t * t) * np.where(t < 8.0, np.polyval(_ERFC_P, t) / np.polyval(_ERFC_Q, t),
                                     np.polyval(_ERFC_R, t) / np.polyval(_ERFC_S, t))
    return np.where(a < 1.0, small, np.sign(x) * (1.0 - erfc))


class NumpyBackend(Backend):
    """numpy on the host CPU."""

    def erf(self, x):
        """The error function to float64 accuracy (|error| ≤ 3e-16), in the dtype of ``x``."""
        return _erf(np.asarray(x, dtype=np.float64)).astype(x.dtype, copy=False)

    def grad_zeros(self, like):
        """A read-only zero-stride view of one zero (writing into it raises ``ValueError``)."""
        return _zeros_view(like.dtype, like.shape)

    def scratch(self, shape, dtype=None):
        return SCRATCH.empty(tuple(shape), dtype or self.float_dtype)

    def scratch_matmul(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            return np.matmul(a, b)  # vector products: no bookkeeping
        shape = (a.shape[-2], b.shape[-1])
        if a.ndim > 2 or b.ndim > 2:
            shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + shape
        if math.prod(shape) < _SCRATCH_MIN_ITEMS:
            return np.matmul(a, b)  # small products: no bookkeeping
        return np.matmul(a, b, out=SCRATCH.empty(shape, np.result_type(a, b)))

    def contiguous_scratch(self, x):
        if x.flags.c_contiguous:
            return x, False
        out = SCRATCH.empty(x.shape, x.dtype)
        np.copyto(out, x)
        return out, True

    def clear_scratch(self) -> int:
        return SCRATCH.clear()

    def scatter_add(self, target, indices, values):
        """``np.add.at`` into a copy of ``target`` (duplicates add)."""
        out = np.array(target, copy=True)
        np.add.at(out, np.asarray(indices), np.asarray(values))
        return out

    def memory_info(self) -> dict:
        try:
            import psutil

            vm = psutil.virtual_memory()
            return {"used": vm.total - vm.available, "total": vm.total}
        except ImportError:
            return {"used": None, "total": None}


def make_numpy_backend(name: str = "numpy", index: int | None = None) -> NumpyBackend:
    """Build the numpy backend (``index`` must be ``None``: the host has one device)."""
    import array_api_compat.numpy as xp

    from loomx.errors import BackendUnavailableError

    if index not in (None, 0):
        raise BackendUnavailableError(f"numpy has only the 'cpu' device; got index {index}.")
    tune_host_allocator()
    kernels = {"window_gather": _window_gather,
               "im2col": _im2col,
               "window_scatter_add": window_scatter_add_with(_add_into),
               "sum_rows": _sum_rows,
               "adam_update": _adam_update,
               "bias_act_inplace:relu": _relu_inplace(),
               "bias_act_inplace:scaled_relu": _relu_inplace(scale=1.1),
               "bias_act_inplace:leaky_relu": _relu_inplace(0.01),
               "bias_act_inplace:loom_leaky_relu": _relu_inplace(0.1),
               "act_backward_inplace:relu": _relu_backward_inplace(),
               "act_backward_inplace:scaled_relu": _relu_backward_inplace(1.1)}
    if numba_enabled():
        kernels.update(numba_kernels(kernels))
        # chunks only where the compiled loops gather and scatter (with numpy's own gather and
        # scatter they were slower on 2 BLAS threads: 38.8 against 29.2 ms for the CNN
        # benchmark's step); other windows, or a numba that fails to import, take one chunk
        kernels.update(make_window_matmul(_im2col, kernels["window_scatter_add"], SCRATCH,
                                          windows_compiled, gather_padded,
                                          scatter_add_cropped))
    return NumpyBackend(name=name, xp=xp, device="cpu", library="numpy", kernels=kernels)
