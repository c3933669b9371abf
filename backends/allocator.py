"""glibc's large-block thresholds, pinned high so that step temporaries reuse memory.

glibc serves blocks at or above its *mmap threshold* with fresh ``mmap`` pages, and returns
free memory at the top of the heap to the kernel once it exceeds its *trim threshold*. Both
start low (128 KiB) and grow on their own: when a block that was mmapped is freed, the mmap
threshold rises to its size, up to 32 MiB on 64-bit systems, and the trim threshold follows at
twice that (``mallopt(3)``). Until they have grown, every temporary of a few megabytes (an
attention score tensor, a convolution's window copy, an FFN activation) lands on fresh pages,
and the kernel zeroes each 4 KiB page on its first touch. On the measured VM that cost a
transformer training step about 6,000 page faults and 9 % of its time. It also made loomx's
speed depend on what else the process had allocated (with PyTorch loaded the faults were gone).

:func:`tune_host_allocator` sets the two thresholds once: the mmap threshold to glibc's own
ceiling, 32 MiB, and the trim threshold to 256 MiB (at 64 MiB, where glibc itself stops, a
transformer step's transient memory was still trimmed and faulted in again in some runs), so
up to 256 MiB of freed memory may stay with the process. It runs when the first numpy backend
is built, only on glibc, and never when the user has chosen either threshold through glibc's
environment variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or those
``GLIBC_TUNABLES``) or preloads another allocator (jemalloc, tcmalloc, mimalloc). glibc applies
the trim threshold to each malloc arena, so every thread that allocates may keep up to that
much.
``LOOMX_HOST_ALLOCATOR=default`` turns it off. The setting is process-wide, like any
``mallopt``; ``loomx info`` and the benchmark reports show whether it was applied.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import warnings

#: ``M_TRIM_THRESHOLD`` and ``M_MMAP_THRESHOLD`` from glibc's ``malloc.h``.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
ENV = "LOOMX_HOST_ALLOCATOR"

_lock = threading.Lock()
_state: dict | None = None


def _decide() -> dict:
    choice = os.environ.get(ENV, "tuned").strip().lower()
    if choice in ("default", "off", "0", "no", "false"):
        return {"tuned": False, "reason": f"{ENV}={os.environ[ENV]}"}
    if choice not in ("tuned", "on", "1", "yes", "true", ""):
        reason = f"{ENV}={os.environ[ENV]!r} is not 'tuned' or 'default'"
        warnings.warn(f"{reason}: the host allocator is left alone", stacklevel=3)
        return {"tuned": False, "reason": reason}
    user = [v for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if v in os.environ]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    user += [f"GLIBC_TUNABLES {t}" for t in ("malloc.mmap_threshold", "malloc.trim_threshold")
             if t in tunables]
    if user:
        return {"tuned": False, "reason": f"set by the user ({', '.join(user)})"}
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {"tuned": False, "reason": "not glibc"}
    preloaded = [a for a in ("jemalloc", "tcmalloc", "mimalloc")
                 if a in os.environ.get("LD_PRELOAD", "")]
    if preloaded:
        return {"tuned": False, "reason": f"{preloaded[0]} is preloaded (LD_PRELOAD)"}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {"tuned": False, "reason": "mallopt not found"}
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return {"tuned": False, "reason": "mallopt refused the mmap threshold"}
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return {"tuned": True, "reason": f"glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB; "
                                         "mallopt refused the trim threshold"}
    return {"tuned": True, "reason": f"glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
                                     f"trim threshold {TRIM_THRESHOLD >> 20} MiB"}


def tune_host_allocator() -> dict:
    """Apply the thresholds once per process (see the module docstring); returns
    :func:`host_allocator_state`."""
    global _state
    with _lock:
        if _state is None:
            _state = _decide()
        return dict(_state)


def host_allocator_state() -> dict:
    """``{"tuned": bool | None, "reason": str}``; ``tuned`` is ``None`` before any numpy
    backend was built."""
    if _state is None:
        return {"tuned": None, "reason": "no numpy backend built yet"}
    return dict(_state)


#: How :func:`host_allocator_state`'s ``tuned`` reads in reports.
_LABELS = {True: "tuned", False: "left alone", None: "not tuned"}


def host_allocator_label(state: dict | None = None) -> str:
    """``"tuned"``, ``"left alone"`` (loomx decided not to) or ``"not tuned"`` (no numpy
    backend built yet) for ``state`` (default: this process's)."""
    return _LABELS[(state or host_allocator_state())["tuned"]]
