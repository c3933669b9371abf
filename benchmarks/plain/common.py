"""What the plain-numpy training steps share: initialisation, loss, SGD and the timed op.

Each step is the math of one benchmark workload written directly in numpy, as a user of numpy
alone would write it: parameters in a dict of arrays (PyTorch's layouts and names), a function
``loss_and_grads(params, x, target) -> (loss, grads)`` with the backward pass by hand, and an
in-place SGD update. No layer objects, no array-API wrapper, no compiled kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..timing import Op

Params = dict[str, np.ndarray]
LossAndGrads = Callable[[Params, np.ndarray, np.ndarray], tuple[float, Params]]


def init_params(shapes: dict[str, tuple[int, ...]], dtype=np.float32, seed: int = 0) -> Params:
    """Parameters of ``shapes``: matrices ``N(0, 1/fan_in)``, vectors named ``*bias`` zero and
    other vectors (norm weights) one."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = (np.zeros if name.endswith("bias") else np.ones)(shape, dtype=dtype)
        else:
            fan_in = int(np.prod(shape[1:]))
            out[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)
    return out


def one_hot(labels: np.ndarray, classes: int, dtype=np.float32) -> np.ndarray:
    """Integer labels ``[B]`` as rows of a ``[B, classes]`` identity."""
    out = np.zeros((labels.shape[0], classes), dtype=dtype)
    out[np.arange(labels.shape[0]), labels] = 1
    return out


def softmax_cross_entropy(logits: np.ndarray, onehot: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``logits [B, N]`` against ``onehot [B, N]`` and its gradient."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    s = e.sum(axis=1, keepdims=True)
    loss = -np.mean(np.sum(onehot * (shifted - np.log(s)), axis=1))
    return float(loss), (e / s - onehot) * (1.0 / logits.shape[0])


def mean_squared_error(y: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean of ``(y - target)²`` over every element, and its gradient."""
    diff = y - target
    return float(np.mean(diff * diff)), diff * (2.0 / diff.size)


def sgd(params: Params, grads: Params, lr: float) -> None:
    """``p -= lr · g`` for every parameter, in place."""
    for name, g in grads.items():
        params[name] -= lr * g


def step_op(loss_and_grads: LossAndGrads, params: Params, x: np.ndarray, target: np.ndarray,
            lr: float = 0.01) -> Op:
    """Op of one training step: loss and gradients, then SGD."""

    def run() -> float:
        loss, grads = loss_and_grads(params, x, target)
        sgd(params, grads, lr)
        return loss

    return Op(run=run)
