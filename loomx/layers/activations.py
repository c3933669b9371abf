"""Elementwise activation functions with exact derivatives, written once against ``xp``.

Each activation is a pair ``forward(backend, z) -> y`` and ``backward(backend, z, y, dy) -> dz``
(``dy`` is the gradient w.r.t. ``y``; ``z`` the pre-activation). Names:

==================  ===========================================  ================================
name                f(z)                                         note
==================  ===========================================  ================================
identity/linear     z
relu                max(0, z)                                    the usual ReLU
scaled_relu         max(0, 1.1·z)                                Loom's ``"relu"``
leaky_relu          z if z ≥ 0 else 0.01·z                       PyTorch's default slope
loom_leaky_relu     z if z ≥ 0 else 0.1·z                        Loom's ``"leaky_relu"``
sigmoid             1 / (1 + e^-z)                               overflow-safe
tanh                tanh z
softplus            ln(1 + e^z)                                  overflow-safe (Loom's is not)
gelu                z·Φ(z) = z·(1 + erf(z/√2))/2                 exact (erf)
gelu_tanh           tanh approximation of GELU                   GPT-2 / Gemma ``gelu_pytorch_tanh``
silu / swish        z·σ(z)
mish                z·tanh(softplus(z))
==================  ===========================================  ================================
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

Array = Any

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Activation:
    """An activation: ``forward(backend, z)`` and ``backward(backend, z, y, dy)``."""

    name: str
    forward: Callable[[Any, Array], Array]
    backward: Callable[[Any, Array, Array, Array], Array]


def sigmoid(xp, z: Array) -> Array:
    """``σ(z) = 1 / (1 + e^-z)`` elementwise, as ``½·tanh(½z) + ½``.

    The tanh form never overflows, needs one transcendental and no data-dependent select
    (numpy's ``where`` on a random mask is many times slower than arithmetic); its absolute
    error is below one float32 ulp of 0.5.
    """
    return 0.5 * xp.tanh(0.5 * z) + 0.5


def _softplus(xp, z):
    return xp.maximum(z, 0.0) + xp.log1p(xp.exp(-xp.abs(z)))


def _relu_fwd(b, z):
    return b.xp.maximum(z, 0.0)


def _step(b, z: Array, dtype) -> Array:
    """``1.0`` where ``z > 0``, else ``0.0`` (multiplying by it beats ``xp.where`` on numpy)."""
    return b.xp.astype(z > 0, dtype)


def _relu_bwd(b, z, y, dy):
    return dy * _step(b, z, dy.dtype)


def _scaled_relu_fwd(b, z):
    return b.xp.maximum(z * 1.1, 0.0)


def _scaled_relu_bwd(b, z, y, dy):
    return dy * (_step(b, z, dy.dtype) * 1.1)


def _leaky(slope: float) -> tuple[Callable, Callable]:
    """Leaky ReLU with ``0 < slope < 1``: ``max(z, slope·z)``; derivative 1 for ``z > 0``
    and ``slope`` otherwise (at 0 too, as PyTorch)."""

    def fwd(b, z):
        return b.xp.maximum(z, z * slope)

    def bwd(b, z, y, dy):
        m = _step(b, z, dy.dtype)
        return dy * (m + (1.0 - m) * slope)

    return fwd, bwd


def _sigmoid_fwd(b, z):
    return sigmoid(b.xp, z)


def _sigmoid_bwd(b, z, y, dy):
    return dy * y * (1.0 - y)


def _tanh_fwd(b, z):
    return b.xp.tanh(z)


def _tanh_bwd(b, z, y, dy):
    return dy * (1.0 - y * y)


def _softplus_fwd(b, z):
    return _softplus(b.xp, z)


def _softplus_bwd(b, z, y, dy):
    return dy * sigmoid(b.xp, z)


def _gelu_fwd(b, z):
    return 0.5 * z * (1.0 + b.erf(z * _INV_SQRT2))


def _gelu_bwd(b, z, y, dy):
    xp = b.xp
    cdf = 0.5 * (1.0 + b.erf(z * _INV_SQRT2))
    pdf = xp.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return dy * (cdf + z * pdf)


def _gelu_tanh_fwd(b, z):
    inner = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
    return 0.5 * z * (1.0 + b.xp.tanh(inner))


def _gelu_tanh_bwd(b, z, y, dy):
    xp = b.xp
    inner = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
    t = xp.tanh(inner)
    dinner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    return dy * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner)


def _silu_fwd(b, z):
    return z * sigmoid(b.xp, z)


def _silu_bwd(b, z, y, dy):
    s = sigmoid(b.xp, z)
    return dy * (s + z * s * (1.0 - s))


def _mish_fwd(b, z):
    return z * b.xp.tanh(_softplus(b.xp, z))


def _mish_bwd(b, z, y, dy):
    xp = b.xp
    t = xp.tanh(_softplus(xp, z))
    return dy * (t + z * (1.0 - t * t) * sigmoid(xp, z))


def _identity_fwd(b, z):
    return z


def _identity_bwd(b, z, y, dy):
    return dy


ACTIVATIONS: dict[str, Activation] = {}


def _register(name: str, fwd: Callable, bwd: Callable, *aliases: str) -> None:
    act = Activation(name, fwd, bwd)
    for n in (name, *aliases):
        ACTIVATIONS[n] = act


_register("identity", _identity_fwd, _identity_bwd, "linear", "none")
_register("relu", _relu_fwd, _relu_bwd)
_register("scaled_relu", _scaled_relu_fwd, _scaled_relu_bwd, "loom_relu")
_register("leaky_relu", *_leaky(0.01))
_register("loom_leaky_relu", *_leaky(0.1))
_register("sigmoid", _sigmoid_fwd, _sigmoid_bwd)
_register("tanh", _tanh_fwd, _tanh_bwd)
_register("softplus", _softplus_fwd, _softplus_bwd)
_register("gelu", _gelu_fwd, _gelu_bwd)
_register("gelu_tanh", _gelu_tanh_fwd, _gelu_tanh_bwd, "gelu_new", "gelu_pytorch_tanh")
_register("silu", _silu_fwd, _silu_bwd, "swish")
_register("mish", _mish_fwd, _mish_bwd)


def get_activation(name: str | None) -> Activation:
    """Look up an activation by name (``None`` means identity)."""
    key = "identity" if name is None else str(name).lower()
    if key not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[key]


def bias_activation(backend, act: Activation, x: Array, bias: Array | None = None, *,
                    owned: bool = False) -> tuple[Array, Array]:
    """``(z, y)`` with ``z = x + bias`` (``bias [N]`` over the last axis, or ``None``) and
    ``y = act(z)``; one fused pass where the backend has a ``bias_act:<name>`` kernel.

    ``owned=True`` says that ``x`` is a fresh array nobody else reads (a matrix product just
    computed): the bias is then added into it in place, saving an array of its size, and a
    backend's ``bias_act_inplace:<name>`` kernel may overwrite it with ``y`` and return the
    same array as ``z`` (ReLU family: :func:`activation_backward` gives the same gradient from
    either).
    """
    if owned:
        inplace = backend.kernel("bias_act_inplace:" + act.name)
        if inplace is not None:
            return inplace(x, bias)
    fused = backend.kernel("bias_act:" + act.name)
    if fused is not None:
        return fused(x, bias)
    if bias is None:
        z = x
    elif owned and bias.dtype == x.dtype:
        x += bias
        z = x
    else:
        z = x + bias
    return z, act.forward(backend, z)


def activation_backward(backend, act: Activation, z: Array, y: Array, dy: Array, *,
                        owned: bool = False) -> Array:
    """``dz`` of ``y = act(z)`` given ``dy``; one fused pass where the backend has an
    ``act_backward:<name>`` kernel.

    ``owned=True`` says that ``dy`` is a fresh array nobody else reads: a backend's
    ``act_backward_inplace:<name>`` kernel may then overwrite it with ``dz`` and return it.
    """
    if owned:
        inplace = backend.kernel("act_backward_inplace:" + act.name)
        if inplace is not None:
            return inplace(z, y, dy)
    fused = backend.kernel("act_backward:" + act.name)
    if fused is not None:
        return fused(z, y, dy)
    return act.backward(backend, z, y, dy)


#: Loom's activation names (JSON strings) → loomx names.
LOOM_ACTIVATIONS = {
    "relu": "scaled_relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "softplus": "softplus",
    "leaky_relu": "loom_leaky_relu",
    "linear": "identity",
}
