"""The practical matrix-product peak the benchmarks compare loomx's GFLOP/s with."""

from __future__ import annotations

import numpy as np


def sgemm_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Median GFLOP/s of numpy's float32 ``n × n`` matrix product (the practical peak)."""
    import time

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2.0 * n ** 3 / times[len(times) // 2] / 1e9


def cuda_sgemm_gflops(n: int = 4096, repeats: int = 10) -> float:
    """Median GFLOP/s of a float32 ``n × n`` product on the CUDA device (PyTorch, TF32 off)."""
    import time

    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2.0 * n ** 3 / times[len(times) // 2] / 1e9
