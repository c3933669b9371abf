"""Backends: run-time selection of the array library and device.

Installed as ``loomx.backends``. This is the only package of loomx that imports numpy, CuPy,
PyTorch or array-api-strict; everything else works on ``backend.xp``.

Specs understood by :func:`get_backend` / :func:`use_backend`::

    "numpy"                      host CPU
    "cupy", "cupy:1"             CUDA device 0 / 1 through CuPy
    "torch", "torch:cuda:1", "torch:mps"
    "strict", "strict:device2"   array-api-strict (tests)
    "auto"                       CuPy when a GPU is really usable, else numpy
"""

from __future__ import annotations

if __name__ != "loomx.backends":  # the source folder is installed as loomx.backends only
    raise ImportError("'backends' is not a package of its own: import loomx.backends instead")

import contextlib
import contextvars
import os
from collections.abc import Iterator

from loomx.errors import BackendUnavailableError, ConfigError, LoomxError

from .base import Backend, RandomSource

__all__ = [
    "Backend",
    "RandomSource",
    "available_backends",
    "current_backend",
    "get_backend",
    "kernel_for",
    "set_default_backend",
    "use_backend",
]

_current: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "loomx_backend", default=None)
_default: list[Backend | None] = [None]
_cache: dict[tuple[str, str | None], Backend] = {}

KNOWN = ("numpy", "cupy", "torch", "strict", "auto")


def _index(spec: str, rest: str) -> int:
    """The device number after the colon of ``spec`` (``cupy:1``)."""
    if not rest.isdigit():
        raise LoomxError(f"backend spec {spec!r}: the device after ':' is a number here "
                         f"(e.g. '{spec.partition(':')[0]}:0'), got {rest!r}")
    return int(rest)


def _build(spec: str) -> Backend:
    lib, _, rest = spec.partition(":")
    if lib == "auto":
        from .cupy_backend import cupy_status

        return _build("cupy") if cupy_status()[0] else _build("numpy")
    if lib == "numpy":
        from .numpy_backend import make_numpy_backend

        return make_numpy_backend(spec, None if rest in ("", "cpu") else _index(spec, rest))
    if lib == "cupy":
        from .cupy_backend import make_cupy_backend

        return make_cupy_backend(spec, _index(spec, rest) if rest else None)
    if lib == "torch":
        from .torch_backend import make_torch_backend

        return make_torch_backend(spec, rest or None)
    if lib == "strict":
        from .strict_backend import make_strict_backend

        return make_strict_backend(spec, rest or "device1")
    raise LoomxError(f"unknown backend {spec!r}; expected one of {', '.join(KNOWN)} "
                     "(optionally with ':device', e.g. 'cupy:1', 'torch:mps').")


def get_backend(spec: str | Backend | None = None, dtype: str | None = None) -> Backend:
    """Resolve a backend spec (or ``None`` = current) to a :class:`Backend`.

    Args:
        spec: a spec string, a ``Backend`` (returned as is), or ``None`` for the current one.
        dtype: optional default float dtype name (``"float32"``, ``"float64"``, ...); it must
            name a real floating dtype of the backend's library.

    Raises:
        ConfigError: ``dtype`` is not a real floating dtype of the backend's library.
        LoomxError: the spec names no known backend, or a device the library does not know.
        BackendUnavailableError: the library is missing or has no usable device; the message
            says why and what to install.
    """
    if spec is None:
        backend = current_backend()
    elif isinstance(spec, Backend):
        backend = spec
    else:
        if not isinstance(spec, str):
            raise ConfigError(f"a backend spec must be a string such as 'numpy' or a Backend, "
                              f"got {type(spec).__name__}")
        key = (spec.strip().lower(), None)
        if key not in _cache:
            try:
                _cache[key] = _build(key[0])
            except (LoomxError, ImportError):
                raise
            except (RuntimeError, ValueError, TypeError) as exc:  # e.g. torch: "torch:nope"
                raise LoomxError(f"backend spec {spec!r} names no usable device: {exc}") from exc
        backend = _cache[key]
    if dtype is not None and backend.dtype_name(backend.float_dtype) != dtype:
        backend = backend.with_dtype(dtype)
    return backend


def kernel_for(x, name: str):
    """The kernel ``name`` for the array ``x``, or ``None``; for functions that see arrays
    but no backend (the losses, the rotary embedding).

    The backend in effect counts first when it is of the array's library (an enclosing
    ``use_backend`` block's, else the default set by ``set_default_backend``; so
    ``use_backend(b.without_kernels())`` turns these kernels off too), else a backend already
    built for that library. Only the library of ``x`` is looked at (cheaply, by its type's
    module), so a CuPy array on any device finds the CuPy kernels. No backend is built here.
    """
    library = type(x).__module__.partition(".")[0]
    for current in (_current.get(), _default[0]):
        if current is not None and current.library == library:
            return current.kernel(name)
    for backend in list(_cache.values()):  # a copy: another thread may build a backend
        if backend.library == library:
            return backend.kernel(name)
    return None


def current_backend() -> Backend:
    """The backend in effect: innermost ``use_backend`` context, else the global default,
    else ``$LOOMX_BACKEND`` (read on first use), else numpy."""
    b = _current.get()
    if b is not None:
        return b
    if _default[0] is None:
        _default[0] = get_backend(os.environ.get("LOOMX_BACKEND", "numpy") or "numpy")
    return _default[0]


def set_default_backend(spec: str | Backend, dtype: str | None = None) -> Backend:
    """Set the process-wide default backend and return it."""
    _default[0] = get_backend(spec, dtype)
    return _default[0]


class use_backend(contextlib.AbstractContextManager):  # noqa: N801 - reads like a function
    """Select a backend: ``with loomx.use_backend("cupy"): ...`` or as a plain call.

    Used as a plain call, ``use_backend(spec)`` sets the global default. Used in a ``with``
    statement, it applies only inside the block (a ``ContextVar``, so threads and async tasks
    keep their own choice). Between the call and the ``with`` the global default is briefly
    this backend, so threads that must not see it should use ``with`` on their own backend
    or pass ``backend=`` explicitly.
    """

    def __init__(self, spec: str | Backend, dtype: str | None = None):
        self.backend = get_backend(spec, dtype)
        self._previous_default = _default[0]
        _default[0] = self.backend
        self._token: contextvars.Token | None = None

    def __enter__(self) -> Backend:
        # undo the plain call's global effect, unless the default changed since (a manager
        # made earlier and entered later must not bring back a stale default)
        if _default[0] is self.backend:
            _default[0] = self._previous_default
        self._token = _current.set(self.backend)
        return self.backend

    def __exit__(self, *exc) -> None:
        if self._token is not None:
            _current.reset(self._token)


def available_backends() -> Iterator[tuple[str, bool, str]]:
    """Yield ``(name, available, detail)`` for numpy, cupy, torch and strict.

    ``detail`` is the device list when available, else the reason it is not.
    """
    from .cupy_backend import cupy_status

    yield "numpy", True, "cpu"
    ok, reason = cupy_status()
    yield "cupy", ok, reason
    try:
        import torch

        devs = ["cpu"]
        if torch.cuda.is_available():
            devs += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if torch.backends.mps.is_available():
            devs.append("mps")
        yield "torch", True, f"torch {torch.__version__}: " + ", ".join(devs)
    except ImportError:
        yield "torch", False, "PyTorch is not installed: pip install 'loomx[torch]'"
    try:
        import array_api_strict

        yield "strict", True, f"array-api-strict {array_api_strict.__version__} (tests)"
    except ImportError:
        yield "strict", False, "array-api-strict is not installed (test extra)"


__all__ += ["BackendUnavailableError"]
