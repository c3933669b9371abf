"""The MLP training step written directly in numpy: the yardstick for the backend's overhead.

Same math as the loomx step (Dense + ReLU layers, softmax cross-entropy, SGD), with in-place
parameter updates, no layer objects, no array-API wrapper.
"""

from __future__ import annotations

import numpy as np

from .timing import Op


def mlp_step_op(sizes: list[int], x: np.ndarray, labels: np.ndarray, lr: float = 0.01) -> Op:
    """Op of one training step of a ReLU MLP with layer widths ``sizes`` on ``x [B, sizes[0]]``."""
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((o, i)) * np.sqrt(2.0 / i)).astype(np.float32)
               for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [np.zeros(o, dtype=np.float32) for o in sizes[1:]]
    onehot = np.zeros((x.shape[0], sizes[-1]), dtype=np.float32)
    onehot[np.arange(x.shape[0]), labels] = 1.0
    last = len(weights) - 1

    def run() -> float:
        acts = [x]
        for i, (w, b) in enumerate(zip(weights, biases)):
            z = acts[-1] @ w.T
            z += b
            if i < last:
                np.maximum(z, 0.0, out=z)
            acts.append(z)
        logits = acts[-1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        s = e.sum(axis=1, keepdims=True)
        loss = -np.mean(np.sum(onehot * (shifted - np.log(s)), axis=1))
        dz = (e / s - onehot) * np.float32(1.0 / x.shape[0])
        for i in range(last, -1, -1):
            dw = dz.T @ acts[i]
            db = dz.sum(axis=0)
            if i > 0:
                dz = dz @ weights[i]
                dz *= acts[i] > 0
            weights[i] -= np.float32(lr) * dw
            biases[i] -= np.float32(lr) * db
        return float(loss)

    return Op(run=run)


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
