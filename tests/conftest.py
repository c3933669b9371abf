"""The backend matrix and shared assertions.

Every numeric test takes the ``backend`` fixture, parametrised over:

- ``numpy``: the CPU backend;
- ``strict``: array-api-strict on its simulated ``device1`` (mixing devices raises, implicit
  host conversion raises, non-standard functions do not exist);
- ``strict_nosync``: the same with boolean indexing and data-dependent shapes disabled, plus a
  guard that makes ``float()/bool()/int()`` on a device array raise (a hidden GPU→host sync);
- ``torch``: PyTorch CPU through array-api-compat;
- ``cupy_on_cpu``: numpy carrying every kernel the CuPy backend registers, their CUDA run on
  the CPU (``tests/cupy_emulation.py``, ``tests/cuda_emulation.py``); skipped without a C++
  compiler;
- ``cupy``: CUDA through CuPy, marked ``gpu`` and skipped with the reason when unusable.

``LOOMX_TEST_BACKENDS`` replaces the matrix (comma-separated specs); ``torch:cuda`` there runs
the tests on PyTorch CUDA tensors, also marked ``gpu``.

``backend64`` is the same matrix in float64 (gradient checks).
"""

from __future__ import annotations

import contextlib
import os
import pathlib

import numpy as np
import pytest
from loomx.backends import get_backend

MATRIX = ["numpy", "strict", "strict_nosync", "torch", "cupy_on_cpu", "cupy"]
if os.environ.get("LOOMX_TEST_BACKENDS"):
    MATRIX = os.environ["LOOMX_TEST_BACKENDS"].split(",")


@contextlib.contextmanager
def no_sync_guard():
    """Make host conversions of non-CPU strict arrays raise inside the block."""
    import array_api_strict
    from array_api_strict._array_object import Array

    cpu = array_api_strict.Device("CPU_DEVICE")
    names = ("__float__", "__bool__", "__int__", "__index__", "__complex__")
    saved = {n: getattr(Array, n) for n in names}

    def guard(name):
        original = saved[name]

        def method(self, *a, **k):
            if self.device != cpu:
                raise RuntimeError(f"hidden device→host sync: {name} on a {self.device} array")
            return original(self, *a, **k)

        return method

    for n in names:
        setattr(Array, n, guard(n))
    try:
        with array_api_strict.ArrayAPIStrictFlags(boolean_indexing=False,
                                                  data_dependent_shapes=False):
            yield
    finally:
        for n, m in saved.items():
            setattr(Array, n, m)


def _make(spec: str, dtype: str):
    if spec.startswith("cupy"):
        from loomx.backends.cupy_backend import cupy_status

        ok, reason = cupy_status()
        if not ok:
            pytest.skip(f"cupy backend unusable: {reason}")
        return get_backend(spec, dtype)
    if spec.startswith("torch"):
        torch = pytest.importorskip("torch")
        if "cuda" in spec and not torch.cuda.is_available():
            pytest.skip("torch:cuda backend unusable: PyTorch sees no CUDA device")
    if spec.startswith("strict"):
        pytest.importorskip("array_api_strict")
        return get_backend("strict", dtype)
    return get_backend(spec, dtype)


def _params(dtype: str):
    return [pytest.param((s, dtype), id=s,
                         marks=[pytest.mark.gpu] if (s.startswith("cupy") or "cuda" in s)
                         and s != "cupy_on_cpu" else [])
            for s in MATRIX]


def _backend_fixture(request):
    spec, dtype = request.param
    if spec == "cupy_on_cpu":  # the CuPy backend's kernels, run on the CPU
        from tests import cuda_emulation, cupy_emulation

        why = cuda_emulation.unavailable()
        if why:
            pytest.skip(why)
        with cupy_emulation.backend_on_cpu(dtype) as backend:
            yield backend
        return
    backend = _make(spec, dtype)
    if spec == "strict_nosync":
        with no_sync_guard():
            yield backend
    else:
        yield backend


backend = pytest.fixture(params=_params("float32"))(_backend_fixture)
backend64 = pytest.fixture(params=_params("float64"))(_backend_fixture)


@pytest.fixture(scope="module")
def single_threaded():
    """One BLAS and one torch thread: small matrices on a shared CPU run faster and steadier."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def loaded():
    """The tiny checkpoints of ``tests/tiny_models.py``, each loaded once per module."""
    from tests.tiny_models import LoadedModels

    return LoadedModels()


@pytest.fixture(scope="session")
def emulated():
    """``build`` of the CPU emulation of CUDA kernels (``tests/cuda_emulation.py``), or a skip
    where the host compiler cannot build it."""
    from tests import cuda_emulation

    why = cuda_emulation.unavailable()
    if why:
        pytest.skip(why)
    return cuda_emulation.build


@pytest.fixture
def numpy64():
    """The numpy backend in float64 (finite-difference checks)."""
    return get_backend("numpy", "float64")


def assert_close(actual, expected, backend, rtol: float = 1e-5, atol: float = 1e-6,
                 dtype=None) -> None:
    """Check namespace, dtype, shape and device of ``actual`` before comparing its values.

    Args:
        actual: a device array of ``backend``.
        expected: a host array (numpy), a torch tensor, or a device array of ``backend``.
        dtype: expected xp dtype (default: ``backend.float_dtype``).
    """
    from array_api_compat import array_namespace, device

    assert array_namespace(actual) is backend.xp, (
        f"array of namespace {array_namespace(actual).__name__}, expected {backend.xp.__name__}")
    want = backend.float_dtype if dtype is None else dtype
    assert actual.dtype == want, f"dtype {actual.dtype}, expected {want}"
    assert str(device(actual)) == str(backend.device), (
        f"device {device(actual)}, expected {backend.device}")
    expected = to_numpy(expected, backend)
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    np.testing.assert_allclose(backend.to_host(actual).astype(np.float64),
                               expected.astype(np.float64), rtol=rtol, atol=atol)


def cudnn_tolerance(backend, tol: dict) -> dict:
    """``tol``, or 1e-3 relative / 1e-4 absolute where the PyTorch backend runs a layer through
    cuDNN on a GPU: its float32 RNN kernels differ from float64 by up to about 5e-4 relative
    (measured on an H100 over 5 steps), more than plain float32 rounding."""
    if backend.name.startswith("torch") and "cuda" in str(backend.device):
        return {"rtol": max(tol["rtol"], 1e-3), "atol": max(tol["atol"], 1e-4)}
    return tol


def to_numpy(x, backend=None) -> np.ndarray:
    """Host copy of a numpy array, torch tensor or device array."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.detach().cpu().numpy()
    if backend is not None:
        return backend.to_host(x)
    return np.asarray(x)


@pytest.fixture
def close():
    """The :func:`assert_close` helper as a fixture."""
    return assert_close


def _loom_fixtures() -> pathlib.Path:
    """Loom's fixture folder: ``../shared/fixtures/loom`` beside the checkout."""
    root = pathlib.Path(__file__).resolve().parents[1]
    candidates = [root.parent / "shared" / "fixtures" / "loom",
                  pathlib.Path("/work/shared/fixtures/loom")]
    return next((c for c in candidates if c.is_dir()), candidates[0])


#: Files written by Loom itself (see their README); the tests fail if they are missing.
LOOM_FIXTURES = _loom_fixtures()
