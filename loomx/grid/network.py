"""The grid network: layers placed in rows × columns × layers-per-cell, run in flat order.

Position ``(row, col, layer)`` has flat index ``row·cols·L + col·L + layer``; the forward pass
visits layers in increasing flat index, each consuming the previous one's output. Empty slots
and disabled layers are the identity.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ..backends import Backend, RandomSource, get_backend
from ..errors import ConfigError, LoomxError, ShapeError
from ..layers.base import Array, Layer, Shape, layer_from_config, register_layer

Position = tuple[int, int, int]


@register_layer
class Network(Layer):
    """A grid of layers.

    Args:
        grid_rows, grid_cols, layers_per_cell: grid size; ``rows·cols·L`` slots in all.
        layers: optional layers in flat order (fewer than the slot count leaves the rest empty).
        input_shape: per-sample input shape; when given with ``backend``/``seed`` the
            network is built at once.
        backend: backend or spec used by :meth:`build` (default: the current backend).
        seed: initialisation seed (every layer draws from one stream in flat order).

    Shapes: ``x [B, *input_shape]`` → ``y [B, *output_shape]``.
    """

    type_name = "network"
    config_fields = ("grid_rows", "grid_cols", "layers_per_cell")

    def __init__(self, grid_rows: int = 1, grid_cols: int = 1, layers_per_cell: int = 1,
                 layers: Sequence[Layer | dict | None] | None = None,
                 input_shape: Shape | None = None, backend: Backend | str | None = None,
                 seed: int = 0, **kw):
        super().__init__(**kw)
        for label, v in (("grid_rows", grid_rows), ("grid_cols", grid_cols),
                         ("layers_per_cell", layers_per_cell)):
            if int(v) <= 0:
                raise ConfigError(f"Network {label} must be positive, got {v}")
        self.grid_rows, self.grid_cols = int(grid_rows), int(grid_cols)
        self.layers_per_cell = int(layers_per_cell)
        self.slots: list[Layer | None] = [None] * self.size
        self.seed = seed
        self.activations: list[Array] = []
        for i, layer in enumerate(layers or []):
            if i >= self.size:
                raise ConfigError(f"{len(layers)} layers do not fit a {self.grid_rows}×"
                                  f"{self.grid_cols}×{self.layers_per_cell} grid")
            self.slots[i] = layer_from_config(layer) if isinstance(layer, dict) else layer
        if input_shape is not None:
            self.build(input_shape, backend, seed)

    # ------------------------------------------------------------------ construction
    @classmethod
    def chain(cls, layers: Sequence[Layer], input_shape: Shape | None = None,
              backend: Backend | str | None = None, seed: int = 0, **kw) -> Network:
        """A 1 × N × 1 network (a plain chain) of ``layers``."""
        return cls(1, len(layers), 1, layers=layers, input_shape=input_shape, backend=backend,
                   seed=seed, **kw)

    @property
    def size(self) -> int:
        """Number of slots: ``grid_rows · grid_cols · layers_per_cell``."""
        return self.grid_rows * self.grid_cols * self.layers_per_cell

    def flat_index(self, row: int, col: int, layer: int) -> int:
        """Flat index of ``(row, col, layer)``; raises on any coordinate out of range."""
        for label, v, n in (("row", row, self.grid_rows), ("col", col, self.grid_cols),
                            ("layer", layer, self.layers_per_cell)):
            if not 0 <= v < n:
                raise LoomxError(f"grid {label} {v} out of range [0, {n})")
        return (row * self.grid_cols + col) * self.layers_per_cell + layer

    def position(self, index: int) -> Position:
        """Inverse of :meth:`flat_index`."""
        if not 0 <= index < self.size:
            raise LoomxError(f"flat index {index} out of range [0, {self.size})")
        per_row = self.grid_cols * self.layers_per_cell
        return index // per_row, (index // self.layers_per_cell) % self.grid_cols, \
            index % self.layers_per_cell

    def _index(self, key: int | Position) -> int:
        if isinstance(key, tuple):
            return self.flat_index(*key)
        if not 0 <= key < self.size:
            raise LoomxError(f"flat index {key} out of range [0, {self.size})")
        return key

    def __getitem__(self, key: int | Position) -> Layer | None:
        return self.slots[self._index(key)]

    def __setitem__(self, key: int | Position, layer: Layer | None) -> None:
        self.slots[self._index(key)] = layer
        self.output_shape = None  # must be rebuilt

    def set_layer(self, row: int, col: int, layer_index: int, layer: Layer | None) -> None:
        """Place ``layer`` at ``(row, col, layer_index)``."""
        self[(row, col, layer_index)] = layer

    def get_layer(self, row: int, col: int, layer_index: int) -> Layer | None:
        """The layer at ``(row, col, layer_index)`` (``None`` for an empty slot)."""
        return self[(row, col, layer_index)]

    def __iter__(self) -> Iterator[Layer | None]:
        return iter(self.slots)

    def __len__(self) -> int:
        return self.size

    def layers(self) -> list[tuple[int, Layer]]:
        """``(flat_index, layer)`` for every occupied slot, in forward order."""
        return [(i, layer) for i, layer in enumerate(self.slots) if layer is not None]

    def children(self) -> list[tuple[str, Layer]]:
        return [(str(i), layer) for i, layer in self.layers()]

    # ------------------------------------------------------------------ build
    def build(self, input_shape: Shape, backend: Backend | str | None = None,
              rng: RandomSource | int | None = None) -> Shape:
        """Build every layer in flat order from per-sample ``input_shape``."""
        self.backend = get_backend(backend)
        if rng is None or isinstance(rng, int):
            rng = self.backend.random(self.seed if rng is None else rng)
        shape = tuple(int(d) for d in input_shape)
        self.input_shape = shape
        for i, layer in self.layers():
            try:
                shape = layer.build(shape, self.backend, rng)
            except LoomxError as exc:
                raise type(exc)(f"layer {i} at {self.position(i)}: {exc}") from exc
        self.output_shape = shape
        return shape

    def check_input(self, x: Array, min_ndim: int | None = None) -> None:
        if not self.built:
            raise LoomxError("the network is not built yet: call build(input_shape) or pass "
                             "input_shape= to the constructor")
        first = next((layer for _, layer in self.layers()), None)
        if first is not None:
            first.check_input(x)
        elif tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(f"network expected input [B, {list(self.input_shape)}] "
                             f"but received {list(x.shape)}")

    # ------------------------------------------------------------------ run
    def forward(self, x: Array, train: bool = False) -> tuple[Array, Any]:
        """Run every layer in flat order; ``self.activations`` holds ``[x, y_0, …]`` after."""
        self.check_input(x)
        acts = [x]
        ctxs: list[tuple[int, Any]] = []
        for i, layer in self.layers():
            if layer.disabled:
                continue
            x, ctx = layer.forward(x, train)
            acts.append(x)
            ctxs.append((i, ctx))
        self.activations = acts
        return x, ctxs

    def backward(self, dy: Array, ctx: Any) -> Array:
        """Backpropagate ``dy`` through every enabled layer in reverse flat order."""
        for i, layer_ctx in reversed(ctx):
            dy = self.slots[i].backward(dy, layer_ctx)
        return dy

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict:
        cfg = super().get_config()
        cfg["layers"] = [None if layer is None else layer.get_config() for layer in self.slots]
        if self.input_shape is not None:
            cfg["input_shape"] = list(self.input_shape)
        cfg["seed"] = self.seed
        return cfg

    @classmethod
    def from_config(cls, config: dict) -> Network:
        config = dict(config)
        input_shape = config.pop("input_shape", None)
        net = cls(**config)
        net.pending_input_shape = tuple(input_shape) if input_shape is not None else None
        return net

    def __repr__(self) -> str:
        return (f"Network({self.grid_rows}×{self.grid_cols}×{self.layers_per_cell}, "
                f"{len(self.layers())} layers)")
