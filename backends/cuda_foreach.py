"""Optimizer updates over many parameters in one CUDA launch (the CuPy backend's
``sgd_update_many`` and ``adam_update_many``).

An optimizer step updates every parameter; with one ``sgd_update`` or ``adam_update`` launch
per parameter a network of ``n`` weight arrays pays ``n`` launches of host time (10–20 µs
each on CuPy), where ``torch.optim`` on CUDA makes multi-tensor launches (``foreach``). Here
one kernel takes the pointers and sizes of several parameters (and their gradients and
moments) as arguments; each thread block finds its tensor from the block offsets (also
arguments) and updates ``CHUNK`` elements of it, with the arithmetic of the per-tensor
kernels:

- ``sgd_update_many(ws, gs, *, lr, weight_decay) -> None``: ``w ← w − lr·(g + wd·w)``
  in place (without the decay term when ``weight_decay`` is 0), up to 24 parameters a launch;
- ``adam_update_many(ws, gs, ms, vs, *, lr, beta1, beta2, eps, weight_decay, step,
  decoupled) -> None``: Adam or AdamW (``decoupled``) in place on ``w``, ``m`` and ``v``, up
  to 16 parameters a launch.

Parameters the kernels cannot take (another dtype than float32/float64, arrays of different
dtypes, arrays that are not C-contiguous, empty ones) go to the per-tensor kernel passed as
``fallback``. Like :mod:`loomx.backends.cuda_recurrent`, the module is written against a
``build(code, name) -> launch(grid, block, args, shared_mem)`` compiler, so that the tests run
the CUDA source in their CPU emulation.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Threads per block, and elements per block.
THREADS = 256
CHUNK = 4096

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


class Update:
    """One elementwise update over several tensors per element ``e``.

    Attributes:
        name: the kernel's name.
        arrays: the per-parameter arrays, in argument order (``w``, ``g``, ...).
        written: those the update writes (the rest are read only).
        scalars: the scalar parameters after the arrays, as C declarations (``T lr``...).
        body: the update of element ``e`` (``w[e] = ...``).
        max_tensors: most parameters one launch takes.
    """

    def __init__(self, name: str, arrays: tuple[str, ...], written: tuple[str, ...],
                 scalars: tuple[str, ...], body: str, max_tensors: int):
        self.name, self.arrays, self.written = name, arrays, written
        self.scalars, self.body, self.max_tensors = scalars, body, max_tensors

    @functools.lru_cache(maxsize=128)  # noqa: B019 - two module-level instances
    def code(self, dtype: Any, count: int, threads: int = THREADS, chunk: int = CHUNK) -> str:
        """The kernel for ``count`` parameters of ``dtype``: per parameter its arrays, its
        element count ``n`` and its first block ``s``; then ``s_end`` (the total of blocks)
        and the scalars."""
        ctype = _CTYPES[np.dtype(dtype)]

        def decl(a: str, i: int) -> str:
            return f"{'' if a in self.written else 'const '}T* __restrict__ {a}{i}"

        params = ",\n    ".join(
            ", ".join([*(decl(a, i) for a in self.arrays), f"long long n{i}", f"int s{i}"])
            for i in range(count))
        locals_ = "\n".join(f"    {'' if a in self.written else 'const '}T* {a} = nullptr;"
                            for a in self.arrays)
        pick = "\n".join(
            f"    {'if' if i == 0 else 'else if'} (b < {f's{i + 1}' if i + 1 < count else 's_end'})"
            f" {{ {' '.join(f'{a} = {a}{i};' for a in self.arrays)} n = n{i}; first = s{i}; }}"
            for i in range(count))
        return f"""typedef {ctype} T;
extern "C" __global__ void __launch_bounds__({threads}) {self.name}(
    {params},
    int s_end, {', '.join(self.scalars)})
{{
    const int b = blockIdx.x;
{locals_}
    long long n = 0;
    int first = 0;
{pick}
    const long long start = (long long)(b - first) * {chunk};
    const long long stop = min(n, start + {chunk});
    for (long long e = start + threadIdx.x; e < stop; e += {threads}) {{
{self.body}
    }}
}}
"""


SGD = Update("sgd_many", ("w", "g"), ("w",), ("T lr", "T wd", "int decay"), """
        const T step = decay ? g[e] + wd * w[e] : g[e];
        w[e] = w[e] - lr * step;""", max_tensors=24)

ADAM = Update("adam_many", ("w", "g", "m", "v"), ("w", "m", "v"),
              ("T step_size", "T b1", "T b2", "T eps", "T wd", "T bc2_sqrt", "T decay"), """
        const T gg = g[e] + wd * w[e];
        const T wv = w[e] * decay;
        const T mv = b1 * m[e] + ((T)1 - b1) * gg;
        const T vv = b2 * v[e] + ((T)1 - b2) * (gg * gg);
        m[e] = mv;
        v[e] = vv;
        w[e] = wv - step_size * (mv / (sqrt(vv) / bc2_sqrt + eps));""", max_tensors=16)


class Foreach:
    """Launch an :class:`Update` over lists of arrays (see the module docstring).

    Args:
        update: the update.
        build: ``build(code, name) -> launch(grid, block, args, shared_mem)``, or ``None``
            when it cannot compile (every parameter then goes to ``fallback``).
        threads, chunk: the block geometry (the tests' emulation uses small blocks).
        device: ``device(array)`` -> a context manager making the array's device current.
    """

    def __init__(self, update: Update, build: Callable[[str, str], Any],
                 threads: int = THREADS, chunk: int = CHUNK,
                 device: Callable[[Any], Any] = lambda a: contextlib.nullcontext()):
        self.update, self.build = update, build
        self.threads, self.chunk, self.device = threads, chunk, device

    def run(self, lists: Sequence[Sequence[Any]], scalars: Callable[[Any], tuple],
            fallback: Callable[..., Any]) -> None:
        """Update parameter ``i`` from ``lists[k][i]``; ``scalars(dtype)`` gives the kernel's
        scalar arguments for one dtype.

        One launch takes arrays of one dtype on one device. An array given twice (a weight
        two layers share) is launched once and its later entries go to ``fallback`` after
        the launches, one by one: two blocks of one launch must not update the same memory.
        """
        groups: dict[Any, list[tuple[Any, ...]]] = {}
        seen: set[int] = set()
        later = []
        for arrays in zip(*lists, strict=True):
            dtype = arrays[0].dtype
            if id(arrays[0]) in seen:
                later.append(arrays)
            elif (np.dtype(dtype) in _CTYPES and arrays[0].size
                    and all(a.dtype == dtype and a.flags.c_contiguous for a in arrays)):
                key = (np.dtype(dtype), str(getattr(arrays[0], "device", "")))
                groups.setdefault(key, []).append(arrays)
            else:
                fallback(*arrays)
            seen.add(id(arrays[0]))
        for (dtype, _), params in groups.items():
            most = self.update.max_tensors
            with self.device(params[0][0]):
                for at in range(0, len(params), most):
                    self._launch(dtype, params[at:at + most], scalars(dtype), fallback)
        for arrays in later:
            fallback(*arrays)

    def _launch(self, dtype: Any, params: list[tuple[Any, ...]], scalars: tuple,
                fallback: Callable[..., Any]) -> None:
        code = self.update.code(dtype, len(params), self.threads, self.chunk)
        launch = self.build(code, self.update.name)
        if launch is None:
            for arrays in params:
                fallback(*arrays)
            return
        args: list[Any] = []
        blocks = 0
        for arrays in params:
            args += [*arrays, np.int64(arrays[0].size), np.int32(blocks)]
            blocks += math.ceil(arrays[0].size / self.chunk)
        launch(blocks, self.threads, (*args, np.int32(blocks), *scalars), 0)


class _Many:
    """A multi-tensor kernel of :attr:`update` with ``fallback``, the per-tensor kernel, for
    what it cannot take; the other arguments as :class:`Foreach`'s."""

    update: Update

    def __init__(self, build: Callable[[str, str], Any], fallback: Callable[..., Any],
                 threads: int = THREADS, chunk: int = CHUNK,
                 device: Callable[[Any], Any] = lambda a: contextlib.nullcontext()):
        self.foreach = Foreach(self.update, build, threads, chunk, device)
        self.fallback = fallback


class SGDMany(_Many):
    """``sgd_update_many``, with ``fallback(w, g, lr=, weight_decay=)``."""

    update = SGD

    def __call__(self, ws: list, gs: list, *, lr: float, weight_decay: float = 0.0) -> None:
        def scalars(dtype):
            t = dtype.type
            return t(lr), t(weight_decay), np.int32(bool(weight_decay))

        self.foreach.run((ws, gs), scalars, lambda w, g: self.fallback(
            w, g, lr=lr, weight_decay=weight_decay))


class AdamMany(_Many):
    """``adam_update_many``, with ``fallback(w, g, m, v, lr=, ...)``."""

    update = ADAM

    def __call__(self, ws: list, gs: list, ms: list, vs: list, *, lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float, step: int,
                 decoupled: bool) -> None:
        # the per-tensor kernel's scalars: L2 decay in the gradient, or decoupled decay
        l2 = 0.0 if decoupled else weight_decay
        decay = 1.0 - lr * weight_decay if decoupled else 1.0

        def scalars(dtype):
            t = dtype.type
            return (t(lr / (1.0 - beta1 ** step)), t(beta1), t(beta2), t(eps), t(l2),
                    t(math.sqrt(1.0 - beta2 ** step)), t(decay))

        self.foreach.run((ws, gs, ms, vs), scalars, lambda w, g, m, v: self.fallback(
            w, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            step=step, decoupled=decoupled))
