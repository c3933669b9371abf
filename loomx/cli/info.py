"""``loomx info``: versions, every backend with its status, devices, default dtype."""

from __future__ import annotations

import argparse
import platform
import sys
from importlib import metadata


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None,
                        help="also describe this backend spec in detail (e.g. cupy:0)")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..backends import available_backends, current_backend, get_backend

    print(f"loomx {__version__}  (Python {sys.version.split()[0]}, {platform.platform()})")
    print("packages:")
    for dist in ("numpy", "array-api-compat", "safetensors", "ml_dtypes", "array-api-strict",
                 "numba", "torch", "cupy-cuda12x", "cupy-cuda13x"):
        print(f"  {dist:<18} {_version(dist)}")
    print("backends:")
    for name, ok, detail in available_backends():
        print(f"  {name:<8} {'available' if ok else 'unavailable':<12} {detail}")
    backend = current_backend()
    print(f"default backend: {backend.describe()}  (set LOOMX_BACKEND or loomx.use_backend)")
    if args.backend:
        print(f"requested: {get_backend(args.backend).describe()}")
    from ..backends.allocator import ENV, host_allocator_label, host_allocator_state

    state = host_allocator_state()
    print(f"host allocator: {host_allocator_label(state)} ({state['reason']}; "
          f"{ENV}=default turns it off)")
    from ..backends.numba_kernels import numba_enabled

    if numba_enabled():
        print("compiled CPU kernels: on (numba; LOOMX_NUMBA=0 turns them off)")
    elif _version("numba") != "not installed":
        print("compiled CPU kernels: off (LOOMX_NUMBA=0)")
    else:
        print('compiled CPU kernels: off (pip install "loomx[jit]" adds them)')
    return 0
