"""A convolution's window products on the numpy backend, a few images at a time.

The reference convolution (:mod:`loomx.layers.conv`) pads its input, gathers every kernel
window of the whole batch into one array ``cols [B·P, K·C]`` (K kernel offsets, C channels, P
output positions), keeps it for the backward pass, and multiplies; the input gradient is the
whole ``dz·W`` product ``[B·P, K·C]``, scattered back into a padded array and cropped. The
window arrays are K times the size of the input (9× for a 3×3 kernel: 14 MB for the CNN
benchmark's second convolution), so every pass over them runs at memory speed, and the memory
they hold grows with the batch.

These kernels do the same products a few images at a time: the windows of a chunk of about
``CHUNK_BYTES`` are gathered (the padding folded in), multiplied while they are still in the
core's cache, and dropped; the backward pass gathers them again instead of keeping them, and
scatters each chunk's window gradients as soon as its product is done, straight into the
unpadded input gradient. The results are the reference's up to rounding: the weight
gradient is a sum of per-chunk products instead of one product, and BLAS may round products
of other shapes differently.

- ``window_matmul``: ``(x [B, *S, C], w [F, K·C], kernel, stride, dilation, pads, out_shape,
  epilogue=None) -> z [B·P, F]`` with ``z = gather(pad(x)) · wᵀ``; ``epilogue(z_chunk)``, when
  given, runs on each chunk's rows right after their product (in place: bias + ReLU);
- ``window_matmul_backward``: ``(x, dz [B·P, F], w, kernel, stride, dilation, pads,
  out_shape, need_input_grad) -> (dw [F, K·C], dx [B, *S, C] | None)`` with
  ``dw = dzᵀ · gather(pad(x))`` and ``dx = crop(scatter(dz · w))``.

``pads`` are ``(front, back)`` per spatial axis; ``x`` may be any strided view. The gather and
the scatter of 1-d and 2-d windows of at least 8 channels are compiled loops (numba) that read
and write the unpadded arrays directly. Other windows are gathered and scattered by numpy on a
padded copy, in one chunk of the whole batch: numpy's strided copies and adds between the
chunks' products were slower on 2 BLAS threads, and no faster on one for a 1-channel input.

Measured on the CNN benchmark's training step (``docs/kernels.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .base import check_window_reach

#: Target size of one chunk's gathered windows: about one core's L2 cache.
CHUNK_BYTES = 1 << 20

Pads = tuple[tuple[int, int], ...]


def images_per_chunk(bytes_per_image: int, batch: int) -> int:
    """How many images' windows make one chunk: at least one, at most the batch."""
    return max(1, min(batch, CHUNK_BYTES // max(1, bytes_per_image)))


def _interior(pads: Pads, spatial: tuple[int, ...]) -> tuple[slice, ...]:
    """Index of the unpadded region in a padded ``[B, *S', C]`` array."""
    return (slice(None), *(slice(lo, lo + s) for (lo, _), s in zip(pads, spatial)),
            slice(None))


def _zero_border(a, pads: Pads, spatial: tuple[int, ...]) -> None:
    """Zero everything of a padded ``a [n, *S', C]`` outside its interior."""
    full = (slice(None),) * len(spatial)
    for axis, ((lo, hi), size) in enumerate(zip(pads, spatial)):
        for part in (slice(0, lo), slice(lo + size, lo + size + hi)):
            a[(slice(None), *full[:axis], part, *full[axis + 1:], slice(None))] = 0


def make_window_matmul(im2col: Callable, scatter_add: Callable, scratch,
                       compiled: Callable | None = None, gather_padded: Callable | None = None,
                       scatter_add_cropped: Callable | None = None) -> dict[str, Callable]:
    """The two kernels, from the backend's ``im2col`` (taking ``out=``), its
    ``window_scatter_add``, its scratch pool and, where compiled, loops that fold the padding
    in (``(x, out, kernel, stride, dilation, pads) -> bool``, ``False`` when they cannot) with
    ``compiled(x, kernel) -> bool``, whether they take the windows of ``x``."""

    class _Chunks:
        """The per-call chunk buffers and the padded gather/scatter of one chunk."""

        def __init__(self, x, kernel, stride, dilation, pads, out_shape):
            check_window_reach(tuple(x.shape[1:-1]), kernel, stride, dilation, pads, out_shape)
            self.kernel, self.stride, self.dilation, self.pads = kernel, stride, dilation, pads
            self.out_shape = out_shape
            self.spatial = tuple(x.shape[1:-1])
            self.padded = any(lo or hi for lo, hi in pads)
            batch, channels = x.shape[0], x.shape[-1]
            self.positions, self.k = math.prod(out_shape), math.prod(kernel)
            self.width = self.k * channels
            self.step = max(1, batch)  # one chunk (and a valid range step for no images)
            if compiled is not None and compiled(x, kernel):
                self.step = images_per_chunk(self.positions * self.width * x.dtype.itemsize,
                                             batch)
            # recycled memory: with one chunk of the whole batch these are as large as the
            # whole-batch path's windows
            self.cols = scratch.empty((self.step, *out_shape, self.k, channels), x.dtype)
            self._xpad = self._dxpad = None

        def _padded_shape(self, channels):
            return (self.step, *(s + lo + hi for s, (lo, hi) in zip(self.spatial, self.pads)),
                    channels)

        def gather(self, xc):
            """The windows of images ``xc [n, *S, C]`` as ``[n·P, K·C]`` rows."""
            n = xc.shape[0]
            out = self.cols[:n]
            if gather_padded is None or not gather_padded(
                    xc, out, self.kernel, self.stride, self.dilation, self.pads):
                if self.padded:
                    if self._xpad is None:  # the border, zeroed once; the interior per chunk
                        self._xpad = scratch.empty(self._padded_shape(xc.shape[-1]), xc.dtype)
                        _zero_border(self._xpad, self.pads, self.spatial)
                    xp = self._xpad[:n]
                    xp[_interior(self.pads, self.spatial)] = xc
                    xc = xp
                im2col(xc, self.kernel, self.stride, self.dilation, self.out_shape, out=out)
            return out.reshape(n * self.positions, self.width)

        def scatter(self, dxc, dcols):
            """Write the window gradients ``dcols [n·P, K·C]`` of ``n`` images, added up,
            into ``dxc [n, *S, C]`` (overwritten)."""
            n = dxc.shape[0]
            windows = dcols.reshape(n, *self.out_shape, self.k, dxc.shape[-1])
            dxc[...] = 0
            if scatter_add_cropped is not None and scatter_add_cropped(
                    dxc, windows, self.kernel, self.stride, self.dilation, self.pads):
                return
            if not self.padded:
                scatter_add(dxc, windows, self.kernel, self.stride, self.dilation)
                return
            if self._dxpad is None:
                self._dxpad = scratch.empty(self._padded_shape(dxc.shape[-1]), dxc.dtype)
            full = self._dxpad[:n]
            full[...] = 0
            scatter_add(full, windows, self.kernel, self.stride, self.dilation)
            dxc[...] = full[_interior(self.pads, self.spatial)]

    def window_matmul(x, w, kernel, stride, dilation, pads, out_shape, epilogue=None):
        chunks = _Chunks(x, kernel, stride, dilation, pads, out_shape)
        batch, positions, step = x.shape[0], chunks.positions, chunks.step
        z = scratch.empty((batch * positions, w.shape[0]), np.result_type(x, w))
        wt = w.T
        for start in range(0, batch, step):
            stop = min(batch, start + step)
            zc = z[start * positions:stop * positions]
            np.matmul(chunks.gather(x[start:stop]), wt, out=zc)
            if epilogue is not None:
                epilogue(zc)
        return z

    def window_matmul_backward(x, dz, w, kernel, stride, dilation, pads, out_shape,
                               need_input_grad=True):
        chunks = _Chunks(x, kernel, stride, dilation, pads, out_shape)
        batch, positions, step, width = x.shape[0], chunks.positions, chunks.step, chunks.width
        if tuple(dz.shape) != (batch * positions, w.shape[0]):
            raise ValueError(f"dz has shape {tuple(dz.shape)}; the windows of x "
                             f"{tuple(x.shape)} need ({batch * positions}, {w.shape[0]})")
        # the reference's dtypes: dw = dzᵀ·cols, dx from dz·w
        dw_dtype, dx_dtype = np.result_type(dz, x), np.result_type(dz, w)
        # few window columns (one input channel): colsᵀ·dz is BLAS's faster order there
        # (measured 0.69 against 1.02 ms on the CNN benchmark's first convolution)
        tall = width < w.shape[0]
        dw = (np.empty if batch else np.zeros)((width, w.shape[0]) if tall else tuple(w.shape),
                                                dw_dtype)  # zeros: an empty batch adds none
        part = np.empty_like(dw)
        dx = dbuf = None
        if need_input_grad:
            dx = scratch.empty(tuple(x.shape), dx_dtype)
            dbuf = scratch.empty((step * positions, width), dx_dtype)
        for start in range(0, batch, step):
            stop = min(batch, start + step)
            rows = slice(start * positions, stop * positions)
            cols, dzc = chunks.gather(x[start:stop]), dz[rows]
            target = dw if start == 0 else part
            if tall:
                np.matmul(cols.T, dzc, out=target)
            else:
                np.matmul(dzc.T, cols, out=target)
            if start:
                np.add(dw, part, out=dw)
            if need_input_grad:
                dcols = dbuf[:(stop - start) * positions]
                np.matmul(dzc, w, out=dcols)
                chunks.scatter(dx[start:stop], dcols)
        return (dw.T if tall else dw), dx

    return {"window_matmul": window_matmul, "window_matmul_backward": window_matmul_backward}
