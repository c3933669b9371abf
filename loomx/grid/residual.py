"""Explicit residual connections: add the input of a named earlier slot to this slot's input.

``Residual(source)`` sits in a :class:`~loomx.grid.network.Network` slot ``i`` and computes

    y = x + skip,    skip = net.activations[s]  (the INPUT of slot s, s = resolve(source) <= i)

``source`` may be

- ``"input"``: the network input (the input of slot 0);
- a flat index ``s >= 0`` or a grid position ``(row, col, layer)``: the input of that slot;
- a negative offset ``-k``: the input of slot ``i - k`` (``-1`` is Loom's explicit residual,
  whose skip is the input of the previous layer).

A pre-norm transformer block in slots 0..5 is therefore
``[RMSNorm, MHA, Residual(0), RMSNorm, SwiGLU, Residual(3)]`` (or ``Residual(-2)`` twice):
``h = x + MHA(RMS(x))``, ``y = h + SwiGLU(RMS(h))``. The backward pass sends ``dy`` to both
the main path and the skip source, where the network executor adds it to that slot's input
gradient. Shapes: ``x [B, *S]``, ``skip [B, *S]`` → ``y [B, *S]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..backends import RandomSource
from ..errors import ConfigError, LoomxError, ShapeError
from ..layers.base import Array, Layer, Shape, register_layer


@register_layer
class Residual(Layer):
    """``y = x + skip`` where ``skip`` is the input of an earlier grid slot (see module doc)."""

    type_name = "residual"
    config_fields = ("source",)
    needs_skip = True

    def __init__(self, source: int | str | Sequence[int] = -1, **kw):
        super().__init__(**kw)
        if isinstance(source, (list, tuple)):
            if len(source) != 3:
                raise ConfigError(f"Residual source position must be (row, col, layer), "
                                  f"got {list(source)}")
            source = tuple(int(v) for v in source)
        elif not (source == "input" or (isinstance(source, int) and not isinstance(source, bool))):
            raise ConfigError(f"Residual source must be 'input', an int or (row, col, layer), "
                              f"got {source!r}")
        self.source = source
        self.skip_shape: Shape | None = None

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        if self.skip_shape is not None and tuple(self.skip_shape) != tuple(input_shape):
            raise ShapeError(f"{self.describe()} adds a skip of shape {list(self.skip_shape)} "
                             f"(source {self.source!r}) to an input of shape {list(input_shape)}"
                             "; choose a source whose input has the same shape")
        return input_shape

    def forward(self, x: Array, train: bool = False,
                skip: Array | None = None) -> tuple[Array, None]:
        """``x [B, *S]`` + ``skip [B, *S]``; ``skip`` is supplied by the network executor."""
        if skip is None:
            raise LoomxError(f"{self.describe()} needs the skip tensor: run it inside a Network "
                             "(which supplies the input of its source slot)")
        if tuple(skip.shape) != tuple(x.shape):
            raise ShapeError(f"{self.describe()}: skip {list(skip.shape)} does not match input "
                             f"{list(x.shape)}")
        return x + skip, None

    def backward(self, dy: Array, ctx: Any,
                 need_input_grad: bool = True) -> tuple[Array, Array]:
        """Returns ``(dx, dskip)``, both equal to ``dy`` (no work to save, so
        ``need_input_grad`` is accepted and ignored)."""
        return dy, dy
