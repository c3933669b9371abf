"""The numpy backend (CPU): array-api-compat's numpy namespace plus fast CPU kernels."""

from __future__ import annotations

import numpy as np

from .base import Backend


def _window_gather(x, window: tuple[int, ...], stride: tuple[int, ...]):
    """Strided windows over the trailing ``len(window)`` axes (a read-only view).

    Shapes: ``x [*lead, *spatial]`` → ``[*lead, *out_spatial, *window]``.
    """
    n = len(window)
    view = np.lib.stride_tricks.sliding_window_view(x, window, axis=tuple(range(-n, 0)))
    index = (Ellipsis,) + tuple(slice(None, None, s) for s in stride) + (slice(None),) * n
    return view[index]


class NumpyBackend(Backend):
    """numpy on the host CPU."""

    def erf(self, x):
        """Exact erf through ``math.erf``-equivalent vectorised reference (float64 inside)."""
        return super().erf(x)

    def scatter_add(self, target, indices, values):
        """``np.add.at`` into a copy of ``target`` (duplicates add)."""
        out = np.array(target, copy=True)
        np.add.at(out, np.asarray(indices), np.asarray(values))
        return out

    def memory_info(self) -> dict:
        try:
            import psutil

            vm = psutil.virtual_memory()
            return {"used": vm.total - vm.available, "total": vm.total}
        except ImportError:
            return {"used": None, "total": None}


def make_numpy_backend(name: str = "numpy", index: int | None = None) -> NumpyBackend:
    """Build the numpy backend (``index`` must be ``None``: the host has one device)."""
    import array_api_compat.numpy as xp

    from loomx.errors import BackendUnavailableError

    if index not in (None, 0):
        raise BackendUnavailableError(f"numpy has only the 'cpu' device; got index {index}.")
    return NumpyBackend(name=name, xp=xp, device="cpu", library="numpy",
                        kernels={"window_gather": _window_gather})
