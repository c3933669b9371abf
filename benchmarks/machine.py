"""What a result was measured on: CPU, cores, BLAS and its kernel, threads, versions, command."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name", platform.machine())
    family, number = fields.get("cpu family"), fields.get("model")
    flags = set(fields.get("flags", "").split())
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16") if f in flags]
    extra = f" (family {family} model {number})" if family else ""
    return f"{model}{extra}, SIMD: {' '.join(simd) or 'n/a'}"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def blas_info() -> dict:
    """numpy's BLAS (name, version, kernel, threads) from threadpoolctl and ``show_config``."""
    import numpy as np

    info: dict = {}
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{cfg.get('name')} {cfg.get('version')}"
    except Exception:  # noqa: BLE001 - show_config layout differs across numpy versions
        info["numpy_blas"] = "unknown"
    try:
        import threadpoolctl

        pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            p = pools[0]
            info["numpy_blas_kernel"] = p.get("architecture", "unknown")
            info["numpy_blas_threads"] = p.get("num_threads")
            info["numpy_blas_threading"] = p.get("threading_layer", "unknown")
    except ImportError:
        info["numpy_blas_kernel"] = "unknown (threadpoolctl not installed)"
    return info


def torch_info() -> dict:
    """PyTorch's version, BLAS, CPU capability, threads and CUDA device (if any)."""
    try:
        import torch
    except ImportError:
        return {"torch": "not installed"}
    cfg = torch.__config__.show()
    blas = next((part.split("=", 1)[1] for part in cfg.replace(",", " ").split()
                 if part.startswith("BLAS_INFO=")), "unknown")
    cap = next((line.split(":", 1)[1].strip() for line in cfg.splitlines()
                if "CPU capability" in line), "unknown")
    info = {"torch": torch.__version__, "torch_blas": blas, "torch_cpu_capability": cap,
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
        info["torch_cudnn_tf32"] = bool(torch.backends.cudnn.allow_tf32)
    return info


def machine_info(threads: int | None = None) -> dict:
    """Everything a result needs to be reproduced and compared (a JSON-serialisable dict)."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "loomx": _version("loomx"),
        "numpy": _version("numpy"),
        "array_api_compat": _version("array-api-compat"),
        "cupy": _version("cupy-cuda12x") if _version("cupy-cuda12x") != "not installed"
        else _version("cupy-cuda13x"),
        "git_commit": _git_commit(),
        "load_avg": [round(v, 2) for v in os.getloadavg()],
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "unset"),
    }
    if threads is not None:
        info["threads"] = threads
    try:
        from loomx.backends.allocator import host_allocator_state

        info["host_allocator"] = host_allocator_state()
    except ImportError:  # a loomx without it
        pass
    try:
        from loomx.backends.numba_kernels import numba_enabled

        info["numba"] = _version("numba")
        info["numba_kernels"] = numba_enabled()
    except ImportError:  # a loomx without them
        pass
    info.update(blas_info())
    info.update(torch_info())
    return info
