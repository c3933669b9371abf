"""A convolution's window products on CuPy: one gather kernel and one adjoint kernel.

The reference convolution (:mod:`loomx.layers.conv`) pads its input, takes a strided window
view, copies it into ``cols [B·P, K·C]`` and, in the backward pass, zeroes a padded gradient,
adds each kernel offset's slice into it (one launch per offset) and crops it: on a GPU some
twenty launches per convolution, each costing the host more than the device. Here:

- ``window_matmul(x [B, *S, C], w [F, K·C], kernel, stride, dilation, pads, out_shape,
  epilogue=None) -> z [B·P, F]``: one elementwise kernel writes the windows of the unpadded
  input (zeros where a window reaches into the padding), one product multiplies them, and
  ``epilogue(z_rows)`` runs on the rows right after (bias + ReLU, in place);
- ``window_matmul_backward(x, dz [B·P, F], w, ..., need_input_grad) -> (dw [F, K·C],
  dx [B, *S, C] | None)``: the windows are gathered again (the forward keeps none), ``dw =
  dzᵀ·cols``, and ``dx`` is computed element by element from ``dz·w``: every input position
  sums, in kernel-offset order, the window gradients that read it (no atomics, and the
  reference scatter's order of additions; the window gradients themselves come from one
  product where the reference makes one per kernel offset, which cuBLAS may round
  differently).

1, 2 and 3 spatial axes are all handled as 3 (leading axes of size 1). The batch is split into
chunks whose windows take at most ``CHUNK_BYTES`` (one chunk for the benchmark's CNN at batch
512), which bounds the memory of the windows for large batches; the weight gradient is then
a sum of per-chunk products.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from .base import check_window_reach

#: Most bytes of windows gathered at once; larger batches run in several chunks.
CHUNK_BYTES = 256 << 20

def _unravel(*axes: str) -> str:
    """CUDA lines splitting the flat index ``i`` over ``axes`` (``"ch:C"``: variable ``ch``
    of extent ``C``), innermost first; ``r`` is left holding the image index."""
    lines = ["I r = (I)i;"]
    for axis in axes:
        name, extent = axis.split(":")
        lines.append(f"const I {name} = r % {extent}; r /= {extent};")
    return "\n".join(lines) + "\n"


_DECODE_WINDOW = _unravel("ch:C", "k3:K3", "k2:K2", "k1:K1", "o3:O3", "o2:O2", "o1:O1") + """\
const I h1 = o1 * s1 + k1 * d1 - p1;
const I h2 = o2 * s2 + k2 * d2 - p2;
const I h3 = o3 * s3 + k3 * d3 - p3;
const bool inside = h1 >= 0 && h1 < S1 && h2 >= 0 && h2 < S2 && h3 >= 0 && h3 < S3;
cols = inside ? x[(((r * S1 + h1) * S2 + h2) * S3 + h3) * C + ch] : (T)0;
"""

_SCATTER_WINDOWS = _unravel("ch:C", "h3:S3", "h2:S2", "h1:S1") + """\
T acc = (T)0;
for (I k1 = 0; k1 < K1; ++k1) {
    const I t1 = h1 + p1 - k1 * d1;
    if (t1 < 0 || t1 % s1 != 0 || t1 / s1 >= O1) continue;
    for (I k2 = 0; k2 < K2; ++k2) {
        const I t2 = h2 + p2 - k2 * d2;
        if (t2 < 0 || t2 % s2 != 0 || t2 / s2 >= O2) continue;
        for (I k3 = 0; k3 < K3; ++k3) {
            const I t3 = h3 + p3 - k3 * d3;
            if (t3 < 0 || t3 % s3 != 0 || t3 / s3 >= O3) continue;
            const I row = ((r * O1 + t1 / s1) * O2 + t2 / s2) * O3 + t3 / s3;
            acc += dcols[((row * K1 + k1) * K2 + k2) * K3 * C + k3 * C + ch];
        }
    }
}
dx = acc;
"""

#: the geometry, all of the index type ``I`` (int32 where every index fits, else int64)
_GEOMETRY = ("S1", "S2", "S3", "C", "O1", "O2", "O3", "K1", "K2", "K3", "s1", "s2", "s3",
             "d1", "d2", "d3", "p1", "p2", "p3")
_INDEX_CTYPES = {"int32": "int", "int64": "long long"}


@functools.lru_cache(maxsize=128)
def _kernels(index: str, geometry: tuple[int, ...]):
    """The gather and scatter kernels of one geometry, with ``index`` (``"int32"`` or
    ``"int64"``) indices.

    The geometry is compiled in as constants: the index arithmetic is a chain of divisions,
    and a division by a constant is a multiply and a shift where one by a run-time value is a
    long instruction sequence (the gather of benchmark b's second convolution was bound by
    it). Each geometry is compiled once (CuPy keeps the binaries on disk); the most recent 128
    stay loaded, so inputs of ever-changing sizes recompile, or load from disk, as they come.
    """
    import cupy

    head = f"typedef {_INDEX_CTYPES[index]} I;\n" + "".join(
        f"const I {name} = {int(value)};\n" for name, value in zip(_GEOMETRY, geometry))
    gather = cupy.ElementwiseKernel("raw T x", "T cols", head + _DECODE_WINDOW,
                                    f"loomx_window_gather_{index}")
    scatter = cupy.ElementwiseKernel("raw T dcols", "T dx", head + _SCATTER_WINDOWS,
                                     f"loomx_window_scatter_{index}")
    return gather, scatter


@dataclass(frozen=True)
class _Plan:
    """The geometry of a call, as three spatial axes, and its chunking."""

    geometry: tuple[int, ...]
    positions: int
    width: int
    step: int
    index: str

    def chunks(self, batch: int) -> list[tuple[int, int]]:
        """``(start, stop)`` image ranges of the chunks."""
        return [(a, min(batch, a + self.step)) for a in range(0, batch, self.step)]

    def gather(self, xc, out):
        """The windows of the contiguous images ``xc [m, *S, C]`` into ``out [m·P, K·C]``."""
        _kernels(self.index, self.geometry)[0](xc, out)
        return out

    def scatter(self, dcols, dx) -> None:
        """``dx [m, *S, C]`` (contiguous, overwritten) from the window gradients
        ``dcols [m·P, K·C]`` (contiguous)."""
        _kernels(self.index, self.geometry)[1](dcols, dx)


def _plan(x, kernel, stride, dilation, pads, out_shape) -> _Plan:
    return _plan_for(tuple(x.shape), x.dtype.itemsize, tuple(kernel), tuple(stride),
                     tuple(dilation), tuple(tuple(p) for p in pads), tuple(out_shape),
                     CHUNK_BYTES)


@functools.lru_cache(maxsize=256)
def _plan_for(shape, itemsize, kernel, stride, dilation, pads, out_shape, chunk_bytes) -> _Plan:
    n = len(kernel)
    if not 1 <= n <= 3:
        raise ValueError(f"window_matmul takes 1 to 3 spatial axes; got kernel {kernel}")
    spatial = shape[1:-1]
    check_window_reach(spatial, kernel, stride, dilation, pads, out_shape)
    one = (1,) * (3 - n)
    geometry = (*(one + spatial), shape[-1], *(one + out_shape), *(one + kernel),
                *(one + stride), *(one + dilation), *((0,) * (3 - n) + tuple(lo for lo, _ in pads)))
    positions, width, batch = math.prod(out_shape), math.prod(kernel) * shape[-1], shape[0]
    step = max(1, min(batch, chunk_bytes // max(1, positions * width * itemsize)))
    largest = max(math.prod(shape), step * positions * width)
    return _Plan(geometry, positions, width, step, "int32" if largest < 2**31 - 1 else "int64")


def window_matmul(x, w, kernel, stride, dilation, pads, out_shape, epilogue=None):
    """``window_matmul``: ``z [B·P, F] = gather(pad(x)) · wᵀ`` for ``x [B, *S, C]`` (any
    strides) and ``w [F, K·C]``; ``epilogue(z_rows)`` runs on each chunk's rows after their
    product."""
    import cupy

    win = _plan(x, kernel, stride, dilation, pads, out_shape)
    batch, positions = x.shape[0], win.positions
    xc = cupy.ascontiguousarray(x)
    z = cupy.empty((batch * positions, w.shape[0]), dtype=cupy.result_type(x, w))
    cols = cupy.empty((min(batch, win.step) * positions, win.width), dtype=x.dtype)
    wt = w.T
    for start, stop in win.chunks(batch):
        rows = z[start * positions:stop * positions]
        cupy.matmul(win.gather(xc[start:stop], cols[:(stop - start) * positions]), wt,
                    out=rows)
        if epilogue is not None:
            epilogue(rows)
    return z


def window_matmul_backward(x, dz, w, kernel, stride, dilation, pads, out_shape,
                           need_input_grad=True):
    """``window_matmul_backward``: ``(dw [F, K·C] = dzᵀ·gather(pad(x)), dx [B, *S, C] =
    crop(scatter(dz·w)) | None)``, in the reference's dtypes."""
    import cupy

    win = _plan(x, kernel, stride, dilation, pads, out_shape)
    batch, positions = x.shape[0], win.positions
    if tuple(dz.shape) != (batch * positions, w.shape[0]):
        raise ValueError(f"dz has shape {tuple(dz.shape)}; the windows of x {tuple(x.shape)} "
                         f"need ({batch * positions}, {w.shape[0]})")
    xc = cupy.ascontiguousarray(x)
    cols = cupy.empty((min(batch, win.step) * positions, win.width), dtype=x.dtype)
    dx = (cupy.empty(tuple(x.shape), dtype=cupy.result_type(dz, w)) if need_input_grad
          else None)
    dw = None
    for start, stop in win.chunks(batch):
        rows = slice(start * positions, stop * positions)
        windows = win.gather(xc[start:stop], cols[:(stop - start) * positions])
        part = cupy.matmul(dz[rows].T, windows)
        dw = part if dw is None else cupy.add(dw, part, out=dw)
        if dx is not None:
            win.scatter(cupy.matmul(dz[rows], w), dx[start:stop])
    if dw is None:  # an empty batch
        dw = cupy.zeros((w.shape[0], win.width), dtype=cupy.result_type(dz, x))
    return dw, dx
