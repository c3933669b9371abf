"""Workload c in plain numpy: an LSTM over the sequence, its last step into a linear head.

Parameters as ``nn.LSTM`` (gates in the order i, f, g, o) with its two biases summed:
``weight_ih [4H, I]``, ``weight_hh [4H, H]``, ``bias [4H]``, then ``fc.weight [classes, H]``
and ``fc.bias``. ``x [B, T, I]`` (batch first), one-hot targets; softmax cross-entropy.
The input projection of every step is one product before the loop; the backward pass
through time collects the gate gradients of all steps and makes the weight gradients as
one product each.
"""

from __future__ import annotations

import numpy as np

from ..timing import Op
from .common import Params, init_params, one_hot, softmax_cross_entropy, step_op


def lstm_shapes(inputs: int, hidden: int, classes: int = 10) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the LSTM and its head."""
    return {"weight_ih": (4 * hidden, inputs), "weight_hh": (4 * hidden, hidden),
            "bias": (4 * hidden,), "fc.weight": (classes, hidden), "fc.bias": (classes,)}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def lstm_loss_and_grads(params: Params, x: np.ndarray, onehot: np.ndarray
                        ) -> tuple[float, Params]:
    """Cross-entropy of the LSTM head on ``x [B, T, I]`` and the gradient of every
    parameter."""
    b, steps, n_in = x.shape
    w_hh = params["weight_hh"]
    hid = w_hh.shape[1]
    xw = (x.reshape(b * steps, n_in) @ params["weight_ih"].T).reshape(b, steps, 4 * hid)
    xw += params["bias"]
    h_prev = np.zeros((b, steps, hid), x.dtype)  # the state each step starts from
    c_prev = np.zeros((b, steps, hid), x.dtype)
    acts = np.empty((b, steps, 4 * hid), x.dtype)  # i, f, o after the sigmoid, g after tanh
    tanh_c = np.empty((b, steps, hid), x.dtype)
    h, c = h_prev[:, 0], c_prev[:, 0]
    for t in range(steps):
        h_prev[:, t], c_prev[:, t] = h, c
        z = xw[:, t] + h @ w_hh.T
        a = acts[:, t]
        a[:, :2 * hid] = _sigmoid(z[:, :2 * hid])
        a[:, 2 * hid:3 * hid] = np.tanh(z[:, 2 * hid:3 * hid])
        a[:, 3 * hid:] = _sigmoid(z[:, 3 * hid:])
        i, f, g, o = (a[:, k * hid:(k + 1) * hid] for k in range(4))
        c = f * c + i * g
        tanh_c[:, t] = np.tanh(c)
        h = o * tanh_c[:, t]
    logits = h @ params["fc.weight"].T
    logits += params["fc.bias"]
    loss, dlogits = softmax_cross_entropy(logits, onehot)

    grads = {"fc.weight": dlogits.T @ h, "fc.bias": dlogits.sum(axis=0)}
    dh = dlogits @ params["fc.weight"]
    dc = np.zeros_like(dh)
    dz_all = np.empty_like(acts)
    for t in range(steps - 1, -1, -1):
        a, tc = acts[:, t], tanh_c[:, t]
        i, f, g, o = (a[:, k * hid:(k + 1) * hid] for k in range(4))
        dc = dc + dh * o * (1 - tc * tc)
        dz = dz_all[:, t]
        dz[:, :hid] = dc * g * i * (1 - i)
        dz[:, hid:2 * hid] = dc * c_prev[:, t] * f * (1 - f)
        dz[:, 2 * hid:3 * hid] = dc * i * (1 - g * g)
        dz[:, 3 * hid:] = dh * tc * o * (1 - o)
        dc = dc * f
        dh = dz @ w_hh
    dz2 = dz_all.reshape(b * steps, 4 * hid)
    grads["weight_ih"] = dz2.T @ x.reshape(b * steps, n_in)
    grads["weight_hh"] = dz2.T @ h_prev.reshape(b * steps, hid)
    grads["bias"] = dz2.sum(axis=0)
    return loss, grads


def lstm_step_op(x: np.ndarray, labels: np.ndarray, hidden: int, classes: int = 10,
                 lr: float = 0.01) -> Op:
    """Op of one training step of the LSTM head on ``x [B, T, I]``."""
    params = init_params(lstm_shapes(x.shape[2], hidden, classes), x.dtype)
    return step_op(lstm_loss_and_grads, params, x, one_hot(labels, classes, x.dtype), lr)
