"""Rotary position embeddings (RoPE): tables and the rotation, both layouts, partial rotary.

For a head of ``hd`` dims, the first ``rot = rotary_dims(hd, fraction)`` dims are rotated and
the rest pass through. With ``half = rot / 2`` and ``inv_freq[i] = theta^(-2i/rot)``, a vector at
absolute position ``p`` is rotated pairwise by the angles ``p·inv_freq[i]``:

- ``"half"`` (rotate-half, GPT-NeoX / Hugging Face Llama): pair ``i`` is ``(x[i], x[i+half])``;
- ``"interleaved"`` (GPT-J, Meta's original Llama, llama.cpp/GGUF): pair ``i`` is
  ``(x[2i], x[2i+1])``.

Each pair ``(a, b)`` becomes ``(a·cos − b·sin, b·cos + a·sin)``. The rotation is orthogonal, so
its adjoint (used by backward) is the same rotation with ``sin`` negated.

:class:`RopeCache` keeps the tables of positions ``0 … n-1`` and hands out slices, so a layer
computes them once instead of on every forward pass (each KV-cache decoding step included).
"""

from __future__ import annotations

import math
from typing import Any

from ..backends import Backend
from ..errors import ConfigError
from .base import Array

ROPE_STYLES = ("half", "interleaved")


def rotary_dims(head_dim: int, fraction: float) -> int:
    """Number of rotated dims: ``int(fraction·head_dim)``, which must be even and ≥ 2."""
    rot = int(fraction * head_dim)
    if not 0.0 < fraction <= 1.0 or rot < 2 or rot % 2:
        raise ConfigError(f"rope_fraction={fraction} with head_dim={head_dim} gives {rot} "
                          "rotary dims; it must give an even number ≥ 2 (0 < fraction ≤ 1)")
    return rot


def rope_tables(backend: Backend, dtype: Any, start: int, length: int, rot: int,
                theta: float) -> tuple[Array, Array]:
    """``(cos, sin)``, each ``[length, rot/2]``, for absolute positions ``start … start+length-1``.

    Angles are computed in float64 when ``dtype`` is float64 and in float32 otherwise (as Hugging
    Face does), then cast to ``dtype``. ``start`` is a host int (no device sync).
    """
    xp = backend.xp
    work = xp.float64 if dtype == xp.float64 else xp.float32
    i = xp.arange(0, rot, 2, dtype=work, device=backend.device)
    inv_freq = xp.exp(i * (-math.log(float(theta)) / rot))
    pos = xp.arange(start, start + length, dtype=work, device=backend.device)
    ang = pos[:, None] * inv_freq[None, :]
    return xp.astype(xp.cos(ang), dtype), xp.astype(xp.sin(ang), dtype)


class RopeCache:
    """``(cos, sin)`` tables for positions ``0 … n-1``, grown on demand and sliced per call.

    One entry per ``(dtype, rot, theta)``; every entry is dropped when the backend changes
    (``Layer.to``). A request past ``n`` recomputes the tables for ``max(start + length, 2n)``
    positions (amortised O(1) per decoding step). Every element is computed exactly as
    :func:`rope_tables` computes it for the requested range, so results are unchanged.
    """

    def __init__(self) -> None:
        self._backend: Backend | None = None
        self._tables: dict[tuple, tuple[Array, Array]] = {}

    def tables(self, backend: Backend, dtype: Any, start: int, length: int, rot: int,
               theta: float) -> tuple[Array, Array]:
        """``(cos, sin)``, each ``[length, rot/2]``, for positions ``start … start+length-1``."""
        if backend is not self._backend:
            self._backend, self._tables = backend, {}
        key = (str(dtype), int(rot), float(theta))
        end = int(start) + int(length)
        entry = self._tables.get(key)
        if entry is None or entry[0].shape[0] < end:
            have = 0 if entry is None else entry[0].shape[0]
            entry = rope_tables(backend, dtype, 0, max(end, 2 * have), rot, theta)
            self._tables[key] = entry
        cos, sin = entry
        return cos[start:end, :], sin[start:end, :]


def apply_rope(xp, x: Array, cos: Array, sin: Array, rot: int, style: str) -> Array:
    """Rotate the first ``rot`` dims of ``x [..., T, hd]`` with tables ``[T, rot/2]``.

    Pass ``-sin`` to apply the inverse (adjoint) rotation.
    """
    hd = x.shape[-1]
    xr = x[..., :rot] if rot < hd else x
    half = rot // 2
    if style == "half":
        a, b = xr[..., :half], xr[..., half:]
        out = xp.concat([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        pairs = xp.reshape(xr, (*xr.shape[:-1], half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        out = xp.reshape(xp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1), xr.shape)
    if rot < hd:
        out = xp.concat([out, x[..., rot:]], axis=-1)
    return out
