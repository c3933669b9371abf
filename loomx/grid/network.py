"""The grid network: layers placed in rows × columns × layers-per-cell, run in flat order.

Position ``(row, col, layer)`` has flat index ``row·cols·L + col·L + layer``; the forward pass
visits slots in increasing flat index, each consuming the previous one's output. Empty slots
and disabled layers are the identity (in the forward *and* the backward pass).

``net.activations`` (after a forward) has ``size + 1`` entries: ``activations[0]`` is the
network input and ``activations[i + 1]`` the output of slot ``i`` (equal to its input when the
slot is empty or disabled), so ``activations[i]`` is always the *input* of slot ``i``. Residual
layers (:mod:`loomx.grid.residual`) add one of these slot inputs to their own input.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..backends import Backend, RandomSource, get_backend
from ..errors import ConfigError, LoomxError, ShapeError
from ..layers.base import (
    Array,
    Layer,
    Shape,
    as_int,
    as_shape,
    call_backward,
    has_parameters,
    layer_from_config,
    register_layer,
)

Position = tuple[int, int, int]
Observer = Callable[[dict], None]


def backward_slot(layer: Layer, dy: Array, ctx: Any, source: int | None,
                  pending: dict[int, Array]) -> Array:
    """One slot's backward pass; returns the gradient of its input.

    For a residual (``source`` not ``None``) the skip gradient is added to ``pending[source]``,
    which the caller adds to the input gradient of that slot (or stage) when it gets there.
    """
    if source is None:
        return layer.backward(dy, ctx)
    dx, dskip = layer.backward(dy, ctx)
    pending[source] = dskip if source not in pending else pending[source] + dskip
    return dx


@register_layer
class Network(Layer):
    """A grid of layers.

    Args:
        grid_rows, grid_cols, layers_per_cell: grid size; ``rows·cols·L`` slots in all.
        layers: optional layers (or layer config dicts, or ``None`` for an empty slot) in flat
            order; fewer than the slot count leaves the rest empty.
        input_shape: per-sample input shape; when given the network is built at once on
            ``backend`` with ``seed``.
        backend: backend or spec used by :meth:`build` (default: the current backend).
        seed: initialisation seed (every layer draws from one stream in flat order).
        disabled: flat indices of layers to disable (identity in forward and backward).

    Shapes: ``x [B, *input_shape]`` → ``y [B, *output_shape]``.

    Example::

        net = Network(1, 2, 2, layers=[Dense(16, activation="relu"), None,
                                       Dense(4), Softmax()], input_shape=(8,))
        net[(0, 1, 0)]          # the third slot: Dense(4)
        y = net(x)              # x [B, 8] -> y [B, 4]
    """

    type_name = "network"
    config_fields = ("grid_rows", "grid_cols", "layers_per_cell")

    def __init__(self, grid_rows: int = 1, grid_cols: int = 1, layers_per_cell: int = 1,
                 layers: Sequence[Layer | dict | None] | None = None,
                 input_shape: Shape | None = None, backend: Backend | str | None = None,
                 seed: int = 0, disabled: Sequence[int] = (), **kw):
        super().__init__(**kw)
        dims = []
        for label, v in (("grid_rows", grid_rows), ("grid_cols", grid_cols),
                         ("layers_per_cell", layers_per_cell)):
            try:
                n = operator.index(v)
            except TypeError:
                n = 0
            if isinstance(v, bool) or n <= 0:
                raise ConfigError(f"Network {label} must be a positive integer, got {v!r}")
            dims.append(n)
        self.grid_rows, self.grid_cols, self.layers_per_cell = dims
        self.slots: list[Layer | None] = [None] * self.size
        self.seed = int(seed)
        self.declared_input_shape: Shape | None = None
        self.activations: list[Array] = []
        self.activation_grads: list[Array] = []
        self._observers: list[tuple[Observer, set[int] | None]] = []
        layers = list(layers or [])
        if len(layers) > self.size:
            raise ConfigError(f"{len(layers)} layers do not fit a {self.grid_rows}×"
                              f"{self.grid_cols}×{self.layers_per_cell} grid ({self.size} "
                              "slots); enlarge the grid or pass fewer layers")
        for i, layer in enumerate(layers):
            self.slots[i] = self._as_layer(layer, i)
        for i in disabled:
            layer = self[int(i)]
            if layer is None:
                raise ConfigError(f"cannot disable empty slot {i}")
            layer.disabled = True
        if input_shape is not None:
            self.build(input_shape, backend, seed)

    @staticmethod
    def _as_layer(layer: Layer | dict | None, index: int) -> Layer | None:
        if layer is None or isinstance(layer, Layer):
            return layer
        if isinstance(layer, dict):
            return layer_from_config(layer)
        raise ConfigError(f"slot {index}: expected a Layer, a layer config dict or None, "
                          f"got {type(layer).__name__}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def chain(cls, layers: Sequence[Layer | dict], input_shape: Shape | None = None,
              backend: Backend | str | None = None, seed: int = 0, **kw) -> Network:
        """A 1 × N × 1 network (a plain chain) of ``layers``."""
        return cls(1, max(len(layers), 1), 1, layers=layers, input_shape=input_shape,
                   backend=backend, seed=seed, **kw)

    @classmethod
    def from_dict(cls, config: dict, backend: Backend | str | None = None,
                  seed: int | None = None) -> Network:
        """Build a network from a config dict (as :meth:`get_config` writes it).

        ``{"grid_rows": 1, "grid_cols": 2, "layers_per_cell": 1, "input_shape": [8],
        "layers": [{"type": "dense", "out_features": 4}, None]}``; ``"type"`` may be omitted.
        The network is built when the dict has an ``input_shape``.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"a network config must be a dict, got {type(config).__name__}")
        config = dict(config)
        kind = config.pop("type", "network")
        if kind != "network":
            raise ConfigError(f"expected a config of type 'network', got {kind!r}")
        net = cls.from_config(config)
        if seed is not None:
            net.seed = int(seed)
        if net.declared_input_shape is not None:
            net.build(net.declared_input_shape, backend, net.seed)
        return net

    @property
    def size(self) -> int:
        """Number of slots: ``grid_rows · grid_cols · layers_per_cell``."""
        return self.grid_rows * self.grid_cols * self.layers_per_cell

    @property
    def depth(self) -> int:
        """Number of occupied, enabled slots (the pipeline depth of the stepping executor)."""
        return sum(1 for _, layer in self.layers() if not layer.disabled)

    def flat_index(self, row: int, col: int, layer: int) -> int:
        """Flat index of ``(row, col, layer)``; raises on any coordinate out of range."""
        coords = []
        for label, v, n in (("row", row, self.grid_rows), ("col", col, self.grid_cols),
                            ("layer", layer, self.layers_per_cell)):
            i = as_int(v)
            if i is None or not 0 <= i < n:
                raise LoomxError(f"grid {label} {v!r} out of range [0, {n}) for a "
                                 f"{self.grid_rows}×{self.grid_cols}×{self.layers_per_cell} grid")
            coords.append(i)
        row, col, layer = coords
        return (row * self.grid_cols + col) * self.layers_per_cell + layer

    def position(self, index: int) -> Position:
        """Inverse of :meth:`flat_index`."""
        if not 0 <= index < self.size:
            raise LoomxError(f"flat index {index} out of range [0, {self.size})")
        per_row = self.grid_cols * self.layers_per_cell
        return (index // per_row, (index // self.layers_per_cell) % self.grid_cols,
                index % self.layers_per_cell)

    def _index(self, key: int | Position) -> int:
        if isinstance(key, (tuple, list)):
            if len(key) != 3:
                raise LoomxError(f"a grid position is (row, col, layer), got {tuple(key)}")
            return self.flat_index(*key)
        i = as_int(key)
        if i is None or not 0 <= i < self.size:
            raise LoomxError(f"flat index {key!r} out of range [0, {self.size}) (an integer, or "
                             "a (row, col, layer) tuple)")
        return i

    def __getitem__(self, key: int | Position) -> Layer | None:
        return self.slots[self._index(key)]

    def __setitem__(self, key: int | Position, layer: Layer | dict | None) -> None:
        i = self._index(key)
        self.slots[i] = self._as_layer(layer, i)
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

    def resolve_source(self, source: int | str | Sequence[int], at: int) -> int:
        """Flat slot index whose *input* a residual at slot ``at`` adds (0 for ``"input"``).

        ``source`` is ``"input"`` (the network input), a flat index ``>= 0``, a grid position
        ``(row, col, layer)``, or a negative offset relative to ``at`` (``-1``: the input of
        the slot before the residual).
        """
        if source == "input":
            return 0
        if isinstance(source, (tuple, list)):
            idx = self._index(tuple(int(v) for v in source))
        elif isinstance(source, int) and not isinstance(source, bool):
            idx = at + source if source < 0 else source
        else:
            raise ConfigError(f"residual source must be 'input', a flat index, a negative "
                              f"offset or (row, col, layer); got {source!r}")
        if not 0 <= idx <= at:
            raise ConfigError(f"residual at slot {at} {self.position(at)} names source "
                              f"{source!r} = slot {idx}, which is not an earlier position "
                              f"(expected 0..{at})")
        return idx

    # ------------------------------------------------------------------ build
    def build(self, input_shape: Shape, backend: Backend | str | None = None,
              rng: RandomSource | int | None = None) -> Shape:
        """Build every layer in flat order from per-sample ``input_shape`` (positive ints; a
        bare int ``n`` means ``(n,)``; ``ShapeError`` otherwise)."""
        shape = as_shape(input_shape, "network")
        self.backend = get_backend(backend)
        if rng is None or isinstance(rng, int):
            rng = self.backend.random(self.seed if rng is None else rng)
        self.input_shape = shape
        self.output_shape = None
        shapes = [shape]  # shapes[i] = per-sample input shape of slot i
        for i, layer in enumerate(self.slots):
            if layer is not None:
                try:
                    if getattr(layer, "needs_skip", False):
                        src = self.resolve_source(layer.source, i)
                        layer.skip_shape = shapes[src]
                    out = layer.build(shape, self.child_backend(), rng)
                except LoomxError as exc:
                    raise type(exc)(f"layer {i} at {self.position(i)} "
                                    f"({layer.describe()}): {exc}") from exc
                if not layer.disabled:
                    shape = out
                elif out != shape:
                    raise ShapeError(f"layer {i} at {self.position(i)} is disabled (identity) "
                                     f"but maps {list(shape)} to {list(out)}; only layers that "
                                     "keep the shape can be disabled")
            shapes.append(shape)
        self.slot_shapes = shapes
        self.output_shape = shape
        self.zero_grad()
        return shape

    def check_input(self, x: Array) -> None:
        if not self.built:
            raise LoomxError("the network is not built yet: call build(input_shape) or pass "
                             "input_shape= to the constructor")
        try:
            shape = x.shape
        except AttributeError:
            raise ShapeError(f"network expected a {self.backend.name} array but received a "
                             f"{type(x).__name__}; convert it with net.backend.from_host(...) "
                             "or net.backend.asarray(...)") from None
        if tuple(shape[1:]) != self.input_shape:
            raise ShapeError(f"network expected input [B, {', '.join(map(str, self.input_shape))}]"
                             f" but received {list(x.shape)}")

    # ------------------------------------------------------------------ run
    def forward(self, x: Array, train: bool = False) -> tuple[Array, Any]:
        """Run every enabled layer in flat order; ``self.activations`` holds the slot inputs.

        Returns ``(y, ctx)`` where ``ctx`` is a list of ``(flat_index, layer_ctx, source)``.
        """
        self.check_input(x)
        acts = [x]
        ctxs: list[tuple[int, Any, int | None]] = []
        for i, layer in enumerate(self.slots):
            if layer is not None and not layer.disabled:
                x_in = x
                if getattr(layer, "needs_skip", False):
                    src = self.resolve_source(layer.source, i)
                    x, ctx = layer.forward(x_in, train, skip=acts[src])
                else:
                    src = None
                    x, ctx = layer.forward(x_in, train)
                ctxs.append((i, ctx, src))
                if self._observers:
                    self._notify("forward", i, layer, x_in, x)
            acts.append(x)
        self.activations = acts
        return x, ctxs

    def backward(self, dy: Array, ctx: Any, need_input_grad: bool = True) -> Array | None:
        """Backpropagate ``dy`` through every enabled layer in reverse flat order.

        Residual skips add their gradient to the slot input they read. After the call
        ``self.activation_grads[i]`` is the gradient of the input of slot ``i``
        (``[0]``: the network input; ``[size]``: ``dy``).

        ``need_input_grad=False`` (a training step: nothing reads the input gradient) returns
        ``None``: the first enabled layer with parameters gets ``need_input_grad=False`` (Dense,
        convolutions, recurrent layers and attention then skip their input-gradient products)
        and the parameter-free slots before it are not visited; their ``activation_grads``
        stay ``None``. Every parameter gradient is the same as with the full pass.
        """
        pending: dict[int, Array] = {}
        grads: list[Array | None] = [None] * (self.size + 1)
        grads[self.size] = dy
        by_index = {i: (c, src) for i, c, src in ctx}
        # slots at or below `last` need no input gradient: no earlier layer has parameters
        last = -1
        if not need_input_grad:
            last = self.size
            for i, _, _ in ctx:
                if has_parameters(self.slots[i]):
                    last = i
                    break
        for i in range(self.size - 1, last, -1):
            if i in by_index:
                layer = self.slots[i]
                layer_ctx, src = by_index[i]
                d_out = dy
                dy = backward_slot(layer, dy, layer_ctx, src, pending)
                if self._observers:
                    self._notify("backward", i, layer, d_out, dy)
            if i in pending:
                dy = dy + pending.pop(i)
            grads[i] = dy
        if last < self.size and last in by_index:
            layer = self.slots[last]
            call_backward(layer, dy, by_index[last][0], need_input_grad=False)
            if self._observers:
                self._notify("backward", last, layer, dy, None)
        if last >= 0:
            dy = None
        self.activation_grads = grads
        return dy

    # ------------------------------------------------------------------ observers
    def add_observer(self, callback: Observer,
                     layers: Sequence[int | Position] | None = None) -> Observer:
        """Call ``callback(event)`` after each layer's forward and backward.

        ``event`` is a dict: ``phase`` ("forward" / "backward"), ``mode`` ("normal", or
        "step" from the stepping executor, with the tick number in ``step``), ``index``,
        ``position``, ``layer``, ``input`` and ``output`` (device arrays; for "backward" the
        incoming gradient and the gradient passed on). ``layers`` restricts the slots observed.
        Returns ``callback`` (pass it to :meth:`remove_observer`).
        """
        chosen = None if layers is None else {self._index(k) for k in layers}
        self._observers.append((callback, chosen))
        return callback

    def remove_observer(self, callback: Observer) -> None:
        """Detach an observer added with :meth:`add_observer`."""
        self._observers = [(cb, sel) for cb, sel in self._observers if cb is not callback]

    def _notify(self, phase: str, index: int, layer: Layer, inp: Array, out: Array,
                mode: str = "normal", step: int | None = None) -> None:
        event = {"phase": phase, "mode": mode, "step": step, "index": index,
                 "position": self.position(index), "layer": layer, "input": inp,
                 "output": out}
        for cb, sel in self._observers:
            if sel is None or index in sel:
                cb(event)

    # ------------------------------------------------------------------ moves
    def to(self, backend: Backend | str, dtype: str | None = None) -> Network:
        """Move every parameter to another backend and/or float dtype, in place."""
        super().to(backend, dtype)
        self.activations, self.activation_grads = [], []
        return self

    # ------------------------------------------------------------------ introspection
    def summary(self) -> str:
        """A table of slots: position, type, output shape, parameter count, totals."""
        from .summary import summary_text

        return summary_text(self)

    def _repr_html_(self) -> str:
        from .summary import summary_html

        return summary_html(self)

    def activation_stats(self) -> list[dict]:
        """Mean/std/min/max of every slot output after a forward (one host copy)."""
        from .summary import activation_stats

        return activation_stats(self)

    def gradient_stats(self) -> list[dict]:
        """Mean/std/min/max of each layer's parameter gradients and output gradient."""
        from .summary import gradient_stats

        return gradient_stats(self)

    def blueprint(self, model_id: str = "model") -> dict:
        """A JSON-serialisable description of the grid (Loom's telemetry blueprint)."""
        from .summary import blueprint

        return blueprint(self, model_id)

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict:
        cfg = super().get_config()
        cfg["layers"] = [None if layer is None else layer.get_config() for layer in self.slots]
        if self.input_shape is not None:
            cfg["input_shape"] = list(self.input_shape)
        elif self.declared_input_shape is not None:
            cfg["input_shape"] = list(self.declared_input_shape)
        cfg["seed"] = self.seed
        disabled = [i for i, layer in self.layers() if layer.disabled]
        if disabled:
            cfg["disabled"] = disabled
        # what a Loom bundle said about the network (its batch size, its grid before implicit
        # residuals became slots), kept so that writing it back to Loom gives the same bundle
        loom = {k: v for k, v in (("batch_size", getattr(self, "loom_batch_size", None)),
                                  ("grid", getattr(self, "loom_grid", None))) if v is not None}
        if loom:
            cfg["loom"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in loom.items()}
        return cfg

    @classmethod
    def from_config(cls, config: dict) -> Network:
        """An unbuilt network from :meth:`get_config` output (``input_shape`` is remembered)."""
        config = dict(config)
        input_shape = config.pop("input_shape", None)
        loom = config.pop("loom", None) or {}
        try:
            net = cls(**config)
        except TypeError as exc:
            raise ConfigError(f"bad network config: {exc}") from exc
        if input_shape is not None:
            net.declared_input_shape = tuple(int(d) for d in input_shape)
        if loom.get("batch_size") is not None:
            net.loom_batch_size = int(loom["batch_size"])
        if loom.get("grid") is not None:
            net.loom_grid = tuple(int(d) for d in loom["grid"])
        return net

    def __repr__(self) -> str:
        return (f"Network({self.grid_rows}×{self.grid_cols}×{self.layers_per_cell}, "
                f"{len(self.layers())} layers)")
