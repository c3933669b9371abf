"""A stand-in ``cupy`` module over numpy, whose kernels run their CUDA source on the CPU.

``fake_cupy()`` returns a module that answers like CuPy for what loomx's CuPy kernels use:

- ``ElementwiseKernel(in_params, out_params, operation, name)``: the operation is compiled by
  the host's C++ compiler into a loop over the flat index ``i`` (one compiled library per
  source, type assignment and choice of scalar arguments). As in CuPy: type placeholders
  (``T``) are taken from the arguments; non-raw array arguments broadcast together and give
  the loop's size; scalar arguments are passed by value; ``raw`` arguments are indexed by the
  operation itself; outputs not passed are allocated; outputs are references, so an
  operation may read them (in-place updates); one output is returned alone, several as a
  tuple.
- ``RawModule(code=..., name_expressions=...)``: its kernels run in the thread emulation of
  ``tests/cuda_emulation.py`` and are called as CuPy's, ``fn((grid,), (block,), args)``.
- everything else (``empty``, ``ascontiguousarray``, ``matmul``, ``lib.stride_tricks``...)
  is numpy's.

``cupy_on_cpu()`` imports loomx's CuPy kernel modules afresh against it, and
``backend_on_cpu()`` makes the test matrix's ``cupy_on_cpu`` backend from them: numpy carrying
every kernel the CuPy backend registers, so that the whole suite runs them without a GPU.
Not covered: device placement and streams (``sum_rows``'s cached vector of
ones per device becomes a plain ``ones``), and anything CuPy compiles differently from g++
(the nvcc tests cover compilation). The row kernels run with 64 threads per row instead of
256 (two warps: the same reductions across warps, fewer emulated threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import sys
import threading
import types
from contextlib import contextmanager

import numpy as np

from tests import cuda_emulation

_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64,
           "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
           "uint8": np.uint8, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_}
_CTYPES = {np.dtype(np.float32): ("float", ctypes.c_float),
           np.dtype(np.float64): ("double", ctypes.c_double),
           np.dtype(np.int32): ("int", ctypes.c_int),
           np.dtype(np.int64): ("long long", ctypes.c_longlong),
           np.dtype(np.uint32): ("unsigned int", ctypes.c_uint),
           np.dtype(np.bool_): ("bool", ctypes.c_bool)}

_ELEMENTWISE_PRELUDE = """
#include <cmath>
#include <cstddef>
#include <algorithm>
using std::min; using std::max; using std::sqrt; using std::exp; using std::log;
using std::tanh; using std::erf; using std::abs;
"""


def _params(spec: str) -> list[tuple[bool, str, str]]:
    """``"raw T x, int64 n"`` -> ``[(raw, type, name)]``."""
    out = []
    for part in spec.split(","):
        words = part.split()
        if not words:
            continue
        raw = words[0] == "raw"
        words = words[1:] if raw else words
        out.append((raw, words[0], words[1]))
    return out


_COMPILING = threading.Lock()


def _compile(source: str) -> ctypes.CDLL:
    """The compiled library of ``source`` (built once per process and kept on disk)."""
    with _COMPILING:
        return _build(source)


@functools.cache
def _build(source: str) -> ctypes.CDLL:
    return cuda_emulation.compile_library(source, ["-O0", "-Wno-unused-variable"])


class ElementwiseKernel:
    """CuPy's ``ElementwiseKernel`` over numpy arrays (see the module docstring)."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str = "kernel",
                 preamble: str = "", **_options):
        self.ins, self.outs = _params(in_params), _params(out_params)
        self.operation, self.name, self.preamble = operation, name, preamble

    def _types(self, args) -> dict[str, np.dtype]:
        known: dict[str, np.dtype] = {}
        for (_, typ, _), a in zip(self.ins + self.outs, args):
            if typ not in _DTYPES and a is not None and typ not in known:
                if isinstance(a, np.ndarray):
                    known[typ] = a.dtype
        for (_, typ, _), a in zip(self.ins + self.outs, args):
            if typ not in _DTYPES and typ not in known and a is not None:
                known[typ] = np.asarray(a).dtype
        return known

    def __call__(self, *args):
        nin, nout = len(self.ins), len(self.outs)
        if len(args) not in (nin, nin + nout):
            raise TypeError(f"{self.name}: {nin} inputs (and optionally {nout} outputs), "
                            f"got {len(args)} arguments")
        outs = list(args[nin:]) if len(args) > nin else [None] * nout
        types_ = self._types([*args[:nin], *outs])

        def dtype_of(typ):
            return np.dtype(_DTYPES[typ]) if typ in _DTYPES else types_[typ]

        arrays = [a for (raw, _, _), a in zip(self.ins + self.outs, [*args[:nin], *outs])
                  if not raw and isinstance(a, np.ndarray)]
        shape = np.broadcast_shapes(*(a.shape for a in arrays)) if arrays else ()
        for k, (raw, typ, _) in enumerate(self.outs):
            if outs[k] is None:
                if raw:
                    raise TypeError(f"{self.name}: raw outputs must be passed")
                outs[k] = np.empty(shape, dtype=dtype_of(typ))
        size = int(np.prod(shape))
        values, decls, body, argtypes = [], [], [], []
        writeback, alive = [], []  # alive: the buffers whose addresses the call takes
        for k, ((raw, typ, name), a) in enumerate(zip(self.ins + self.outs,
                                                       [*args[:nin], *outs])):
            is_out = k >= nin
            dt = dtype_of(typ)
            ctype = _CTYPES[np.dtype(dt)][0]
            if raw or isinstance(a, np.ndarray):
                if raw:
                    buf = np.ascontiguousarray(a, dtype=dt)
                elif is_out:
                    buf = a if a.flags.c_contiguous and a.dtype == dt else \
                        np.ascontiguousarray(a, dtype=dt)
                else:
                    buf = np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=dt), shape))
                if is_out and buf is not a:
                    writeback.append((a, buf))
                alive.append(buf)
                values.append(buf.ctypes.data)
                argtypes.append(ctypes.c_void_p)
                const = "" if is_out else "const "
                if raw:
                    decls.append(f"{const}{ctype}* {name}")
                else:
                    decls.append(f"{const}{ctype}* _p_{name}")
                    ref = "&" if is_out else ""
                    body.append(f"    {const}{ctype}{ref} {name} = _p_{name}[i];")
            else:
                values.append(np.asarray(a, dtype=dt).item())
                argtypes.append(_CTYPES[np.dtype(dt)][1])
                decls.append(f"const {ctype} {name}")
        typedefs = "".join(f"typedef {_CTYPES[np.dtype(d)][0]} {t};\n" for t, d in types_.items())
        source = (_ELEMENTWISE_PRELUDE + typedefs + self.preamble + "\n"
                  + f'extern "C" void {self.name}(long long _n, {", ".join(decls)}) {{\n'
                  + "  for (ptrdiff_t i = 0; i < (ptrdiff_t)_n; ++i) {\n"
                  + "\n".join(body) + "\n    {\n" + self.operation + "\n    }\n  }\n}\n")
        fn = getattr(_compile(source), self.name)
        fn.argtypes = [ctypes.c_longlong, *argtypes]
        fn.restype = None
        fn(size, *values)
        del alive
        for dst, src in writeback:
            np.copyto(dst, src, casting="unsafe")
        return outs[0] if nout == 1 else tuple(outs)


class RawModule:
    """CuPy's ``RawModule`` through the thread emulation of ``tests/cuda_emulation.py``."""

    def __init__(self, code: str, options=(), name_expressions=(), **_kw):
        self.code, self.names = code, tuple(name_expressions or ())

    def compile(self):
        return self

    def get_function(self, name: str):
        launch = cuda_emulation.build(self.code, name, self.names)

        def fn(grid, block, args, shared_mem=0):
            grid = grid[0] if isinstance(grid, tuple) else grid
            block = block[0] if isinstance(block, tuple) else block
            launch(int(grid), int(block), tuple(args), int(shared_mem))

        return fn


def fake_cupy() -> types.ModuleType:
    """The stand-in ``cupy`` module (see the module docstring)."""
    module = types.ModuleType("cupy")
    module.__getattr__ = lambda name: getattr(np, name)  # type: ignore[attr-defined]
    module.ElementwiseKernel = ElementwiseKernel
    module.RawModule = RawModule
    module.ndarray = np.ndarray
    return module


_MODULES = ("loomx.backends.cupy_kernels", "loomx.backends.cupy_windows")


@contextmanager
def cupy_on_cpu():
    """Within the block, ``import cupy`` gives the stand-in, and loomx's CuPy kernel modules
    are fresh imports against it (their compiled-kernel caches apart from the real ones);
    yields ``(cupy_kernels module, cupy_windows module)``. Everything is put back after."""
    from loomx.backends.cupy_backend import cupy_status

    cupy_status()  # cached from the real CuPy (or its absence), never from the stand-in
    saved = {name: sys.modules.get(name) for name in ("cupy", *_MODULES)}
    sys.modules["cupy"] = fake_cupy()
    for name in _MODULES:
        sys.modules.pop(name, None)
    try:
        kernels = importlib.import_module(_MODULES[0])
        windows = importlib.import_module(_MODULES[1])
        # sum_rows keeps a vector of ones per device id, which numpy arrays do not have
        def sum_rows(a):
            if a.ndim == 2 and kernels._native(a):
                return np.ones(a.shape[0], a.dtype) @ a
            return np.sum(a, axis=0)

        kernels.sum_rows = sum_rows
        # two warps per row block instead of eight: the same code paths (a reduction across
        # warps), a quarter of the emulated threads to synchronise
        kernels._ROW_THREADS = 64
        yield kernels, windows
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@contextmanager
def backend_on_cpu(dtype: str = "float32"):
    """A numpy backend carrying every kernel the CuPy backend registers, run on the CPU (the
    stand-in for CuPy's own kernels, the thread emulation for the whole-sequence and
    multi-tensor ones); valid inside the block."""
    import dataclasses

    from loomx.backends import get_backend

    with cupy_on_cpu():
        from loomx.backends.cupy_backend import cupy_kernel_table

        table = cupy_kernel_table(build=cuda_emulation.build, multiprocessors=lambda: 4,
                                  device=lambda a: contextlib.nullcontext())
        base = get_backend("numpy", dtype)
        yield dataclasses.replace(base, name="cupy_on_cpu", kernels=table)
