"""Feed-forward blocks of transformer layers: the gated MLP (SwiGLU/GeGLU) and the MLP block.

Both are complete blocks (projection in and out) acting on the last axis, like Loom's SwiGLU.
Weights use the PyTorch layout ``[out, in]`` and are initialised with the ``"torch"`` scheme
(U(±1/sqrt(fan_in)), PyTorch's ``nn.Linear`` default); biases start at zero.
"""

from __future__ import annotations

from ..backends import RandomSource
from .activations import get_activation, sigmoid
from .base import Array, Layer, Shape, config_int, register_layer
from .dense import backend_linear, linear_backward
from .init import init_weight


def silu_gate_forward(xp, g: Array, u: Array) -> tuple[Array, Array]:
    """SwiGLU's gating (the reference of the ``silu_gate_forward`` kernel): ``g, u [..., M]``
    (the gate and up projections) → ``(σ(g), h = g·σ(g)·u)``; ``σ(g)`` is kept for the
    backward pass."""
    s = sigmoid(xp, g)
    return s, g * s * u


def silu_gate_backward(xp, g: Array, u: Array, s: Array, dh: Array) -> tuple[Array, Array]:
    """The gradients ``(dg, du)`` of :func:`silu_gate_forward` given ``dh`` (the reference of
    the ``silu_gate_backward`` kernel)."""
    return dh * u * (s + g * s * (1.0 - s)), dh * g * s


class _Block(Layer):
    """Shared shape handling: ``x [B, ..., D]`` → ``y [B, ..., D]`` through width ``M``.

    ``y`` (and ``dx``) keep the dtype of ``x``: an input of another float dtype than the
    layer's (float16 into a float32 block, say) is computed in the wider of the two.
    """

    def __init__(self, hidden_features: int, **kw):
        super().__init__(**kw)
        self.hidden_features = config_int(hidden_features, "hidden_features",
                                          type(self).__name__)
        self.features: int | None = None

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        self.features = d = self.last_axis_size(input_shape)
        m, dt = self.hidden_features, self.float_dtype
        for name, shape in self._weights(d, m):
            self.params[name] = init_weight(rng, "torch", shape, shape[1], shape[0], dt)
        for name, size in self._biases(d, m):
            self.params[name] = self.backend.zeros((size,), dtype=dt)
        return input_shape

    def _weights(self, d: int, m: int) -> list[tuple[str, tuple[int, int]]]:
        raise NotImplementedError

    def _biases(self, d: int, m: int) -> list[tuple[str, int]]:
        raise NotImplementedError

    def check_input(self, x: Array) -> None:
        self.check_last_axis(x, self.features)

    def forward(self, x: Array, train: bool = False) -> tuple[Array, tuple]:
        self.check_input(x)
        if x.dtype == self.float_dtype:
            return self._forward(x)
        # another float dtype: computed in the wider of the two, returned in x's dtype
        xp = self.xp
        y, ctx = self._forward(xp.astype(x, xp.result_type(x.dtype, self.float_dtype),
                                         copy=False))
        return (y if y.dtype == x.dtype else xp.astype(y, x.dtype)), ctx

    def backward(self, dy: Array, ctx: tuple) -> Array:
        x = ctx[0]
        self.check_grad(dy, x.shape)
        if dy.dtype == x.dtype:
            return self._backward(dy, ctx)
        dx = self._backward(self.xp.astype(dy, x.dtype), ctx)  # the forward ran wide
        return self.xp.astype(dx, dy.dtype)

    def _forward(self, x: Array) -> tuple[Array, tuple]:
        """``x [B, ..., D]`` in the layer's dtype (or wider) → ``(y, ctx)``."""
        raise NotImplementedError

    def _backward(self, dy: Array, ctx: tuple) -> Array:
        """``dy`` in the dtype of the forward's computation → ``dx``."""
        raise NotImplementedError

    def _linear(self, x: Array, prefix: str) -> Array:
        """``x @ W.T (+ b)`` with parameters ``{prefix}_weight`` / ``{prefix}_bias``."""
        return backend_linear(self.backend, x, self.params[f"{prefix}_weight"],
                              self.params.get(f"{prefix}_bias"))

    def _linear_backward(self, x: Array, dz: Array, prefix: str) -> Array:
        """Accumulate the gradients of ``{prefix}_*`` and return ``dx``."""
        bias = f"{prefix}_bias"
        return linear_backward(self, x, dz, f"{prefix}_weight",
                               bias if bias in self.params else None)


@register_layer
class SwiGLU(_Block):
    """Gated MLP ``y = down(act(gate(x)) ⊙ up(x))``; ``act = silu`` (``z·σ(z)``) by default.

    Shapes: ``x [B, ..., D]`` → ``y [B, ..., D]``; hidden width ``M = hidden_features``.
    Parameters: ``gate_weight [M, D]``, ``up_weight [M, D]``, ``down_weight [D, M]``, and with
    ``bias=True`` also ``gate_bias [M]``, ``up_bias [M]``, ``down_bias [D]``. (Loom stores the
    transposes ``[D][M]`` and ``[M][D]``; converted on Loom import/export.)

    Args:
        activation: the gate's activation, any name of :mod:`loomx.layers.activations`:
            ``"silu"`` (SwiGLU: Llama, Mistral, Qwen), ``"gelu_tanh"`` (GeGLU: Gemma),
            ``"gelu"``, ...
    """

    type_name = "swiglu"
    config_fields = ("hidden_features", "bias", "activation")

    def __init__(self, hidden_features: int, bias: bool = False, activation: str = "silu",
                 **kw):
        super().__init__(hidden_features, **kw)
        self.bias = bool(bias)
        self.activation = activation
        self._act = get_activation(activation)
        self._silu = self._act.name == "silu"

    def _weights(self, d: int, m: int) -> list[tuple[str, tuple[int, int]]]:
        return [("gate_weight", (m, d)), ("up_weight", (m, d)), ("down_weight", (d, m))]

    def _biases(self, d: int, m: int) -> list[tuple[str, int]]:
        return [("gate_bias", m), ("up_bias", m), ("down_bias", d)] if self.bias else []

    def _forward(self, x: Array) -> tuple[Array, tuple]:
        g = self._linear(x, "gate")
        u = self._linear(x, "up")
        if self._silu:  # keep σ(g): the backward pass reuses it
            gate = self.backend.kernel("silu_gate_forward")
            s, h = gate(g, u) if gate is not None else silu_gate_forward(self.xp, g, u)
        else:
            s = self._act.forward(self.backend, g)
            h = s * u
        return self._linear(h, "down"), (x, g, u, s, h)

    def _backward(self, dy: Array, ctx: tuple) -> Array:
        x, g, u, s, h = ctx
        dh = self._linear_backward(h, dy, "down")
        if self._silu:
            gate = self.backend.kernel("silu_gate_backward")
            dg, du = (gate(g, u, s, dh) if gate is not None
                      else silu_gate_backward(self.xp, g, u, s, dh))
        else:  # s = act(g)
            dg = self._act.backward(self.backend, g, s, dh * u)
            du = dh * s
        return self._linear_backward(x, dg, "gate") + self._linear_backward(x, du, "up")


@register_layer
class MLPBlock(_Block):
    """``y = down(act(up(x)))``.

    Shapes: ``x [B, ..., D]`` → ``y [B, ..., D]``; hidden width ``M = hidden_features``.
    Parameters: ``up_weight [M, D]``, ``down_weight [D, M]``, and with ``bias=True``
    ``up_bias [M]``, ``down_bias [D]``.

    Args:
        activation: any name of :mod:`loomx.layers.activations` (default exact GELU).
    """

    type_name = "mlp"
    config_fields = ("hidden_features", "activation", "bias")

    def __init__(self, hidden_features: int, activation: str = "gelu", bias: bool = True, **kw):
        super().__init__(hidden_features, **kw)
        self.activation = activation
        self.bias = bool(bias)
        self._act = get_activation(activation)

    def _weights(self, d: int, m: int) -> list[tuple[str, tuple[int, int]]]:
        return [("up_weight", (m, d)), ("down_weight", (d, m))]

    def _biases(self, d: int, m: int) -> list[tuple[str, int]]:
        return [("up_bias", m), ("down_bias", d)] if self.bias else []

    def _forward(self, x: Array) -> tuple[Array, tuple]:
        z = self._linear(x, "up")
        h = self._act.forward(self.backend, z)
        return self._linear(h, "down"), (x, z, h)

    def _backward(self, dy: Array, ctx: tuple) -> Array:
        x, z, h = ctx
        dh = self._linear_backward(h, dy, "down")
        dz = self._act.backward(self.backend, z, h, dh)
        return self._linear_backward(x, dz, "up")
