"""Dense (fully connected) layer and the standalone elementwise Activation layer."""

from __future__ import annotations

from ..backends import RandomSource
from ..errors import ConfigError, ShapeError
from .activations import get_activation
from .base import Array, Layer, Shape, register_layer
from .init import init_weight


@register_layer
class Dense(Layer):
    """``y = act(x @ W.T + b)`` over the last axis.

    Shapes: ``x [B, ..., in_features]`` → ``y [B, ..., out_features]``.
    Parameters: ``weight [out_features, in_features]`` (PyTorch layout; Loom stores the
    transpose ``[in][out]``, converted on Loom import/export), ``bias [out_features]``.

    Args:
        out_features: output width.
        in_features: input width; inferred from the input shape at build when ``None``.
        bias: whether to learn an additive bias.
        activation: a name from :mod:`loomx.layers.activations` (default identity).
        init: weight initialisation scheme (see :func:`loomx.layers.init.init_weight`);
            ``"he"`` is Loom's ``InitDenseLayer``: N(0, sqrt(2/in)), zero bias.
    """

    type_name = "dense"
    aliases = ("linear",)
    config_fields = ("out_features", "in_features", "bias", "activation", "init")

    def __init__(self, out_features: int, in_features: int | None = None, bias: bool = True,
                 activation: str = "identity", init: str = "he", **kw):
        super().__init__(**kw)
        if int(out_features) <= 0:
            raise ConfigError(f"Dense out_features must be positive, got {out_features}")
        self.out_features = int(out_features)
        self.in_features = None if in_features is None else int(in_features)
        self.bias = bool(bias)
        self.activation = activation
        self.init = init
        self._act = get_activation(activation)

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        if not input_shape:
            raise ShapeError(f"{self.describe()} needs at least one input axis")
        fan_in = input_shape[-1]
        if self.in_features is None:
            self.in_features = fan_in
        elif self.in_features != fan_in:
            raise ShapeError(f"{self.describe()} expected {self.in_features} input features "
                             f"but the input shape is {list(input_shape)}")
        dt = self.float_dtype
        self.params["weight"] = init_weight(
            rng, self.init, (self.out_features, fan_in), fan_in, self.out_features, dt)
        if self.bias:
            self.params["bias"] = self.backend.zeros((self.out_features,), dtype=dt)
        return (*input_shape[:-1], self.out_features)

    def check_input(self, x: Array, min_ndim: int | None = None) -> None:
        if x.ndim < 2 or x.shape[-1] != self.in_features:
            raise ShapeError(f"{self.describe()} expected input [B, ..., {self.in_features}] "
                             f"but received {list(x.shape)}")

    def forward(self, x: Array, train: bool = False):
        self.check_input(x)
        xp = self.xp
        z = xp.matmul(x, xp.matrix_transpose(self.params["weight"]))
        if self.bias:
            z = z + self.params["bias"]
        y = self._act.forward(self.backend, z)
        return y, (x, z, y)

    def backward(self, dy: Array, ctx) -> Array:
        x, z, y = ctx
        xp = self.xp
        dz = self._act.backward(self.backend, z, y, dy)
        dz2 = xp.reshape(dz, (-1, self.out_features))
        x2 = xp.reshape(x, (-1, self.in_features))
        self._accumulate("weight", xp.matmul(xp.matrix_transpose(dz2), x2))
        if self.bias:
            self._accumulate("bias", xp.sum(dz2, axis=0))
        return xp.matmul(dz, self.params["weight"])


@register_layer
class Activation(Layer):
    """A parameter-free elementwise activation layer. Shapes: ``[B, *S]`` → ``[B, *S]``."""

    type_name = "activation"
    config_fields = ("activation",)

    def __init__(self, activation: str = "relu", **kw):
        super().__init__(**kw)
        self.activation = activation
        self._act = get_activation(activation)

    def forward(self, x: Array, train: bool = False):
        y = self._act.forward(self.backend, x)
        return y, (x, y)

    def backward(self, dy: Array, ctx) -> Array:
        x, y = ctx
        return self._act.backward(self.backend, x, y, dy)
