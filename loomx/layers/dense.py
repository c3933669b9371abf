"""Dense (fully connected) layer and the standalone elementwise Activation layer."""

from __future__ import annotations

import math

from ..backends import RandomSource
from ..errors import ShapeError
from .activations import activation_backward, bias_activation, get_activation
from .base import Array, Layer, Shape, config_int, register_layer
from .init import init_weight


def rows_matmul(xp, a: Array, b: Array) -> Array:
    """``a [..., K] @ b [K, N]`` → ``[..., N]`` as one 2-d product over the flattened leading
    axes of ``a``.

    A stacked ``a`` against a 2-d ``b`` is a broadcast batched product to the array libraries:
    CuPy copies a transposed ``b`` to contiguous memory and builds device arrays of matrix
    pointers on every call (the decoder's prompt forward spent 40 µs of host time per
    product that way, against about 20 µs for a 2-d product), and numpy calls BLAS once per
    leading index. One 2-d product takes a transposed ``b`` as it is.
    """
    a, b = promoted(xp, a, b)
    if a.ndim <= 2:
        return xp.matmul(a, b)
    lead = tuple(a.shape[:-1])
    rows = math.prod(lead)  # not -1: a zero-size ``a`` has no inferable axis
    return xp.reshape(xp.matmul(xp.reshape(a, (rows, a.shape[-1])), b), (*lead, b.shape[-1]))


def promoted(xp, a: Array, b: Array) -> tuple[Array, Array]:
    """``a`` and ``b`` in their common dtype (``xp.result_type``) when their float dtypes
    differ, for libraries whose matmul does not promote (PyTorch); as they are otherwise."""
    if a.dtype == b.dtype:
        return a, b
    dt = xp.result_type(a, b)
    return xp.astype(a, dt, copy=False), xp.astype(b, dt, copy=False)


def linear(xp, x: Array, weight: Array, bias: Array | None = None) -> Array:
    """``x [..., in] @ weight[out, in]ᵀ (+ bias [out])`` → ``[..., out]``.

    The bias is added in place into the fresh product: a second array of the output's size
    would cost one more allocation (first-touch page faults for large ones) and one more pass.
    """
    z = rows_matmul(xp, x, xp.matrix_transpose(weight))
    if bias is None:
        return z
    if bias.dtype == z.dtype:
        z += bias
        return z
    return z + bias


def backend_linear(backend, x: Array, weight: Array, bias: Array | None = None) -> Array:
    """:func:`linear` through the backend's ``linear`` kernel where it has one (PyTorch's
    ``F.linear``: one call instead of a transpose, a product and a bias add)."""
    fused = backend.kernel("linear")
    z = None if fused is None else fused(x, weight, bias)
    return linear(backend.xp, x, weight, bias) if z is None else z


def sum_rows(backend, a: Array) -> Array:
    """Sum of ``a [R, N]`` over its rows → ``[N]`` (through the backend's ``sum_rows`` kernel,
    a matrix-vector product with ones on numpy, where it has one)."""
    fast = backend.kernel("sum_rows")
    return backend.xp.sum(a, axis=0) if fast is None else fast(a)


def accumulate_linear_grads(layer: Layer, x: Array, dz: Array, weight_key: str,
                            bias_key: str | None = None) -> None:
    """Add the gradients of a :func:`linear` map with ``layer.params[weight_key] [out, in]``.

    ``x [..., in]`` is the map's input and ``dz [..., out]`` the gradient of its output; the
    leading axes are flattened, so each gradient is one matrix product (or one sum).
    """
    xp = layer.xp
    out_f, in_f = layer.params[weight_key].shape
    dz2 = xp.reshape(dz, (-1, out_f))
    layer._accumulate(weight_key, xp.matmul(*promoted(xp, xp.matrix_transpose(dz2),
                                                      xp.reshape(x, (-1, in_f)))))
    if bias_key is not None:
        layer._accumulate(bias_key, sum_rows(layer.backend, dz2))


def linear_backward(layer: Layer, x: Array, dz: Array, weight_key: str,
                    bias_key: str | None = None, need_input_grad: bool = True) -> Array | None:
    """:func:`accumulate_linear_grads`, then return the input gradient ``dx [..., in]``
    (``None`` without the product when ``need_input_grad`` is ``False``)."""
    accumulate_linear_grads(layer, x, dz, weight_key, bias_key)
    if not need_input_grad:
        return None
    return rows_matmul(layer.xp, dz, layer.params[weight_key])


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
        self.out_features = config_int(out_features, "out_features", "Dense")
        self.in_features = config_int(in_features, "in_features", "Dense", optional=True)
        self.bias = bool(bias)
        self.activation = activation
        self.init = init
        self._act = get_activation(activation)

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        fan_in = self.last_axis_size(input_shape)
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

    def check_input(self, x: Array) -> None:
        self.check_last_axis(x, self.in_features)

    def forward(self, x: Array, train: bool = False) -> tuple[Array, tuple]:
        self.check_input(x)
        weight, bias = self.params["weight"], self.params.get("bias")
        fused = self.backend.kernel("linear")
        product = None if fused is None else fused(x, weight, bias)
        if product is None:
            product = linear(self.xp, x, weight)
        else:  # the kernel added the bias
            bias = None
        z, y = bias_activation(self.backend, self._act, product, bias, owned=True)
        return y, (x, z, y)

    def backward(self, dy: Array, ctx: tuple, need_input_grad: bool = True) -> Array | None:
        x, z, y = ctx
        self.check_grad(dy, y.shape)
        dz = activation_backward(self.backend, self._act, z, y, dy)
        return linear_backward(self, x, dz, "weight", "bias" if self.bias else None,
                               need_input_grad)


@register_layer
class Activation(Layer):
    """A parameter-free elementwise activation layer. Shapes: ``[B, *S]`` → ``[B, *S]``.

    Like :class:`~loomx.layers.shape.Dropout`, it checks its input against the per-sample
    shape ``S`` given at build and requires a real floating dtype.
    """

    type_name = "activation"
    config_fields = ("activation",)
    float_input = True

    def __init__(self, activation: str = "relu", **kw):
        super().__init__(**kw)
        self.activation = activation
        self._act = get_activation(activation)

    def forward(self, x: Array, train: bool = False) -> tuple[Array, tuple]:
        self.check_input(x)
        _, y = bias_activation(self.backend, self._act, x)
        return y, (x, y)

    def backward(self, dy: Array, ctx: tuple) -> Array:
        x, y = ctx
        self.check_grad(dy, y.shape)
        return activation_backward(self.backend, self._act, x, y, dy)
