"""Workload b in plain numpy: the CNN's training step, convolutions as im2col products.

Parameters in PyTorch's layouts: ``conv1.weight [F1, C, kh, kw]``, ``conv1.bias [F1]``, the
same for ``conv2``, and ``fc.weight [classes, F2·H2·W2]`` over the channel-major flattening of
``nn.Flatten``. ``x [B, C, H, W]``, one-hot targets; softmax cross-entropy. Activations run
channels-last inside (``[B, H, W, C]``), so every window row is one contiguous copy.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..timing import Op
from .common import Params, init_params, one_hot, softmax_cross_entropy, step_op


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def cnn_shapes(channels: int, side: int, classes: int = 10) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of conv(C→32, 3, pad 1) → conv(32→64, 3, stride 2, pad 1) → fc."""
    half = _out_size(side, 3, 2, 1)
    return {"conv1.weight": (32, channels, 3, 3), "conv1.bias": (32,),
            "conv2.weight": (64, 32, 3, 3), "conv2.bias": (64,),
            "fc.weight": (classes, 64 * half * half), "fc.bias": (classes,)}


def im2col(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    """Windows of ``x [B, H, W, C]`` as rows ``[B·Ho·Wo, k·k·C]`` (offset-major, then channel)."""
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    win = sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    b, ho, wo, c = win.shape[:4]
    return win.transpose(0, 1, 2, 4, 5, 3).reshape(b * ho * wo, k * k * c)


def col2im(dcols: np.ndarray, shape: tuple[int, ...], k: int, stride: int,
           pad: int) -> np.ndarray:
    """The adjoint of :func:`im2col`: window gradients added back into ``[B, H, W, C]``."""
    b, h, w, c = shape
    ho, wo = _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
    windows = dcols.reshape(b, ho, wo, k, k, c)
    dxp = np.zeros((b, h + 2 * pad, w + 2 * pad, c), dcols.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, i:i + stride * (ho - 1) + 1:stride,
                j:j + stride * (wo - 1) + 1:stride] += windows[:, :, :, i, j]
    return dxp[:, pad:pad + h, pad:pad + w]


def _conv_relu(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, stride: int):
    """3×3 convolution (pad 1) + bias + ReLU of ``x [B, H, W, C]`` → ``(y [B, Ho, Wo, F],
    cols, wmat)``."""
    f = weight.shape[0]
    cols = im2col(x, 3, stride, 1)
    wmat = weight.transpose(0, 2, 3, 1).reshape(f, -1)
    z = cols @ wmat.T
    z += bias
    np.maximum(z, 0, out=z)
    ho = _out_size(x.shape[1], 3, stride, 1)
    return z.reshape(x.shape[0], ho, -1, f), cols, wmat


def _weight_grad(dz: np.ndarray, cols: np.ndarray, weight: np.ndarray) -> np.ndarray:
    f, c, kh, kw = weight.shape
    return (dz.T @ cols).reshape(f, kh, kw, c).transpose(0, 3, 1, 2)


def cnn_loss_and_grads(params: Params, x: np.ndarray, onehot: np.ndarray
                       ) -> tuple[float, Params]:
    """Cross-entropy of the CNN on ``x [B, C, H, W]`` and the gradient of every parameter."""
    b = x.shape[0]
    x1 = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    a1, cols1, _ = _conv_relu(x1, params["conv1.weight"], params["conv1.bias"], 1)
    a2, cols2, wmat2 = _conv_relu(a1, params["conv2.weight"], params["conv2.bias"], 2)
    flat = a2.transpose(0, 3, 1, 2).reshape(b, -1)
    logits = flat @ params["fc.weight"].T
    logits += params["fc.bias"]
    loss, dlogits = softmax_cross_entropy(logits, onehot)

    grads = {"fc.weight": dlogits.T @ flat, "fc.bias": dlogits.sum(axis=0)}
    f2 = a2.shape[-1]
    dflat = dlogits @ params["fc.weight"]
    dz2 = dflat.reshape(b, f2, *a2.shape[1:3]).transpose(0, 2, 3, 1).reshape(-1, f2)
    dz2 *= a2.reshape(-1, f2) > 0
    grads["conv2.weight"] = _weight_grad(dz2, cols2, params["conv2.weight"])
    grads["conv2.bias"] = dz2.sum(axis=0)
    da1 = col2im(dz2 @ wmat2, a1.shape, 3, 2, 1)
    f1 = a1.shape[-1]
    dz1 = da1.reshape(-1, f1) * (a1.reshape(-1, f1) > 0)
    grads["conv1.weight"] = _weight_grad(dz1, cols1, params["conv1.weight"])
    grads["conv1.bias"] = dz1.sum(axis=0)
    return loss, grads


def cnn_step_op(x: np.ndarray, labels: np.ndarray, classes: int = 10, lr: float = 0.01) -> Op:
    """Op of one training step of the CNN on ``x [B, C, H, W]``."""
    params = init_params(cnn_shapes(x.shape[1], x.shape[2], classes), x.dtype)
    return step_op(cnn_loss_and_grads, params, x, one_hot(labels, classes, x.dtype), lr)
