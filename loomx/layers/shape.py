"""Parameter-free layers that change or gate values without learning: Dropout, Flatten, Reshape."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..backends import RandomSource
from ..errors import ConfigError, ShapeError
from .base import Array, Layer, Shape, as_int, config_float, config_int, register_layer


@register_layer
class Dropout(Layer):
    """Inverted dropout: in training ``y = x · m / (1 - rate)`` with ``m ~ Bernoulli(1 - rate)``.

    In evaluation (``train=False``) ``y = x``. The mask stream is seeded at build: the layer
    keeps its own stream spawned from the build ``RandomSource``, so a network seed fixes the
    masks on every backend. Draws are made on the host and moved once per forward.

    Shapes: ``[B, *S]`` → ``[B, *S]``.

    Args:
        rate: probability of zeroing an element, in ``[0, 1)``.
    """

    type_name = "dropout"
    config_fields = ("rate",)
    float_input = True

    def __init__(self, rate: float = 0.5, **kw):
        super().__init__(**kw)
        rate = config_float(rate, "rate", "Dropout")
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"Dropout rate must be in [0, 1), got {rate}")
        self.rate = rate
        self._rng: RandomSource | None = None

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        self._rng = rng.spawn()
        return input_shape

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Any]:
        self.check_input(x)
        if not train or self.rate == 0.0:
            return x, (x.shape, None)
        u = self.backend.from_host(self._rng.host_uniform(tuple(x.shape)), dtype=x.dtype)
        mask = self.xp.astype(u >= self.rate, x.dtype) * (1.0 / (1.0 - self.rate))
        return x * mask, (x.shape, mask)

    def backward(self, dy: Array, ctx: Any) -> Array:
        shape, mask = ctx
        self.check_grad(dy, shape)
        return dy if mask is None else dy * mask


@register_layer
class Flatten(Layer):
    """Flatten every per-sample axis: ``[B, *S]`` → ``[B, prod(S)]``, of any dtype."""

    type_name = "flatten"

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        return (math.prod(input_shape),)

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Any]:
        self.check_input(x)
        # a non-contiguous input (a conv's channels-first view) is copied once, into
        # recycled memory on numpy
        flat, _ = self.backend.contiguous_scratch(x)
        return self.xp.reshape(flat, (x.shape[0], -1)), tuple(x.shape)

    def backward(self, dy: Array, ctx: Any) -> Array:
        self.check_grad(dy, (ctx[0], math.prod(ctx[1:])))
        return self.xp.reshape(dy, ctx)


@register_layer
class Reshape(Layer):
    """Reshape each sample: ``[B, *S]`` → ``[B, *shape]`` (row-major, like ``xp.reshape``), of
    any dtype.

    Args:
        shape: the per-sample output shape; one entry may be ``-1`` (inferred).
    """

    type_name = "reshape"
    config_fields = ("shape",)

    def __init__(self, shape: Sequence[int], **kw):
        super().__init__(**kw)
        if as_int(shape) is not None or isinstance(shape, str):
            raise ConfigError(f"Reshape shape must be a list of ints (e.g. [{shape!r}]), "
                              f"got {shape!r}")
        try:
            self.shape = tuple(config_int(d, "shape entry", "Reshape", minimum=None)
                               for d in shape)
        except TypeError:
            raise ConfigError(f"Reshape shape must be a list of ints, got {shape!r}") from None
        if sum(d == -1 for d in self.shape) > 1 or any(d < -1 or d == 0 for d in self.shape):
            raise ConfigError(f"Reshape shape {list(self.shape)} must have positive entries "
                              "and at most one -1")

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        n = math.prod(input_shape)
        known = math.prod(d for d in self.shape if d != -1)
        if -1 in self.shape:
            if n % known:
                raise ShapeError(f"{self.describe()} expected a sample whose size is a "
                                 f"multiple of {known} for shape {list(self.shape)} but the "
                                 f"input shape {list(input_shape)} has {n} values")
            return tuple(n // known if d == -1 else d for d in self.shape)
        if known != n:
            raise ShapeError(f"{self.describe()} expected a sample of {known} values for shape "
                             f"{list(self.shape)} but the input shape {list(input_shape)} has "
                             f"{n}")
        return self.shape

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Any]:
        self.check_input(x)
        return self.xp.reshape(x, (x.shape[0], *self.output_shape)), tuple(x.shape)

    def backward(self, dy: Array, ctx: Any) -> Array:
        self.check_grad(dy, (ctx[0], *self.output_shape))
        return self.xp.reshape(dy, ctx)
