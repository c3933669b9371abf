"""The array-api-strict backend: the standard and nothing else, on a simulated device.

Used by the test matrix to prove that loomx code (a) only uses standard functions, (b) places
every array on the right device (mixing devices raises), and (c) never converts device arrays
to the host implicitly. ``make_strict_backend(no_sync=True)`` additionally disables
data-dependent operations; the test harness adds a guard that makes ``float()``/``bool()`` on a
device array raise, the CPU stand-in for a hidden GPU→host sync.
"""

from __future__ import annotations

import numpy as np

from .base import Backend


class StrictBackend(Backend):
    """array_api_strict arrays on a non-CPU simulated device."""

    def _from_host(self, arr: np.ndarray, dtype):
        xp = self.xp
        np_dtype = self.numpy_dtype(dtype)
        on_cpu = xp.asarray(np.ascontiguousarray(arr.astype(np_dtype, copy=False)))
        return xp.asarray(on_cpu, device=self.device)

    def _to_host(self, x):
        import array_api_strict

        on_cpu = array_api_strict.asarray(x, device=array_api_strict.Device("CPU_DEVICE"))
        return np.asarray(on_cpu)


def make_strict_backend(name: str = "strict", device: str = "device1") -> StrictBackend:
    """Build the strict backend on simulated ``device`` (``device1`` by default)."""
    from loomx.errors import BackendUnavailableError

    try:
        import array_api_strict as xp
    except ImportError as exc:
        raise BackendUnavailableError(
            "the strict backend needs array-api-strict: pip install array-api-strict") from exc
    return StrictBackend(name=name, xp=xp, device=xp.Device(device), library="array_api_strict")
