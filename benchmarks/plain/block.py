"""Workload d in plain numpy: a pre-RMSNorm transformer block's training step.

``y = h + down(silu(gate(n2)) · up(n2))`` with ``n2 = rms2(h)``, ``h = x + o(attn(rms1(x)))``,
causal multi-head attention without biases. Parameters as the benchmark's PyTorch block:
``norm1.weight [D]``, ``attn.{q,k,v,o}.weight [D, D]``, ``norm2.weight [D]``,
``ffn.{gate,up}.weight [F, D]``, ``ffn.down.weight [D, F]``. ``x [B, T, D]`` and a target of
the same shape; mean squared error. The input gradient is not computed (nothing reads it).
"""

from __future__ import annotations

import math

import numpy as np

from ..timing import Op
from .common import Params, init_params, mean_squared_error, step_op

EPS = 1e-6


def block_shapes(d: int, ffn: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the block."""
    shapes: dict[str, tuple[int, ...]] = {"norm1.weight": (d,), "norm2.weight": (d,)}
    for name in "qkvo":
        shapes[f"attn.{name}.weight"] = (d, d)
    shapes.update({"ffn.gate.weight": (ffn, d), "ffn.up.weight": (ffn, d),
                   "ffn.down.weight": (d, ffn)})
    return shapes


def _rms_norm(x: np.ndarray, weight: np.ndarray):
    """``x / rms(x) · weight`` over the last axis, with what the backward pass needs."""
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    n = x * r
    return n * weight, n, r


def _rms_norm_backward(dy: np.ndarray, n: np.ndarray, r: np.ndarray, weight: np.ndarray):
    """``(dx, dweight)`` of :func:`_rms_norm`."""
    dn = dy * weight
    dx = r * (dn - n * np.mean(dn * n, axis=-1, keepdims=True))
    return dx, np.sum(dy * n, axis=tuple(range(dy.ndim - 1)))


def block_loss_and_grads(params: Params, x: np.ndarray, target: np.ndarray, heads: int
                         ) -> tuple[float, Params]:
    """MSE of the block's output on ``x [B, T, D]`` and the gradient of every parameter."""
    b, t, d = x.shape
    hd = d // heads
    scale = 1 / math.sqrt(hd)
    wq, wk, wv, wo = (params[f"attn.{n}.weight"] for n in "qkvo")

    def split(m):  # [B·T, D] → [B, heads, T, hd]
        return m.reshape(b, t, heads, hd).transpose(0, 2, 1, 3)

    def merge(m):  # [B, heads, T, hd] → [B·T, D]
        return m.transpose(0, 2, 1, 3).reshape(b * t, d)

    h1, n1, r1 = _rms_norm(x, params["norm1.weight"])
    x1 = h1.reshape(b * t, d)
    q, k, v = split(x1 @ wq.T), split(x1 @ wk.T), split(x1 @ wv.T)
    s = q @ k.transpose(0, 1, 3, 2)
    s *= scale
    s[..., np.triu(np.ones((t, t), dtype=bool), 1)] = -np.inf
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    att = merge(p @ v)
    h = x + (att @ wo.T).reshape(b, t, d)
    h2, n2, r2 = _rms_norm(h, params["norm2.weight"])
    x2 = h2.reshape(b * t, d)
    gate, up = x2 @ params["ffn.gate.weight"].T, x2 @ params["ffn.up.weight"].T
    sig = 1 / (1 + np.exp(-gate))
    silu = gate * sig
    m = silu * up
    y = h + (m @ params["ffn.down.weight"].T).reshape(b, t, d)
    loss, dy = mean_squared_error(y, target)

    grads = {}
    dy2 = dy.reshape(b * t, d)
    grads["ffn.down.weight"] = dy2.T @ m
    dm = dy2 @ params["ffn.down.weight"]
    dgate = dm * up * sig * (1 + gate * (1 - sig))
    dup = dm * silu
    grads["ffn.gate.weight"] = dgate.T @ x2
    grads["ffn.up.weight"] = dup.T @ x2
    dx2 = dgate @ params["ffn.gate.weight"] + dup @ params["ffn.up.weight"]
    dh, grads["norm2.weight"] = _rms_norm_backward(dx2.reshape(b, t, d), n2, r2,
                                                   params["norm2.weight"])
    dh += dy
    da = dh.reshape(b * t, d)
    grads["attn.o.weight"] = da.T @ att
    datt = split(da @ wo)
    dp = datt @ v.transpose(0, 1, 3, 2)
    dv = p.transpose(0, 1, 3, 2) @ datt
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    ds *= scale
    dq, dk = merge(ds @ k), merge(ds.transpose(0, 1, 3, 2) @ q)
    dv = merge(dv)
    grads["attn.q.weight"], grads["attn.k.weight"] = dq.T @ x1, dk.T @ x1
    grads["attn.v.weight"] = dv.T @ x1
    dx1 = dq @ wq + dk @ wk + dv @ wv
    _, grads["norm1.weight"] = _rms_norm_backward(dx1.reshape(b, t, d), n1, r1,
                                                  params["norm1.weight"])
    return loss, grads


def block_step_op(x: np.ndarray, target: np.ndarray, heads: int, ffn: int,
                  lr: float = 0.01) -> Op:
    """Op of one training step of the block on ``x [B, T, D]``."""
    params = init_params(block_shapes(x.shape[2], ffn), x.dtype)
    return step_op(lambda p, a, y: block_loss_and_grads(p, a, y, heads), params, x, target,
                   lr)
