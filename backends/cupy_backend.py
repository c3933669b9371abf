"""The CuPy backend (CUDA): array-api-compat's cupy namespace, fused kernels, device context.

array-api-compat ignores ``device=`` in CuPy creation functions, so every public entry point that
creates arrays runs under :meth:`CupyBackend.activate` (``with cupy.cuda.Device(i)``).
"""

from __future__ import annotations

import functools

import numpy as np

from .base import Backend, window_scatter_add_with


class CupyBackend(Backend):
    """CuPy arrays on one CUDA device."""

    def activate(self):
        return self.device  # cupy.cuda.Device is a context manager

    def zeros(self, shape, dtype=None):
        with self.device:
            return super().zeros(shape, dtype)

    def ones(self, shape, dtype=None):
        with self.device:
            return super().ones(shape, dtype)

    def scratch(self, shape, dtype=None):
        with self.device:
            return super().scratch(shape, dtype)

    def full(self, shape, value, dtype=None):
        with self.device:
            return super().full(shape, value, dtype)

    def arange(self, *args, dtype=None):
        with self.device:
            return super().arange(*args, dtype=dtype)

    def asarray(self, obj, dtype=None):
        with self.device:
            return super().asarray(obj, dtype)

    def scalar(self, value, like=None):
        with self.device:
            return super().scalar(value, like)

    def _from_host(self, arr: np.ndarray, dtype):
        import cupy

        np_dtype = self.numpy_dtype(dtype)
        with self.device:
            return cupy.asarray(np.ascontiguousarray(arr.astype(np_dtype, copy=False)))

    def _to_host(self, x):
        return x.get()

    def erf(self, x):
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)

    def scatter_add(self, target, indices, values):
        import cupyx

        out = target.copy()
        cupyx.scatter_add(out, indices, values)
        return out

    def sync(self) -> None:
        import cupy

        with self.device:
            cupy.cuda.get_current_stream().synchronize()

    def memory_info(self) -> dict:
        import cupy

        with self.device:
            free, total = cupy.cuda.runtime.memGetInfo()
        return {"used": total - free, "total": total}


def _cupy_window_gather(x, window, stride):
    """Strided windows over trailing axes as a view (``cupy.lib.stride_tricks``)."""
    import cupy

    n = len(window)
    view = cupy.lib.stride_tricks.sliding_window_view(x, window, axis=tuple(range(-n, 0)))
    index = (Ellipsis,) + tuple(slice(None, None, s) for s in stride) + (slice(None),) * n
    return view[index]


@functools.lru_cache(maxsize=1)
def cupy_status() -> tuple[bool, str]:
    """``(usable, reason)`` for CuPy: installed, a driver, at least one device. Cached."""
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed: pip install 'loomx[cuda12]' (or [cuda13])"
    except Exception as exc:  # a broken install raises all kinds of errors
        return False, f"CuPy failed to import ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"no usable CUDA driver or device ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "no CUDA device found"
    try:
        cupy.zeros(1, dtype=cupy.float32).sum().get()
    except Exception as exc:
        return False, f"CUDA device present but unusable ({type(exc).__name__}: {exc})"
    return True, f"{count} CUDA device(s)"


@functools.lru_cache(maxsize=64)
def _cupy_module(code: str):
    """The compiled module of ``code`` (with the CUDA prelude), or ``None`` when NVRTC
    rejects it or the driver cannot load it."""
    import cupy

    from .cuda_recurrent import CUDA_PRELUDE

    try:
        module = cupy.RawModule(code=CUDA_PRELUDE + code, options=("-std=c++14",))
        module.compile()
    except (cupy.cuda.compiler.CompileException, cupy.cuda.driver.CUDADriverError):
        return None  # rejected by NVRTC, or by the driver when loading it
    return module


@functools.lru_cache(maxsize=128)
def _cupy_build(code: str, name: str):
    """``launch(grid, block, args, shared_mem)`` of kernel ``name`` in ``code``, or ``None``."""
    module = _cupy_module(code)
    if module is None:
        return None
    fn = module.get_function(name)

    def launch(grid: int, block: int, args: tuple, shared_mem: int) -> None:
        fn((grid,), (block,), args, shared_mem=shared_mem)

    return launch


@functools.cache
def _multiprocessors(device_id: int) -> int:
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _add_into(view, part):
    import cupy

    cupy.add(view, part, out=view)


def cupy_kernel_table(build=None, multiprocessors=None, device=None) -> dict:
    """Every kernel the CuPy backend registers, by name.

    ``build(code, name)``, ``multiprocessors()`` and ``device(array)`` serve the kernels
    compiled from CUDA source (``backends/cuda_recurrent.py``, ``backends/cuda_foreach.py``):
    by default CuPy's ``RawModule``, the current device's multiprocessor count and the
    array's device. The tests pass their CPU emulation instead, so that the table they run
    on the CPU is this one.
    """
    import cupy

    from .cuda_foreach import AdamMany, SGDMany
    from .cuda_recurrent import RecurrentSequence
    from .cupy_kernels import adam_update, cupy_kernels, sgd_update
    from .cupy_windows import window_matmul, window_matmul_backward

    build = build or _cupy_build
    multiprocessors = multiprocessors or (lambda: _multiprocessors(cupy.cuda.Device().id))
    device = device or (lambda a: a.device)
    sequence = RecurrentSequence(cupy, build, multiprocessors, device=device)
    return {"window_gather": _cupy_window_gather,
            "window_scatter_add": window_scatter_add_with(_add_into),
            "window_matmul": window_matmul, "window_matmul_backward": window_matmul_backward,
            **cupy_kernels(),
            # whole RNN/LSTM/GRU sequences, one launch each way
            "recurrent_sequence_forward": sequence.forward,
            "recurrent_sequence_backward": sequence.backward,
            # optimizer steps over many parameters in one launch, with the per-tensor
            # kernels for the parameters those cannot take
            "sgd_update_many": SGDMany(build, sgd_update, device=device),
            "adam_update_many": AdamMany(build, adam_update, device=device)}


def make_cupy_backend(name: str = "cupy", index: int | None = None) -> CupyBackend:
    """Build the CuPy backend on device ``index`` (default 0)."""
    from loomx.errors import BackendUnavailableError

    ok, reason = cupy_status()
    if not ok:
        raise BackendUnavailableError(f"the cupy backend is unavailable: {reason}")
    import array_api_compat.cupy as xp
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    i = index or 0
    if i >= count:
        raise BackendUnavailableError(f"cupy:{i} requested but only {count} CUDA device(s) exist.")
    return CupyBackend(name=name, xp=xp, device=cupy.cuda.Device(i), library="cupy",
                       kernels=cupy_kernel_table())
