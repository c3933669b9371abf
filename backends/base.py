"""The ``Backend`` interface: one array library, one device, one default float dtype.

Everything device-agnostic in loomx works on ``backend.xp`` (an array-API namespace from
``array-api-compat``) plus the handful of operations the standard lacks, which every backend
provides here with an array-API reference fallback:

- ``scatter_add``: add rows into a target by integer index; duplicate indices add up.
- ``erf``: the error function (exact GELU).
- ``to_host`` / ``from_host``: the only sanctioned copies between host (numpy) and device.
- ``sync``: wait for queued device work (a no-op on the CPU).
- ``memory_info``: used / total bytes where the library knows them.
- ``scratch`` / ``scratch_matmul`` / ``contiguous_scratch``: temporaries (``xp.empty``, a
  product, a C-contiguous copy), recycled on numpy where nothing references them any more
  (no page faults for large blocks).
- ``kernel(name)``: an optional fast kernel (e.g. strided-window gather) or ``None``; callers
  fall back to the reference path when it is ``None``. Every kernel is tested against it.
- ``random(seed)``: a seeded :class:`RandomSource`. Draws are made on the host with numpy's
  PCG64 and moved once, so one seed gives the same numbers on every backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                "uint8", "uint16", "uint32", "uint64", "bool")


class RandomSource:
    """Seeded random numbers for a backend.

    Draws use numpy's ``Generator`` on the host and are moved to the device with
    ``backend.from_host``; this makes initialisation and shuffling identical across backends for
    the same seed. All methods return device arrays in ``dtype`` (default: the backend's float).
    """

    def __init__(self, backend: Backend, seed: int | None = None):
        self.backend = backend
        self.seed = seed
        self._gen = np.random.default_rng(seed)

    def normal(self, shape: tuple[int, ...], std: float = 1.0, mean: float = 0.0, dtype=None):
        """Normal draws of ``shape`` with the given mean and standard deviation."""
        host = self._gen.standard_normal(size=tuple(shape)) * std + mean
        return self.backend.from_host(host, dtype=dtype)

    def uniform(self, shape: tuple[int, ...], low: float = 0.0, high: float = 1.0, dtype=None):
        """Uniform draws in ``[low, high)`` of ``shape``."""
        host = self._gen.uniform(low, high, size=tuple(shape))
        return self.backend.from_host(host, dtype=dtype)

    def integers(self, low: int, high: int, shape: tuple[int, ...]):
        """Integer draws in ``[low, high)`` as an int64 device array."""
        host = self._gen.integers(low, high, size=tuple(shape), dtype=np.int64)
        return self.backend.from_host(host, dtype=self.backend.xp.int64)

    def permutation(self, n: int) -> list[int]:
        """A permutation of ``range(n)`` as a host list (used to order mini-batches)."""
        return self._gen.permutation(n).tolist()

    def host_uniform(self, shape: tuple[int, ...]) -> np.ndarray:
        """Uniform ``[0, 1)`` draws kept on the host (for host-side decisions such as sampling)."""
        return self._gen.random(size=tuple(shape))

    def spawn(self) -> RandomSource:
        """An independent stream derived from this one."""
        child = RandomSource(self.backend)
        child._gen = self._gen.spawn(1)[0]
        return child

    def jumped(self, jumps: int = 1) -> RandomSource:
        """A copy of this stream advanced by ``jumps`` × 2¹²⁷ draws (PCG64 ``jumped``),
        reproducible from this one's current state, which it leaves unchanged.

        Streams jumped from the same state never overlap in practice. A stream jumped again
        after this one has drawn ``d`` numbers starts ``d`` draws later than the earlier jump,
        so it repeats what the earlier one drew beyond ``d``.
        """
        child = RandomSource(self.backend, self.seed)
        child._gen = np.random.Generator(self._gen.bit_generator.jumped(int(jumps)))
        return child

    def get_state(self) -> dict:
        """The generator state (a JSON-serialisable dict) for checkpoints."""
        return self._gen.bit_generator.state

    def set_state(self, state: dict) -> None:
        """Restore a state from :meth:`get_state`."""
        self._gen.bit_generator.state = state


@dataclass
class Backend:
    """An array library bound to one device and a default float dtype.

    Attributes:
        name: backend spec as the user wrote it, e.g. ``"numpy"``, ``"cupy:1"``, ``"torch:mps"``.
        xp: the array-API namespace (from ``array_api_compat``).
        device: the device object of ``xp`` that new arrays go to.
        float_dtype: default floating dtype for parameters and activations (float32 by default).
    """

    name: str
    xp: Any
    device: Any
    float_dtype: Any = None
    library: str = ""
    kernels: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.float_dtype is None:
            self.float_dtype = self.xp.float32

    # ------------------------------------------------------------------ creation
    def zeros(self, shape, dtype=None):
        """Zeros of ``shape`` on this backend's device (default dtype: ``float_dtype``)."""
        return self.xp.zeros(tuple(shape), dtype=dtype or self.float_dtype, device=self.device)

    def grad_zeros(self, like):
        """Zeros shaped, typed and placed like ``like``: a gradient nothing has added to yet.

        Callers replace it rather than write into it (``Layer._accumulate`` does), so a
        backend may return a read-only array: the numpy backend gives a zero-stride view of
        one zero, which spares a pass over every parameter at each ``zero_grad``.
        """
        return self.xp.zeros_like(like)

    def scratch(self, shape, dtype=None):
        """An uninitialised array of ``shape`` for a temporary the caller fills completely.

        Semantically ``xp.empty``; the numpy backend recycles the memory of large scratch
        arrays nothing references any more (``backends/scratch.py``), which saves the page
        faults of fresh allocations. GPU libraries already pool their device memory.
        """
        return self.xp.empty(tuple(shape), dtype=dtype or self.float_dtype, device=self.device)

    def scratch_matmul(self, a, b):
        """``xp.matmul(a, b)`` with the product written into :meth:`scratch` memory."""
        return self.xp.matmul(a, b)

    def contiguous_scratch(self, x) -> tuple[Any, bool]:
        """``x`` laid out C-contiguously: ``(x, False)`` when it already is (or the library
        does not expose layouts), else ``(copy, True)``; the copy is the caller's to overwrite
        and sits in :meth:`scratch` memory on numpy."""
        return x, False

    def clear_scratch(self) -> int:
        """Release the memory kept for reuse by :meth:`scratch`; returns the bytes freed."""
        return 0

    def ones(self, shape, dtype=None):
        """Ones of ``shape`` on this backend's device."""
        return self.xp.ones(tuple(shape), dtype=dtype or self.float_dtype, device=self.device)

    def full(self, shape, value, dtype=None):
        """An array of ``shape`` filled with ``value``."""
        return self.xp.full(tuple(shape), value, dtype=dtype or self.float_dtype,
                            device=self.device)

    def arange(self, *args, dtype=None):
        """``xp.arange`` on this device (default dtype int64)."""
        return self.xp.arange(*args, dtype=dtype or self.xp.int64, device=self.device)

    def asarray(self, obj, dtype=None):
        """Python scalars/lists to a device array (``dtype`` defaults to ``float_dtype``).

        Host numpy arrays must go through :meth:`from_host` instead.
        """
        return self.xp.asarray(obj, dtype=dtype or self.float_dtype, device=self.device)

    def scalar(self, value: float, like=None):
        """A 0-d device array of ``value`` in the dtype of ``like`` (or ``float_dtype``)."""
        dtype = like.dtype if like is not None else self.float_dtype
        return self.xp.asarray(value, dtype=dtype, device=self.device)

    # ------------------------------------------------------------------ host <-> device
    def from_host(self, host, dtype=None):
        """Copy a host (numpy) array or nested list to the device, cast to ``dtype``.

        ``dtype`` defaults to ``float_dtype`` for floating input and keeps integer/bool kinds.
        """
        arr = np.asarray(host)
        target = self._resolve_dtype_for_host(arr, dtype)
        return self._from_host(arr, target)

    def to_host(self, x) -> np.ndarray:
        """Copy a device array to a host numpy array (a synchronising copy on GPUs)."""
        return np.asarray(self._to_host(x))

    def _resolve_dtype_for_host(self, arr: np.ndarray, dtype):
        if dtype is not None:
            return dtype
        if arr.dtype.kind == "f" or arr.dtype.kind == "V":
            return self.float_dtype
        if arr.dtype.kind == "b":
            return self.xp.bool
        if arr.dtype.kind in "iu":
            return getattr(self.xp, str(arr.dtype))
        return self.float_dtype

    def _from_host(self, arr: np.ndarray, dtype):
        np_dtype = self.numpy_dtype(dtype)
        arr = np.ascontiguousarray(arr.astype(np_dtype, copy=False))
        return self.xp.asarray(arr, dtype=dtype, device=self.device)

    def _to_host(self, x):
        return np.asarray(x)

    def numpy_dtype(self, dtype) -> np.dtype:
        """The numpy dtype matching an ``xp`` dtype of this backend."""
        name = self.dtype_name(dtype)
        if name == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(name)

    # ------------------------------------------------------------------ non-standard ops
    def scatter_add(self, target, indices, values):
        """Return ``target`` with ``values[i]`` added to row ``indices[i]``; duplicates add.

        Shapes: ``target [N, *F]``, ``indices [M]`` (int), ``values [M, *F]``.
        Reference: a one-hot matrix product (exact, O(N·M) memory).
        """
        xp = self.xp
        n = target.shape[0]
        rows = xp.arange(n, dtype=indices.dtype, device=self.device)
        onehot = xp.astype(rows[:, None] == indices[None, :], values.dtype)
        flat = xp.reshape(values, (values.shape[0], -1))
        return target + xp.reshape(onehot @ flat, target.shape)

    def erf(self, x):
        """The error function, elementwise (reference: Abramowitz-Stegun 7.1.26 refined).

        The reference uses a rational approximation with max abs error 1.2e-7 (float32
        exact); backends with a native ``erf`` override it.
        """
        xp = self.xp
        # Numerical Recipes erfc Chebyshev approximation, fractional error < 1.2e-7.
        z = xp.abs(x)
        t = 1.0 / (1.0 + 0.5 * z)
        poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (
            0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (
                1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
        erfc = t * xp.exp(poly)
        return xp.where(x >= 0, 1.0 - erfc, erfc - 1.0)

    def kernel(self, name: str):
        """An optional fast kernel by name, or ``None`` (callers use the reference path)."""
        return self.kernels.get(name)

    def sync(self) -> None:
        """Block until queued device work is done (no-op on synchronous CPU backends)."""

    def memory_info(self) -> dict:
        """``{"used": bytes, "total": bytes}`` where known, else ``None`` values."""
        return {"used": None, "total": None}

    def random(self, seed: int | None = None) -> RandomSource:
        """A seeded random source whose draws land on this backend."""
        return RandomSource(self, seed)

    # ------------------------------------------------------------------ helpers
    def is_array(self, x) -> bool:
        """Whether ``x`` is an array of this backend's library."""
        from array_api_compat import array_namespace

        try:
            return array_namespace(x) is self.xp
        except TypeError:
            return False

    def float_dtype_of(self, dtype) -> Any:
        """The ``xp`` dtype named by ``dtype`` (a name such as ``"float64"``, or a dtype of this
        library), checked to be a real floating dtype.

        Raises:
            ConfigError: ``dtype`` names no dtype of the library, or not a real floating one.
        """
        from loomx.errors import ConfigError

        resolved = getattr(self.xp, dtype, None) if isinstance(dtype, str) else dtype
        if resolved is None:
            raise ConfigError(f"backend {self.name} has no dtype {dtype!r}; expected a real "
                              "floating dtype (float32, float64, float16, ...)")
        try:
            ok = bool(self.xp.isdtype(resolved, "real floating"))
        except (TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise ConfigError(f"backend {self.name} float dtype must be a real floating dtype "
                              f"(float32, float64, float16, ...), got {dtype!r}")
        return resolved

    def with_dtype(self, float_dtype) -> Backend:
        """A copy of this backend whose default float dtype is ``float_dtype`` (a name or a
        dtype; ``ConfigError`` unless it is a real floating dtype of the library)."""
        float_dtype = self.float_dtype_of(float_dtype)
        return type(self)(name=self.name, xp=self.xp, device=self.device,
                          float_dtype=float_dtype, library=self.library, kernels=self.kernels)

    def without_kernels(self, *names: str) -> Backend:
        """A copy of this backend without the fast kernels ``names``, or with none when no
        name is given: their callers take the array-API reference path (what the kernel tests
        and ``benchmarks.kernels`` compare against). Unknown names are ignored."""
        if not names:
            return replace(self, kernels={})
        return replace(self, kernels={k: v for k, v in self.kernels.items() if k not in names})

    def activate(self):
        """A context manager making this backend's device current (CuPy); a no-op elsewhere."""
        import contextlib

        return contextlib.nullcontext()

    def describe(self) -> str:
        """A one-line human description: library, device, dtype."""
        return f"{self.name} (device={self.device}, float={self.dtype_name(self.float_dtype)})"

    def dtype_name(self, dtype) -> str:
        """``"float32"``-style name of an ``xp`` dtype (or of a dtype name string)."""
        if isinstance(dtype, str):
            return dtype
        for name in _DTYPE_NAMES:
            if getattr(self.xp, name, None) == dtype:
                return name
        return str(dtype).split(".")[-1]

    def __hash__(self) -> int:
        return hash((self.name, str(self.device), str(self.float_dtype)))

    def __eq__(self, other) -> bool:
        return (isinstance(other, Backend) and self.name == other.name
                and str(self.device) == str(other.device)
                and str(self.float_dtype) == str(other.float_dtype))


def offset_slices(kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
                  out_shape: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """For each kernel offset in row-major order: the spatial slices, over the input of a
    windowed operation, of the positions that offset reads in every window
    (``o·stride + offset·dilation`` for the ``out_shape`` windows)."""
    for off in itertools.product(*(range(k) for k in kernel)):
        yield tuple(slice(o * d, o * d + s * (m - 1) + 1, s)
                    for o, d, s, m in zip(off, dilation, stride, out_shape))


def check_window_reach(spatial: tuple[int, ...], kernel: tuple[int, ...],
                       stride: tuple[int, ...], dilation: tuple[int, ...],
                       pads: tuple[tuple[int, int], ...], out_shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless the ``out_shape`` windows of ``kernel`` (with ``stride`` and
    ``dilation``) fit in the input's ``spatial`` shape padded by ``pads`` (the
    ``window_matmul`` kernels' precondition)."""
    n = len(kernel)
    if not (len(spatial) == len(stride) == len(dilation) == len(pads) == len(out_shape) == n):
        raise ValueError(f"windows need one kernel size, stride, dilation, padding and output "
                         f"size per spatial axis; got spatial {tuple(spatial)}, kernel "
                         f"{tuple(kernel)}, out_shape {tuple(out_shape)}")
    reach = tuple((o - 1) * s + (k - 1) * d + 1
                  for o, k, s, d in zip(out_shape, kernel, stride, dilation))
    padded = tuple(m + lo + hi for m, (lo, hi) in zip(spatial, pads))
    if any(r > m for r, m in zip(reach, padded)):
        raise ValueError(f"windows {tuple(out_shape)} of kernel {tuple(kernel)} reach {reach}, "
                         f"beyond the padded input's spatial shape {padded}")


def window_scatter_add_with(add_into: Callable[[Any, Any], Any]) -> Callable:
    """The ``window_scatter_add`` kernel of a library, from its in-place add
    ``add_into(view, part)`` (``np.add(view, part, out=view)``, ``view.add_(part)``...).

    ``(out [B, *S, C], cols [B, *O, K, C], kernel, stride, dilation) -> out``: every window of
    ``cols`` (kernel offsets row-major) added back into ``out`` in place, one strided view per
    offset, no temporaries.
    """

    def window_scatter_add(out, cols, kernel, stride, dilation):
        out_shape = tuple(cols.shape[1:-2])
        for j, spatial in enumerate(offset_slices(kernel, stride, dilation, out_shape)):
            add_into(out[(slice(None), *spatial, slice(None))], cols[..., j, :])
        return out

    return window_scatter_add
