"""Shared tweening primitives: depth scale, derivatives from outputs, clamps, link metrics.

All array functions take and return device arrays of one backend (``xp``); none syncs.
"""

from __future__ import annotations

import math
from typing import Any

from .config import TweenConfig

Array = Any

#: activations whose output range Loom clamps backward targets into (ScaledReLU is Loom's
#: zero value, so a layer without an activation counts as ScaledReLU in faithful mode)
RELU_LIKE = ("scaled_relu", "relu", "leaky_relu", "loom_leaky_relu")


def depth_scale(distance: int, factor: float, cap: float = 100.0) -> float:
    """Loom's ``safeDepthScale``: ``factor**d'`` with ``d' = d`` (d ≤ 10) else ``10 + ln(d − 9)``.

    ``distance`` is ``L − 1 − l`` (0 for the output layer); the result is capped at ``cap`` and
    is 1 for ``distance ≤ 0`` or a non-finite value.
    """
    if distance <= 0:
        return 1.0
    d = float(distance) if distance <= 10 else 10.0 + math.log(distance - 9)
    try:
        v = factor ** d
    except OverflowError:
        return cap
    return 1.0 if not math.isfinite(v) else min(v, cap)


def clip(xp, v: Array, lo: float, hi: float) -> Array:
    """``v`` limited to ``[lo, hi]`` (a fast ``xp.clip`` with Python-scalar bounds)."""
    return xp.minimum(xp.maximum(v, lo), hi)


def safe_grad(xp, v: Array, limit: float) -> Array:
    """Clip ``v`` to ``[−limit, limit]`` and replace NaN/Inf by 0 (Loom's ``safeGrad``)."""
    return xp.where(xp.isfinite(v), clip(xp, v, -limit, limit), 0.0)


def loom_activation(layer, compat: bool) -> str:
    """The activation name Loom would attach to ``layer`` (unset → ScaledReLU in compat mode)."""
    act = getattr(layer, "activation", None)
    if isinstance(act, str):
        return act
    return "scaled_relu" if compat else "identity"


def derivative_from_output(xp, act: str, y: Array, cfg: TweenConfig) -> Array:
    """φ'(z) reconstructed from ``y = φ(z)`` as Loom does (``activateDerivativeFromOutput``).

    Sigmoid, tanh and softplus get ``+ derivative_epsilon``; softplus uses Loom's σ(y) under
    ``loom_compat`` and the correct ``1 − e^(−y)`` otherwise.
    """
    eps = cfg.derivative_epsilon
    if act == "scaled_relu":
        return xp.where(y > 0, xp.full_like(y, cfg.relu_slope), 0.0)
    if act == "relu":
        return xp.where(y > 0, xp.ones_like(y), 0.0)
    if act == "loom_leaky_relu":
        return xp.where(y >= 0, xp.ones_like(y), cfg.leaky_relu_slope)
    if act == "leaky_relu":
        return xp.where(y >= 0, xp.ones_like(y), 0.01)
    if act == "sigmoid":
        return y * (1.0 - y) + eps
    if act == "tanh":
        return 1.0 - y * y + eps
    if act == "softplus":
        if cfg.loom_compat:
            return 1.0 / (1.0 + xp.exp(-y)) + eps
        return 1.0 - xp.exp(-y) + eps
    return xp.ones_like(y)


def clamp_target(xp, t: Array, act: str, cfg: TweenConfig, legacy: bool) -> Array:
    """Clamp a backward target into the range of activation ``act`` (Loom's target clamps)."""
    if act == "tanh":
        return clip(xp, t, cfg.tanh_clamp_min, cfg.tanh_clamp_max)
    if act == "sigmoid":
        return clip(xp, t, cfg.sigmoid_clamp_min, cfg.sigmoid_clamp_max)
    if act in RELU_LIKE:
        lo = 0.0 if legacy else -cfg.relu_clamp_max
        return clip(xp, t, lo, cfg.relu_clamp_max)
    return t


def flat2(xp, a: Array) -> Array:
    """``[B, ...]`` → ``[B, m]``."""
    return xp.reshape(a, (a.shape[0], -1))


def fit_width(xp, backend, a: Array, width: int) -> Array:
    """Truncate or zero-pad the flattened ``[B, m]`` array ``a`` to ``[B, width]``."""
    m = a.shape[1]
    if m == width:
        return a
    if m > width:
        return a[:, :width]
    pad = backend.zeros((a.shape[0], width - m), dtype=a.dtype)
    return xp.concat([a, pad], axis=1)


def link_metrics(xp, f: Array, b: Array) -> tuple[Array, Array]:
    """Gap and link budget between activations ``f`` and targets ``b`` (both ``[B, ...]``).

    Returns 0-d device arrays: gap = mean squared difference (Loom's MSE gap), budget = batch
    mean of ``(cos(f, b) + 1)/2``, or 0.5 for a sample where either squared norm is ≤ 0.001.
    """
    f2, b2 = flat2(xp, f), flat2(xp, b)
    m = min(f2.shape[1], b2.shape[1])
    f2, b2 = f2[:, :m], b2[:, :m]
    d = f2 - b2
    gap = xp.mean(d * d)
    ff = xp.sum(f2 * f2, axis=1)
    bb = xp.sum(b2 * b2, axis=1)
    ok = (ff > 0.001) & (bb > 0.001)
    cos = xp.sum(f2 * b2, axis=1) / xp.sqrt(xp.where(ok, ff * bb, 1.0))
    budget = xp.mean(xp.where(ok, (cos + 1.0) * 0.5, 0.5))
    return gap, budget


def norm(xp, a: Array) -> Array:
    """Euclidean norm of all elements as a 0-d array."""
    return xp.sqrt(xp.sum(a * a))
