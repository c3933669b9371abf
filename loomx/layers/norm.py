"""Normalisation layers over the last axis: LayerNorm and RMSNorm, with exact backward passes."""

from __future__ import annotations

from typing import Any

from ..backends import RandomSource
from ..errors import ConfigError
from .base import Array, Layer, Shape, config_float, register_layer
from .dense import sum_rows


def rms_inverse(xp, x: Array, eps: float) -> Array:
    """``1 / sqrt(mean(x²) + eps)`` over the last axis: ``x [..., D]`` → ``[..., 1]``."""
    return 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)


def rms_input_grad(xp, x: Array, rinv: Array, g: Array) -> Array:
    """Gradient w.r.t. ``x [..., D]`` of ``x · rinv`` (``rinv = rms_inverse(x)``) given ``g``.

    ``g [..., D]`` is the gradient of ``x · rinv``; the result is
    ``rinv·g − x·rinv³·mean(g·x)`` (the mean over the last axis).
    """
    return rinv * g - x * (rinv * rinv * rinv) * xp.mean(g * x, axis=-1, keepdims=True)


class _LastAxisNorm(Layer):
    """Shared shape handling: ``x [B, ..., D]`` → ``y [B, ..., D]``, statistics over ``D``."""

    def __init__(self, eps: float, **kw):
        super().__init__(**kw)
        eps = config_float(eps, "eps", type(self).__name__)
        if not eps > 0.0:
            raise ConfigError(f"{type(self).__name__} eps must be positive, got {eps}")
        self.eps = eps
        self.features: int | None = None

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        self.features = self.last_axis_size(input_shape)
        self._make_params(self.features)
        return input_shape

    def _make_params(self, d: int) -> None:
        raise NotImplementedError

    def check_input(self, x: Array) -> None:
        self.check_last_axis(x, self.features)

    def _widen(self, x: Array, dtype: Any = None) -> Array:
        """``x`` in the wider of its dtype and ``dtype`` (default: the layer's): a float16
        input of a float32 layer is normalised in float32, and the result cast back."""
        xp = self.xp
        wide = xp.result_type(x.dtype, self.float_dtype if dtype is None else dtype)
        return xp.astype(x, wide, copy=False)

    def _sum_rows(self, a: Array) -> Array:
        """Sum ``a [..., D]`` over every axis but the last → ``[D]``."""
        return sum_rows(self.backend, self.xp.reshape(a, (-1, self.features)))


@register_layer
class LayerNorm(_LastAxisNorm):
    """``y = (x - mean) / sqrt(var + eps) · weight + bias`` over the last axis.

    The variance is the population variance (divide by ``D``), as in PyTorch and Loom.

    Shapes: ``x [B, ..., D]`` → ``y [B, ..., D]``.
    Parameters (when ``affine``): ``weight [D]`` (ones), and ``bias [D]`` (zeros) when ``bias``.

    Args:
        eps: added to the variance (Loom's default, also used when its file stores 0).
        affine: learn a per-feature scale (and shift).
        bias: learn the shift ``bias`` (only with ``affine``).
    """

    type_name = "layer_norm"
    aliases = ("layernorm",)
    config_fields = ("eps", "affine", "bias")

    def __init__(self, eps: float = 1e-5, affine: bool = True, bias: bool = True, **kw):
        super().__init__(eps, **kw)
        self.affine = bool(affine)
        self.bias = bool(bias)

    def _make_params(self, d: int) -> None:
        if self.affine:
            self.params["weight"] = self.backend.ones((d,), dtype=self.float_dtype)
            if self.bias:
                self.params["bias"] = self.backend.zeros((d,), dtype=self.float_dtype)

    def forward(self, x: Array, train: bool = False) -> tuple[Array, tuple]:
        self.check_input(x)
        if x.dtype != self.float_dtype:  # another float dtype: computed wide, returned as x's
            y, ctx = self._forward(self._widen(x))
            return (y if y.dtype == x.dtype else self.xp.astype(y, x.dtype)), ctx
        fused = self.backend.kernel("layer_norm_forward")
        if fused is not None:
            y, xhat, rstd = fused(x, self.params.get("weight"), self.params.get("bias"), self.eps)
            return y, (xhat, rstd)
        return self._forward(x)

    def _forward(self, x: Array) -> tuple[Array, tuple]:
        """The reference forward (array-API operations only)."""
        xp = self.xp
        mean = xp.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        var = xp.mean(xc * xc, axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt(var + self.eps)
        xhat = xc * rstd
        y = xhat
        if self.affine:
            y = y * self.params["weight"]
            if self.bias:
                y = y + self.params["bias"]
        return y, (xhat, rstd)

    def backward(self, dy: Array, ctx: tuple) -> Array:
        xhat, rstd = ctx
        self.check_grad(dy, xhat.shape)
        if dy.dtype != xhat.dtype:  # the forward was computed wide: dx in dy's dtype
            dx = self._backward(self._widen(dy, xhat.dtype), xhat, rstd)
            return dx if dx.dtype == dy.dtype else self.xp.astype(dx, dy.dtype)
        fused = self.backend.kernel("layer_norm_backward")
        if fused is not None:
            dx, dweight, dbias = fused(dy, xhat, rstd, self.params.get("weight"))
            if self.affine:
                self._accumulate("weight", dweight)
                if self.bias:
                    self._accumulate("bias", dbias)
            return dx
        return self._backward(dy, xhat, rstd)

    def _backward(self, dy: Array, xhat: Array, rstd: Array) -> Array:
        """The reference backward (array-API operations only)."""
        xp = self.xp
        g = dy
        if self.affine:
            self._accumulate("weight", self._sum_rows(dy * xhat))
            if self.bias:
                self._accumulate("bias", self._sum_rows(dy))
            g = dy * self.params["weight"]
        mean_g = xp.mean(g, axis=-1, keepdims=True)
        mean_gx = xp.mean(g * xhat, axis=-1, keepdims=True)
        return rstd * (g - mean_g - xhat * mean_gx)


@register_layer
class RMSNorm(_LastAxisNorm):
    """``y = x / sqrt(mean(x²) + eps) · s`` over the last axis.

    ``s = weight`` by default, or ``s = 1 + weight`` with ``unit_offset=True`` (the Gemma
    convention; ``weight`` then starts at zeros so that ``s`` starts at one).

    Shapes: ``x [B, ..., D]`` → ``y [B, ..., D]``. Parameters: ``weight [D]``.

    Args:
        eps: added to the mean square (Loom computes with 1e-6 when its file stores none).
        unit_offset: scale by ``1 + weight`` instead of ``weight``.
    """

    type_name = "rms_norm"
    aliases = ("rmsnorm",)
    config_fields = ("eps", "unit_offset")

    def __init__(self, eps: float = 1e-6, unit_offset: bool = False, **kw):
        super().__init__(eps, **kw)
        self.unit_offset = bool(unit_offset)

    def _make_params(self, d: int) -> None:
        make = self.backend.zeros if self.unit_offset else self.backend.ones
        self.params["weight"] = make((d,), dtype=self.float_dtype)

    def _scale(self) -> Array:
        w = self.params["weight"]
        return 1.0 + w if self.unit_offset else w

    def forward(self, x: Array, train: bool = False) -> tuple[Array, tuple]:
        self.check_input(x)
        if x.dtype != self.float_dtype:  # another float dtype: computed wide, returned as x's
            wide = self._widen(x)
            rinv = rms_inverse(self.xp, wide, self.eps)
            y = wide * rinv * self._scale()
            return (y if y.dtype == x.dtype else self.xp.astype(y, x.dtype)), (wide, rinv)
        fused = self.backend.kernel("rms_norm_forward")
        if fused is not None:
            y, rinv = fused(x, self.params["weight"], self.eps, self.unit_offset)
            return y, (x, rinv)
        rinv = rms_inverse(self.xp, x, self.eps)
        return x * rinv * self._scale(), (x, rinv)

    def backward(self, dy: Array, ctx: tuple) -> Array:
        x, rinv = ctx
        self.check_grad(dy, x.shape)
        if dy.dtype != x.dtype:  # the forward was computed wide: dx in dy's dtype
            wide = self._widen(dy, x.dtype)
            self._accumulate("weight", self._sum_rows(wide * x * rinv))
            dx = rms_input_grad(self.xp, x, rinv, wide * self._scale())
            return dx if dx.dtype == dy.dtype else self.xp.astype(dx, dy.dtype)
        fused = self.backend.kernel("rms_norm_backward")
        if fused is not None:
            dx, dweight = fused(dy, x, rinv, self.params["weight"], self.unit_offset)
            self._accumulate("weight", dweight)
            return dx
        self._accumulate("weight", self._sum_rows(dy * x * rinv))
        return rms_input_grad(self.xp, x, rinv, dy * self._scale())
