"""Plain SGD over many parameters in one CUDA launch (the CuPy backend's ``sgd_update_many``).

An optimizer step updates every parameter; with one ``sgd_update`` launch per parameter a
network of ``n`` weight arrays pays ``n`` launches of host time (10–20 µs each on CuPy), where
PyTorch's ``torch.optim.SGD`` on CUDA makes one multi-tensor launch (``foreach``). Here one
kernel takes the pointers and sizes of up to ``MAX_TENSORS`` parameters and their gradients as
arguments; each thread block finds its tensor from the block offsets (also arguments) and
updates ``CHUNK`` elements of it: ``w ← w − lr·(g + weight_decay·w)``, without the decay term
when ``weight_decay`` is 0 (the reference's arithmetic).

- ``sgd_update_many(ws, gs, *, lr, weight_decay) -> None``: updates each ``ws[i]`` in place.
  Pairs it cannot take (another dtype than float32/float64, a gradient of another dtype,
  arrays that are not C-contiguous) go to ``fallback(w, g, lr=, weight_decay=)``, the
  per-tensor kernel.

Like :mod:`loomx.backends.cuda_lstm`, the module is written against an array library and a
``build(code, name) -> launch(grid, block, args, shared_mem)`` compiler, so that the tests run
the CUDA source in their CPU emulation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np

#: Most tensors one launch updates (kernel arguments: 4 per tensor).
MAX_TENSORS = 24
#: Threads per block, and elements per block.
THREADS = 256
CHUNK = 4096

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


@functools.lru_cache(maxsize=128)
def sgd_code(dtype: Any, count: int, threads: int = THREADS, chunk: int = CHUNK) -> str:
    """The kernel ``sgd_many`` for ``count`` tensors of ``dtype``: arguments ``w0, g0, n0, s0,
    w1, ...`` (parameter, gradient, element count, first block), then ``s_end`` (the total of
    blocks), ``lr``, ``wd`` and ``decay`` (whether to add ``wd·w``)."""
    ctype = _CTYPES[np.dtype(dtype)]
    params = ", ".join(f"T* __restrict__ w{i}, const T* __restrict__ g{i}, long long n{i}, "
                       f"int s{i}" for i in range(count))
    pick = "\n".join(
        f"    {'if' if i == 0 else 'else if'} (b < {f's{i + 1}' if i + 1 < count else 's_end'}) "
        f"{{ w = w{i}; g = g{i}; n = n{i}; first = s{i}; }}" for i in range(count))
    return f"""typedef {ctype} T;
extern "C" __global__ void __launch_bounds__({threads}) sgd_many(
    {params}, int s_end, T lr, T wd, int decay)
{{
    const int b = blockIdx.x;
    T* w = nullptr;
    const T* g = nullptr;
    long long n = 0;
    int first = 0;
{pick}
    const long long start = (long long)(b - first) * {chunk};
    const long long stop = min(n, start + {chunk});
    for (long long e = start + threadIdx.x; e < stop; e += {threads}) {{
        const T step = decay ? g[e] + wd * w[e] : g[e];
        w[e] = w[e] - lr * step;
    }}
}}
"""


class SGDMany:
    """``sgd_update_many`` over one array library (see the module docstring).

    Args:
        build: ``build(code, name) -> launch(grid, block, args, shared_mem)``, or ``None``
            when it cannot compile (every pair then goes to ``fallback``).
        fallback: the per-tensor ``sgd_update`` kernel.
        threads, chunk: the block geometry (the tests' emulation uses small blocks).
    """

    def __init__(self, build: Callable[[str, str], Any], fallback: Callable[..., Any],
                 threads: int = THREADS, chunk: int = CHUNK):
        self.build, self.fallback = build, fallback
        self.threads, self.chunk = threads, chunk

    def __call__(self, ws: list, gs: list, *, lr: float, weight_decay: float = 0.0) -> None:
        groups: dict[Any, list[tuple[Any, Any]]] = {}
        for w, g in zip(ws, gs, strict=True):
            if (np.dtype(w.dtype) in _CTYPES and g.dtype == w.dtype and w.size
                    and w.flags.c_contiguous and g.flags.c_contiguous):
                groups.setdefault(np.dtype(w.dtype), []).append((w, g))
            else:
                self.fallback(w, g, lr=lr, weight_decay=weight_decay)
        for dtype, pairs in groups.items():
            for at in range(0, len(pairs), MAX_TENSORS):
                self._launch(dtype, pairs[at:at + MAX_TENSORS], lr, weight_decay)

    def _launch(self, dtype: Any, pairs: list[tuple[Any, Any]], lr: float,
                weight_decay: float) -> None:
        launch = self.build(sgd_code(dtype, len(pairs), self.threads, self.chunk), "sgd_many")
        if launch is None:
            for w, g in pairs:
                self.fallback(w, g, lr=lr, weight_decay=weight_decay)
            return
        args: list[Any] = []
        blocks = 0
        for w, g in pairs:
            args += [w, g, np.int64(w.size), np.int32(blocks)]
            blocks += math.ceil(w.size / self.chunk)
        t = dtype.type
        args += [np.int32(blocks), t(lr), t(weight_decay), np.int32(bool(weight_decay))]
        launch(blocks, self.threads, tuple(args), 0)
