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

Context-extension checkpoints rescale the frequencies (``rope_scaling``, a JSON dict with a
``"type"``), exactly as Hugging Face ``transformers`` does:

- ``{"type": "linear", "factor": s}``: ``inv_freq[i] / s`` (position interpolation);
- ``{"type": "llama3", "factor": s, "low_freq_factor": l, "high_freq_factor": h,
  "original_max_position_embeddings": L}``: with wavelength ``w = 2π / inv_freq[i]``, frequencies
  with ``w > L/l`` are divided by ``s``, those with ``w < L/h`` are kept, and in between
  ``((1 − g)/s + g)·inv_freq[i]`` with ``g = (L/w − l) / (h − l)`` (Llama 3.1 / 3.2);
- ``{"type": "yarn", "factor": s, "original_max_position_embeddings": L, "beta_fast": 32,
  "beta_slow": 1, "attention_factor": None, "mscale": None, "mscale_all_dim": None,
  "truncate": True}``: a per-frequency blend of ``inv_freq`` and ``inv_freq / s`` along a linear
  ramp between the dims that make ``beta_fast`` and ``beta_slow`` turns over ``L`` positions, and
  both tables multiplied by the attention factor (default ``0.1·ln(s) + 1``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..backends import Backend, kernel_for
from ..errors import ConfigError
from .base import Array

ROPE_STYLES = ("half", "interleaved")

#: scaling type → (required parameters, optional parameters with their defaults)
ROPE_SCALINGS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "linear": (("factor",), {}),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"), {}),
    "yarn": (("factor", "original_max_position_embeddings"),
             {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "mscale": None,
              "mscale_all_dim": None, "truncate": True}),
}


def check_rope_scaling(scaling: dict | None, where: str = "rope_scaling") -> dict | None:
    """Validate ``scaling`` and return a clean copy (``"type"`` key, numbers as Python floats).

    ``"rope_type"`` is accepted for ``"type"`` (the newer Hugging Face spelling); unknown keys
    are dropped, missing optional ones get their defaults. ``None`` stays ``None``.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where} must be a dict with a 'type' key or None, got {scaling!r}")
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"{where} type must be one of {tuple(ROPE_SCALINGS)}, got {kind!r}; "
                          "use None for plain RoPE")
    required, optional = ROPE_SCALINGS[kind]
    missing = [k for k in required if scaling.get(k) is None]
    if missing:
        raise ConfigError(f"{where} of type {kind!r} needs {list(required)}; missing {missing}")
    out: dict[str, Any] = {"type": kind}
    for k in (*required, *optional):
        v = scaling.get(k, optional.get(k))
        if k == "truncate":
            out[k] = bool(v)
        elif k == "original_max_position_embeddings":
            out[k] = int(v)
        else:
            out[k] = None if v is None else float(v)
    if out["factor"] <= 0:
        raise ConfigError(f"{where} factor must be positive, got {out['factor']}")
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ConfigError(f"{where} high_freq_factor={out['high_freq_factor']} must exceed "
                          f"low_freq_factor={out['low_freq_factor']}")
    return out


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor both tables are multiplied by (1.0 except for yarn)."""
    scaling = check_rope_scaling(scaling)
    if scaling is None or scaling["type"] != "yarn":
        return 1.0
    if scaling["attention_factor"] is not None:
        return float(scaling["attention_factor"])
    s, m, mall = scaling["factor"], scaling["mscale"], scaling["mscale_all_dim"]
    if m and mall:
        return _yarn_mscale(s, m) / _yarn_mscale(s, mall)
    return _yarn_mscale(s)


def scaled_inv_freq(rot: int, theta: float, scaling: dict) -> list[float]:
    """Host-side inverse frequencies ``[rot/2]`` after ``scaling`` (see the module docstring)."""
    scaling = check_rope_scaling(scaling)
    base = [float(theta) ** (-(2 * i) / rot) for i in range(rot // 2)]
    kind, s = scaling["type"], scaling["factor"]
    if kind == "linear":
        return [f / s for f in base]
    old = scaling["original_max_position_embeddings"]
    if kind == "llama3":
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        out = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                out.append(f)
            elif wavelen > old / lo:
                out.append(f / s)
            else:
                g = (old / wavelen - lo) / (hi - lo)
                out.append((1 - g) * f / s + g * f)
        return out

    def correction_dim(turns: float) -> float:
        return rot * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot - 1)
    if low == high:
        high += 0.001
    out = []
    for i, f in enumerate(base):
        extrapolate = 1.0 - min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f / s * (1 - extrapolate) + f * extrapolate)
    return out


def rotary_dims(head_dim: int, fraction: float) -> int:
    """Number of rotated dims: ``int(fraction·head_dim)``, which must be even and ≥ 2."""
    rot = int(fraction * head_dim)
    if not 0.0 < fraction <= 1.0 or rot < 2 or rot % 2:
        raise ConfigError(f"rope_fraction={fraction} with head_dim={head_dim} gives {rot} "
                          "rotary dims; it must give an even number ≥ 2 (0 < fraction ≤ 1)")
    return rot


def rope_tables(backend: Backend, dtype: Any, start: int, length: int, rot: int,
                theta: float, scaling: dict | None = None) -> tuple[Array, Array]:
    """``(cos, sin)``, each ``[length, rot/2]``, for absolute positions ``start … start+length-1``.

    Angles are computed in float64 when ``dtype`` is float64 and in float32 otherwise (as Hugging
    Face does), then cast to ``dtype``. ``start`` is a host int (no device sync). ``scaling`` is a
    dict checked by :func:`check_rope_scaling` (``None``: plain RoPE).
    """
    xp = backend.xp
    work = xp.float64 if dtype == xp.float64 else xp.float32
    scaling = check_rope_scaling(scaling)
    if scaling is None:
        i = xp.arange(0, rot, 2, dtype=work, device=backend.device)
        inv_freq = xp.exp(i * (-math.log(float(theta)) / rot))
    else:
        inv_freq = xp.asarray(scaled_inv_freq(rot, float(theta), scaling), dtype=work,
                              device=backend.device)
    pos = xp.arange(start, start + length, dtype=work, device=backend.device)
    ang = pos[:, None] * inv_freq[None, :]
    cos, sin = xp.cos(ang), xp.sin(ang)
    factor = rope_attention_factor(scaling)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return xp.astype(cos, dtype), xp.astype(sin, dtype)


class RopeCache:
    """``(cos, sin)`` tables for positions ``0 … n-1``, grown on demand and sliced per call.

    One entry per ``(dtype, rot, theta, scaling)``; every entry is dropped when the backend changes
    (``Layer.to``). A request past ``n`` recomputes the tables for ``max(start + length, 2n)``
    positions (amortised O(1) per decoding step). Every element is computed exactly as
    :func:`rope_tables` computes it for the requested range, so results are unchanged.
    """

    def __init__(self) -> None:
        self._backend: Backend | None = None
        self._tables: dict[tuple, tuple[Array, Array]] = {}

    def tables(self, backend: Backend, dtype: Any, start: int, length: int, rot: int,
               theta: float, scaling: dict | None = None) -> tuple[Array, Array]:
        """``(cos, sin)``, each ``[length, rot/2]``, for positions ``start … start+length-1``."""
        if backend is not self._backend:
            self._backend, self._tables = backend, {}
        key = (str(dtype), int(rot), float(theta), json.dumps(scaling, sort_keys=True))
        end = int(start) + int(length)
        entry = self._tables.get(key)
        if entry is None or entry[0].shape[0] < end:
            have = 0 if entry is None else entry[0].shape[0]
            entry = rope_tables(backend, dtype, 0, max(end, 2 * have), rot, theta, scaling)
            self._tables[key] = entry
        cos, sin = entry
        return cos[start:end, :], sin[start:end, :]


def apply_rope(xp, x: Array, cos: Array, sin: Array, rot: int, style: str,
               backend: Backend | None = None) -> Array:
    """Rotate the first ``rot`` dims of ``x [..., T, hd]`` with tables ``[T, rot/2]``.

    Pass ``-sin`` to apply the inverse (adjoint) rotation. Runs as one kernel where
    ``backend`` (default: the one :func:`~loomx.backends.kernel_for` finds for ``x``) has a
    ``rope`` kernel (CuPy), else as :func:`apply_rope_reference`.
    """
    fused = kernel_for(x, "rope") if backend is None else backend.kernel("rope")
    out = None if fused is None else fused(x, cos, sin, rot, style)  # None: declined
    return apply_rope_reference(xp, x, cos, sin, rot, style) if out is None else out


def apply_rope_reference(xp, x: Array, cos: Array, sin: Array, rot: int, style: str) -> Array:
    """:func:`apply_rope` on the array API (the reference of the ``rope`` kernel)."""
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
