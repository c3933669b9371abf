"""Gradient clipping by global norm and by value, on the device (no host sync).

- ``clip_grad_norm(params, max_norm)``: ``n = √(Σ_p Σ g²)`` over every gradient, then every
  gradient is scaled by ``min(1, max_norm / (n + 1e-6))`` (``torch.nn.utils.clip_grad_norm_``).
  The scale is a 0-d device array, so the norm never has to reach the host.
- ``clip_grad_value(params, clip_value)``: every gradient entry clipped to ``[-c, c]``.

A weight that several layers hold (a tied embedding and head) is one parameter, as for the
optimizers: its gradient is the sum of its entries' gradients. The norm counts that sum once,
and clipping by value clips the sum (kept in the first entry; the others then hold zeros).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError
from ..layers.base import Layer, ParamRef

Array = Any


def _refs(params: Layer | Iterable[ParamRef]) -> list[ParamRef]:
    return list(params.parameters() if isinstance(params, Layer) else params)


def _tied(refs: list[ParamRef]) -> list[list[ParamRef]]:
    """``refs`` grouped by the array they hold, in order of first appearance."""
    groups: dict[int, list[ParamRef]] = {}
    for r in refs:
        groups.setdefault(id(r.value), []).append(r)
    return list(groups.values())


def _summed(group: list[ParamRef]) -> Array:
    g = group[0].grad
    for r in group[1:]:
        g = g + r.grad
    return g


def global_grad_norm(params: Layer | Iterable[ParamRef]) -> Array:
    """The L2 norm of all gradients together (a tied weight's summed once), a 0-d device
    array."""
    refs = _refs(params)
    xp = refs[0].layer.backend.xp
    total = None
    for group in _tied(refs):
        g = _summed(group)
        s = xp.sum(g * g)
        total = s if total is None else total + s
    return xp.sqrt(total)


def clip_grad_norm(params: Layer | Iterable[ParamRef], max_norm: float,
                   eps: float = 1e-6) -> Array:
    """Scale all gradients so their global norm is at most ``max_norm``; returns the norm
    before clipping (0-d device array)."""
    if max_norm <= 0:
        raise ConfigError(f"max_norm must be positive, got {max_norm}")
    refs = _refs(params)
    xp = refs[0].layer.backend.xp
    norm = global_grad_norm(refs)
    coef = max_norm / (norm + eps)
    scale = xp.where(coef < 1.0, coef, 1.0)
    for r in refs:
        r.grad = r.grad * xp.astype(scale, r.grad.dtype)
    return norm


def clip_grad_value(params: Layer | Iterable[ParamRef], clip_value: float) -> None:
    """Clip every gradient entry to ``[-clip_value, clip_value]``."""
    if clip_value <= 0:
        raise ConfigError(f"clip_value must be positive, got {clip_value}")
    for group in _tied(_refs(params)):
        xp = group[0].layer.backend.xp
        group[0].grad = xp.clip(_summed(group), -clip_value, clip_value)
        for r in group[1:]:
            r.grad = xp.zeros_like(r.grad)
