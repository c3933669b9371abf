"""The CuPy backend's row kernels (``_ROW_SOURCE`` in ``backends/cupy_kernels.py``: softmax,
LayerNorm, RMSNorm and cross-entropy, one thread block per row with warp-shuffle reductions),
without a GPU.

The CUDA source runs in the CPU emulation of ``tests/cuda_emulation.py`` (a thread per CUDA
thread, per-warp barriers for the shuffles), launched as the CuPy wrappers launch it, and is
compared with the formulas in numpy; ``nvcc``, where installed, compiles it for a GPU. The
``gpu``-marked kernel tests check the same kernels through CuPy against the layers' reference
paths.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from loomx.backends.cupy_kernels import _ROW_KERNELS, _ROW_SOURCE

from tests import cuda_emulation

INSTANCES = tuple(f"{k}<{t}>" for k in _ROW_KERNELS for t in ("float", "double"))
TYPES = {np.float32: "float", np.float64: "double"}
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def _kernel(emulated, name, dtype):
    return emulated(_ROW_SOURCE, f"{name}<{TYPES[dtype]}>", INSTANCES)


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


CASES = [  # rows, width, threads: rows narrower than a warp, and wider than the block
    pytest.param(3, 5, 64, id="narrow"),
    pytest.param(2, 300, 64, id="wide"),
    pytest.param(2, 700, 256, id="production_block"),
]


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


def _draw(shape, dtype, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("rows,n,threads", CASES)
@pytest.mark.parametrize("log_out", [0, 1], ids=["softmax", "log_softmax"])
def test_softmax_forward_and_backward(emulated, dtype, rows, n, threads, log_out):
    x, g = _draw((rows, n), dtype, 1, 3.0), _draw((rows, n), dtype, 2)
    y = np.full_like(x, np.nan)
    _kernel(emulated, "softmax_fwd", dtype)(rows, threads, (x, y, np.int64(n),
                                                            np.int32(log_out)), 0)
    s = _softmax(x.astype(np.float64))
    want = np.log(s) if log_out else s
    np.testing.assert_allclose(y, want, **TOL[dtype])
    dx = np.full_like(x, np.nan)
    _kernel(emulated, "softmax_bwd", dtype)(rows, threads, (y, g, dx, np.int64(n),
                                                            np.int32(log_out)), 0)
    y64, g64 = y.astype(np.float64), g.astype(np.float64)
    if log_out:
        want = g64 - np.exp(y64) * g64.sum(axis=1, keepdims=True)
    else:
        want = y64 * (g64 - (g64 * y64).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(dx, want, **TOL[dtype])


@pytest.mark.parametrize("rows,n,threads", CASES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_forward_and_backward(emulated, dtype, rows, n, threads, affine):
    x, dy = _draw((rows, n), dtype, 3, 2.0), _draw((rows, n), dtype, 4)
    w, b = _draw((n,), dtype, 5), _draw((n,), dtype, 6)
    y, xhat = np.full_like(x, np.nan), np.full_like(x, np.nan)
    rstd = np.full((rows,), np.nan, dtype)
    eps = dtype(1e-5)
    _kernel(emulated, "layer_norm_fwd", dtype)(
        rows, threads, (x, w if affine else x, b if affine else x, y, xhat, rstd, np.int64(n),
                        eps, np.int32(affine), np.int32(affine)), 0)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1, keepdims=True)
    r = 1.0 / np.sqrt(((x64 - mean) ** 2).mean(axis=1, keepdims=True) + float(eps))
    h = (x64 - mean) * r
    np.testing.assert_allclose(rstd, r[:, 0], **TOL[dtype])
    np.testing.assert_allclose(xhat, h, **TOL[dtype])
    np.testing.assert_allclose(y, h * w + b if affine else h, **TOL[dtype])
    dx = np.full_like(x, np.nan)
    _kernel(emulated, "layer_norm_bwd", dtype)(
        rows, threads, (dy, xhat, rstd, w if affine else x, dx, np.int64(n), np.int32(affine)),
        0)
    gg = dy.astype(np.float64) * (w if affine else 1.0)
    want = r * (gg - gg.mean(axis=1, keepdims=True)
                - h * (gg * h).mean(axis=1, keepdims=True))
    np.testing.assert_allclose(dx, want, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


@pytest.mark.parametrize("rows,n,threads", CASES)
@pytest.mark.parametrize("unit_offset", [0, 1], ids=["weight", "one_plus_weight"])
def test_rms_norm_forward_and_backward(emulated, dtype, rows, n, threads, unit_offset):
    x, dy, w = _draw((rows, n), dtype, 7, 2.0), _draw((rows, n), dtype, 8), _draw((n,), dtype, 9)
    y, rinv = np.full_like(x, np.nan), np.full((rows,), np.nan, dtype)
    eps = dtype(1e-6)
    _kernel(emulated, "rms_norm_fwd", dtype)(
        rows, threads, (x, w, y, rinv, np.int64(n), eps, np.int32(unit_offset)), 0)
    x64 = x.astype(np.float64)
    r = 1.0 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + float(eps))
    ww = 1.0 + w if unit_offset else w.astype(np.float64)
    np.testing.assert_allclose(rinv, r[:, 0], **TOL[dtype])
    np.testing.assert_allclose(y, x64 * r * ww, **TOL[dtype])
    dx = np.full_like(x, np.nan)
    _kernel(emulated, "rms_norm_bwd", dtype)(
        rows, threads, (dy, x, rinv, w, dx, np.int64(n), np.int32(unit_offset)), 0)
    g64 = dy.astype(np.float64)
    want = r * g64 * ww - x64 * r ** 3 * (g64 * ww * x64).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(dx, want, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


@pytest.mark.parametrize("rows,n,threads", CASES)
def test_softmax_cross_entropy(emulated, dtype, rows, n, threads):
    x = _draw((rows, n), dtype, 10, 3.0)
    t = np.abs(_draw((rows, n), dtype, 11))  # soft targets, rows not summing to one
    grad, loss = np.full_like(x, np.nan), np.full((rows,), np.nan, dtype)
    _kernel(emulated, "softmax_xent", dtype)(
        rows, threads, (x, t, grad, loss, np.int64(n), dtype(rows)), 0)
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    log_s = np.log(_softmax(x64))
    np.testing.assert_allclose(loss, -(t64 * log_s).sum(axis=1), **TOL[dtype])
    want = (np.exp(log_s) * t64.sum(axis=1, keepdims=True) - t64) / rows
    np.testing.assert_allclose(grad, want, **TOL[dtype])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_row_kernels_compile_for_a_gpu(tmp_path):
    """The row source with every instantiation CuPy asks for (``name_expressions``)."""
    instantiations = []
    for k in _ROW_KERNELS:
        for t in ("float", "double"):
            instantiations.append(f"template __global__ void {k}<{t}>({_params(k, t)});")
    cuda_emulation.nvcc_compiles(_ROW_SOURCE + "\n" + "\n".join(instantiations), str(tmp_path))


def _params(kernel: str, ctype: str) -> str:
    """The parameter types of row kernel ``kernel`` with ``T`` = ``ctype`` (explicit
    instantiation)."""
    found = re.search(r"__global__\s+void\s+" + kernel + r"\s*\(([^)]*)\)", _ROW_SOURCE)
    types = []
    for part in found.group(1).split(","):
        words = part.replace("*", " * ").split()[:-1]
        types.append(re.sub(r"\bT\b", ctype, " ".join(words)))
    return ", ".join(types)
