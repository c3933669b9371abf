"""Softmax as a layer, with Loom's ten variants, each with its own exact backward.

Every variant maps logits ``x [B, ..., N]`` to ``y [B, ..., N]`` over the last axis, after
dividing by ``temperature`` (``z = x / T``); the backward is the exact vector-Jacobian product
of the variant, including the ``1/T`` factor.

===============  ===========================================================================
variant          y
===============  ===========================================================================
standard         softmax(z)
temperature      softmax(z) (the same as ``standard``; kept as a Loom name)
grid             ``rows × cols`` independent softmaxes over consecutive blocks of ``cols``
hierarchical     ``levels = [L1, …, Lk]`` with ``Π L = N``: a softmax over each group of the
                 last level (``p(leaf | parent)``, Loom's semantics)
gumbel           softmax((x + G) / T), ``G = -log(-log u)``, fresh seeded noise when
                 ``train=True`` only; plain softmax(z) in evaluation
masked           softmax over the positions where ``mask`` is True; exactly 0 elsewhere
sparsemax        Euclidean projection of z onto the simplex (Martins & Astudillo 2016)
entmax           α-entmax (Peters et al. 2019) by bisection with a fixed iteration count
adaptive         cluster-balanced softmax: ``p(i) = P(c) · P(i | c)`` with ``P(i | c)`` the
                 softmax inside cluster ``c`` and ``P(c)`` a softmax over the clusters'
                 log-mean-exp scores, i.e. ``softmax(z_i - log |c(i)|)``
mixture          Σ_k π_k softmax(z / T_k) with learned weights ``π = softmax(mixture_logits)``
===============  ===========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..backends import RandomSource
from ..errors import ConfigError, ShapeError
from .base import Array, Layer, Shape, register_layer

VARIANTS = ("standard", "grid", "hierarchical", "temperature", "gumbel", "masked", "sparsemax",
            "entmax", "adaptive", "mixture")
_ALIASES = {"sparse": "sparsemax"}
_OPTIONS = {"grid": ("rows", "cols"), "hierarchical": ("levels",), "masked": ("mask",),
            "entmax": ("alpha", "iterations"), "adaptive": ("clusters",),
            "mixture": ("temperatures",)}


# ---------------------------------------------------------------------- kernels (last axis)
def softmax(xp, z: Array) -> Array:
    """Softmax over the last axis (max-subtracted)."""
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def softmax_vjp(xp, y: Array, g: Array) -> Array:
    """``Jᵀ g`` of the softmax at output ``y``: ``y ⊙ (g - Σ g·y)``."""
    return y * (g - xp.sum(g * y, axis=-1, keepdims=True))


def softmax_with(backend, z: Array) -> Array:
    """:func:`softmax` through the backend's ``softmax`` kernel when it has one."""
    fused = backend.kernel("softmax")
    return fused(z) if fused is not None else softmax(backend.xp, z)


def softmax_vjp_with(backend, y: Array, g: Array) -> Array:
    """:func:`softmax_vjp` through the backend's ``softmax_backward`` kernel when it has one."""
    fused = backend.kernel("softmax_backward")
    return fused(y, g) if fused is not None else softmax_vjp(backend.xp, y, g)


def log_softmax(xp, z: Array) -> Array:
    """Log-softmax over the last axis: ``z - max - log Σ exp(z - max)``."""
    shifted = z - xp.max(z, axis=-1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def log_softmax_vjp(xp, y: Array, g: Array) -> Array:
    """``Jᵀ g`` of the log-softmax at output ``y``: ``g - exp(y) · Σ g``."""
    return g - xp.exp(y) * xp.sum(g, axis=-1, keepdims=True)


def sparsemax(xp, z: Array) -> Array:
    """Sparsemax over the last axis: ``max(z - τ, 0)`` with the exact sort-based threshold.

    With ``z_(1) ≥ z_(2) ≥ …`` sorted, the support size is the largest ``k`` with
    ``1 + k·z_(k) > Σ_{j≤k} z_(j)`` and ``τ = (Σ_{j≤k} z_(j) - 1) / k``.
    """
    zs = xp.sort(z, axis=-1, descending=True)
    cs = xp.cumulative_sum(zs, axis=-1)
    k = xp.cumulative_sum(xp.ones_like(zs), axis=-1)
    support = (1.0 + k * zs) > cs
    size = xp.sum(xp.astype(support, z.dtype), axis=-1, keepdims=True)
    total = xp.sum(xp.where(support, zs, 0.0), axis=-1, keepdims=True)
    return xp.maximum(z - (total - 1.0) / size, 0.0)


def sparsemax_vjp(xp, y: Array, g: Array) -> Array:
    """``Jᵀ g`` of sparsemax: ``s ⊙ (g - mean_S g)`` on the support ``S = {y > 0}``."""
    s = xp.astype(y > 0.0, y.dtype)
    mean = xp.sum(g * s, axis=-1, keepdims=True) / xp.sum(s, axis=-1, keepdims=True)
    return s * (g - mean)


def entmax(xp, z: Array, alpha: float, iterations: int) -> Array:
    """α-entmax over the last axis: ``y = max((α-1)·z - τ, 0)^(1/(α-1))`` with ``Σ y = 1``.

    ``τ`` is found by ``iterations`` bisection steps between ``max - 1`` (sum ≥ 1) and
    ``max - N^(1-α)`` (sum ≤ 1); the result is renormalised to sum to one.
    """
    n = z.shape[-1]
    inv = 1.0 / (alpha - 1.0)
    s = z * (alpha - 1.0)
    top = xp.max(s, axis=-1, keepdims=True)
    lo = top - 1.0
    hi = top - (1.0 / n) ** (alpha - 1.0)
    for _ in range(iterations):
        mid = (lo + hi) * 0.5
        above = xp.sum(xp.maximum(s - mid, 0.0) ** inv, axis=-1, keepdims=True) >= 1.0
        lo = xp.where(above, mid, lo)
        hi = xp.where(above, hi, mid)
    y = xp.maximum(s - (lo + hi) * 0.5, 0.0) ** inv
    return y / xp.sum(y, axis=-1, keepdims=True)


def entmax_vjp(xp, y: Array, g: Array, alpha: float) -> Array:
    """``Jᵀ g`` of α-entmax: ``J = diag(q) - q qᵀ / Σq`` with ``q = y^(2-α)`` on the support."""
    positive = y > 0.0
    q = xp.where(positive, xp.where(positive, y, 1.0) ** (2.0 - alpha), 0.0)
    qg = q * g
    return qg - q * (xp.sum(qg, axis=-1, keepdims=True) / xp.sum(q, axis=-1, keepdims=True))


# ---------------------------------------------------------------------- the layer
@register_layer
class Softmax(Layer):
    """A softmax layer over the last axis with one of :data:`VARIANTS`.

    Shapes: ``x [B, ..., N]`` → ``y [B, ..., N]``. Parameters: ``mixture_logits [K]`` (zeros,
    i.e. equal weights) for ``variant="mixture"``, none otherwise.

    Args:
        variant: one of :data:`VARIANTS` (Loom's ``"sparse"`` is accepted for ``sparsemax``).
        temperature: logits are divided by it first (every variant; must be > 0).
        rows, cols: grid shape; one may be omitted and is inferred from ``N``.
        levels: hierarchy level sizes, product ``N``; groups of ``levels[-1]`` are normalised.
        mask: ``N`` booleans, True = position takes part (Loom's convention).
        alpha: entmax α > 1 (1.5 by default; 2 is sparsemax).
        iterations: entmax bisection steps (fixed; no data-dependent loop).
        clusters: adaptive: lists of positions partitioning ``range(N)`` (default: one cluster,
            which is the standard softmax).
        temperatures: mixture component temperatures ``T_k`` (applied after ``temperature``).
    """

    type_name = "softmax"
    config_fields = ("variant", "temperature", "rows", "cols", "levels", "mask", "alpha",
                     "iterations", "clusters", "temperatures")

    def __init__(self, variant: str = "standard", temperature: float = 1.0,
                 rows: int | None = None, cols: int | None = None,
                 levels: Sequence[int] | None = None, mask: Sequence[bool] | None = None,
                 alpha: float = 1.5, iterations: int = 50,
                 clusters: Sequence[Sequence[int]] | None = None,
                 temperatures: Sequence[float] = (0.5, 1.0, 2.0), **kw):
        super().__init__(**kw)
        variant = _ALIASES.get(variant, variant)
        if variant not in VARIANTS:
            raise ConfigError(f"unknown softmax variant {variant!r}; known: {', '.join(VARIANTS)}")
        self.variant = variant
        if not float(temperature) > 0.0:
            raise ConfigError(f"Softmax temperature must be > 0, got {temperature} (Loom reads "
                              "0 as 1; the Loom file reader converts it)")
        self.temperature = float(temperature)
        self.rows = None if rows is None else int(rows)
        self.cols = None if cols is None else int(cols)
        if variant == "grid" and self.rows is None and self.cols is None:
            raise ConfigError("Softmax variant 'grid' needs rows or cols (or both)")
        for label, v in (("rows", self.rows), ("cols", self.cols)):
            if v is not None and v <= 0:
                raise ConfigError(f"Softmax {label} must be positive, got {v}")
        self.levels = None if levels is None else [int(v) for v in levels]
        if variant == "hierarchical" and (not self.levels or min(self.levels) <= 0):
            raise ConfigError(f"Softmax variant 'hierarchical' needs positive levels, "
                              f"got {levels}")
        self.mask = None if mask is None else [bool(v) for v in mask]
        if variant == "masked" and (not self.mask or not any(self.mask)):
            raise ConfigError("Softmax variant 'masked' needs a mask with at least one True "
                              f"position, got {mask}")
        self.alpha = float(alpha)
        self.iterations = int(iterations)
        if variant == "entmax" and (not self.alpha > 1.0 or self.iterations < 1):
            raise ConfigError(f"Softmax entmax needs alpha > 1 and iterations >= 1, got alpha="
                              f"{alpha}, iterations={iterations} (alpha = 1 is variant "
                              "'standard')")
        self.clusters = None if clusters is None else [[int(i) for i in c] for c in clusters]
        self.temperatures = [float(t) for t in temperatures]
        if variant == "mixture" and (not self.temperatures or min(self.temperatures) <= 0):
            raise ConfigError(f"Softmax mixture needs positive temperatures, got {temperatures}")
        self.n: int | None = None
        self._groups: tuple[int, int] | None = None
        self._offsets: list[float] | None = None
        self._constant_cache: tuple = (None, None)
        self._rng: RandomSource | None = None

    def get_config(self) -> dict:
        """``type``, ``variant``, ``temperature`` and only the options the variant uses."""
        cfg = super().get_config()
        for f in ("rows", "cols", "levels", "mask", "alpha", "iterations", "clusters",
                  "temperatures"):
            if f not in _OPTIONS.get(self.variant, ()):
                del cfg[f]
        return cfg

    # ------------------------------------------------------------------ build
    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        self.n = n = self.last_axis_size(input_shape)
        b, v = self.backend, self.variant
        if v == "grid":
            rows = self.rows if self.rows is not None else n // self.cols
            cols = self.cols if self.cols is not None else n // self.rows
            if rows * cols != n:
                want = (self.rows * self.cols if self.rows and self.cols else
                        f"a multiple of {self.rows or self.cols}")
                raise ShapeError(f"{self.describe()} grid (rows={self.rows}, cols={self.cols}) "
                                 f"expected {want} values on the last axis but the input shape "
                                 f"is {list(input_shape)}")
            self._groups = (rows, cols)
        elif v == "hierarchical":
            if math.prod(self.levels) != n:
                raise ShapeError(f"{self.describe()} levels {self.levels} expected "
                                 f"{math.prod(self.levels)} values on the last axis but the "
                                 f"input shape is {list(input_shape)}")
            self._groups = (n // self.levels[-1], self.levels[-1])
        elif v == "masked" and len(self.mask) != n:
            raise ShapeError(f"{self.describe()} mask has {len(self.mask)} entries but the "
                             f"input shape is {list(input_shape)}; expected {n} entries")
        elif v == "adaptive":
            self._offsets = self._cluster_offsets(n, input_shape)
        elif v == "gumbel":
            self._rng = rng.spawn()
        elif v == "mixture":
            self.params["mixture_logits"] = b.zeros((len(self.temperatures),),
                                                    dtype=self.float_dtype)
        return input_shape

    def _cluster_offsets(self, n: int, input_shape: Shape) -> list[float]:
        """``-log |c(i)|`` per position; checks that ``clusters`` partition ``range(n)``."""
        clusters = self.clusters or [list(range(n))]
        offsets: list[float | None] = [None] * n
        for c in clusters:
            for i in c:
                if not 0 <= i < n or offsets[i] is not None:
                    raise ShapeError(f"{self.describe()} clusters must partition positions "
                                     f"0..{n - 1} of input shape {list(input_shape)}; position "
                                     f"{i} is out of range or repeated")
                offsets[i] = -math.log(len(c))
        missing = [i for i, o in enumerate(offsets) if o is None]
        if missing:
            raise ShapeError(f"{self.describe()} clusters must partition positions 0..{n - 1} "
                             f"of input shape {list(input_shape)}; missing {missing[:8]}")
        return offsets

    # ------------------------------------------------------------------ run
    def check_input(self, x: Array) -> None:
        self.check_last_axis(x, self.n)

    def _constant(self) -> Array:
        """The mask (masked) or log-size offsets (adaptive) on the current backend and dtype."""
        key = (self.backend, self.float_dtype)
        if self._constant_cache[0] != key:
            b = self.backend
            value = (b.asarray(self.mask, dtype=b.xp.bool) if self.variant == "masked" else
                     b.asarray(self._offsets, dtype=self.float_dtype))
            self._constant_cache = (key, value)
        return self._constant_cache[1]

    def _grouped(self, a: Array) -> Array:
        rows, cols = self._groups
        return self.xp.reshape(a, (*a.shape[:-1], rows, cols))

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Any]:
        self.check_input(x)
        xp, v = self.xp, self.variant
        z = x if self.temperature == 1.0 else x * (1.0 / self.temperature)
        if v in ("grid", "hierarchical"):
            y = xp.reshape(softmax(xp, self._grouped(z)), x.shape)
        elif v == "gumbel" and train:
            u = self.backend.from_host(self._rng.host_uniform(tuple(x.shape)), dtype=x.dtype)
            noise = -xp.log(-xp.log(xp.clip(u, 1e-10, 1.0 - 1e-7)))
            y = softmax(xp, z + noise * (1.0 / self.temperature))
        elif v == "masked":
            keep = self._constant()
            top = xp.max(xp.where(keep, z, -math.inf), axis=-1, keepdims=True)
            e = xp.exp(xp.where(keep, z - top, -math.inf))
            y = e / xp.sum(e, axis=-1, keepdims=True)
        elif v == "sparsemax":
            y = sparsemax(xp, z)
        elif v == "entmax":
            y = entmax(xp, z, self.alpha, self.iterations)
        elif v == "adaptive":
            y = softmax(xp, z + self._constant())
        elif v == "mixture":
            pi = softmax(xp, self.params["mixture_logits"])
            parts = [softmax(xp, z * (1.0 / t)) for t in self.temperatures]
            y = sum(pi[k] * p for k, p in enumerate(parts))
            return y, (parts, pi)
        else:
            fused = self.backend.kernel("softmax")
            y = softmax(xp, z) if fused is None else fused(z)
        return y, y

    def backward(self, dy: Array, ctx: Any) -> Array:
        xp, v = self.xp, self.variant
        self.check_grad(dy, (ctx[0][0] if v == "mixture" else ctx).shape)
        scale = 1.0 / self.temperature
        if v in ("grid", "hierarchical"):
            dz = xp.reshape(softmax_vjp(xp, self._grouped(ctx), self._grouped(dy)), dy.shape)
        elif v == "sparsemax":
            dz = sparsemax_vjp(xp, ctx, dy)
        elif v == "entmax":
            dz = entmax_vjp(xp, ctx, dy, self.alpha)
        elif v == "mixture":
            parts, pi = ctx
            dz = sum(pi[k] * softmax_vjp(xp, p, dy) * (1.0 / t)
                     for k, (p, t) in enumerate(zip(parts, self.temperatures)))
            dpi = xp.stack([xp.sum(dy * p) for p in parts])
            self._accumulate("mixture_logits", pi * (dpi - xp.sum(pi * dpi)))
        else:
            fused = self.backend.kernel("softmax_backward")
            dz = softmax_vjp(xp, ctx, dy) if fused is None else fused(ctx, dy)
        return dz if scale == 1.0 else dz * scale
