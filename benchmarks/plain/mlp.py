"""Workload a in plain numpy: the ReLU MLP's training step.

Parameters ``fc{i}.weight [out, in]`` and ``fc{i}.bias [out]``; ``x [B, sizes[0]]``, one-hot
targets ``[B, sizes[-1]]``; softmax cross-entropy.
"""

from __future__ import annotations

import numpy as np

from ..timing import Op
from .common import Params, init_params, one_hot, softmax_cross_entropy, step_op


def mlp_shapes(sizes: list[int]) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of an MLP with layer widths ``sizes``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"fc{i}.weight"], shapes[f"fc{i}.bias"] = (n_out, n_in), (n_out,)
    return shapes


def mlp_loss_and_grads(params: Params, x: np.ndarray, onehot: np.ndarray
                       ) -> tuple[float, Params]:
    """Cross-entropy of the MLP on ``x [B, in]`` and the gradient of every parameter."""
    last = len(params) // 2 - 1
    acts = [x]
    for i in range(last + 1):
        z = acts[-1] @ params[f"fc{i}.weight"].T
        z += params[f"fc{i}.bias"]
        if i < last:
            np.maximum(z, 0, out=z)
        acts.append(z)
    loss, dz = softmax_cross_entropy(acts[-1], onehot)
    grads = {}
    for i in range(last, -1, -1):
        grads[f"fc{i}.weight"] = dz.T @ acts[i]
        grads[f"fc{i}.bias"] = dz.sum(axis=0)
        if i > 0:
            dz = dz @ params[f"fc{i}.weight"]
            dz *= acts[i] > 0
    return loss, grads


def mlp_step_op(sizes: list[int], x: np.ndarray, labels: np.ndarray, lr: float = 0.01) -> Op:
    """Op of one training step of the MLP with widths ``sizes`` on ``x [B, sizes[0]]``."""
    params = init_params(mlp_shapes(sizes), x.dtype)
    return step_op(mlp_loss_and_grads, params, x, one_hot(labels, sizes[-1], x.dtype), lr)
