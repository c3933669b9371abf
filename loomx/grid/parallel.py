"""Parallel branches on the same input, combined per sample.

Every branch (any layer: Dense, attention, a nested ``Parallel``, a whole ``Network``...)
receives the same input ``x [B, *S]``; the outputs are combined by ``combine_mode``:

- ``"concat"``: joined per sample along the last axis. Branch outputs must agree on every
  axis but the last: ``[B, *L, F_k]`` → ``[B, *L, ΣF_k]``.
- ``"add"`` / ``"avg"``: elementwise sum / mean; every branch output has the same shape.
- ``"grid_scatter"``: branch ``k`` is placed at grid cell ``grid_positions[k] = (row, col,
  layer)`` of a ``grid_output_rows × grid_output_cols × grid_output_layers`` output grid; per
  sample the output is the flattened branch outputs in increasing cell index
  ``row·cols·layers + col·layers + layer`` (empty cells contribute nothing):
  ``[B, Σ prod(out_k)]``. Two branches may not share a cell.

``loom_compat=True`` (concat only) reproduces Loom's whole-batch concatenation (all samples of
branch 0, then all samples of branch 1, ...; the flat result read back as ``[B, ΣF_k]``); it
mixes samples and exists only to reproduce Loom outputs.

The backward pass is exact: ``dx = Σ_k dx_k`` and every branch accumulates its own parameter
gradients (``children()`` exposes every branch, so every optimizer trains them all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..backends import RandomSource
from ..errors import ConfigError, LoomxError, ShapeError
from ..layers.base import Array, Layer, Shape, call_backward, layer_from_config, register_layer

COMBINE_MODES = ("concat", "add", "avg", "grid_scatter")


@register_layer
class Parallel(Layer):
    """Branches on one input, combined by concat / add / avg / grid_scatter (module doc).

    Args:
        branches: layers or layer config dicts.
        combine_mode: ``"concat"`` (default), ``"add"``, ``"avg"`` (alias ``"average"``) or
            ``"grid_scatter"``.
        grid_positions: for grid_scatter, one ``(row, col, layer)`` per branch (dicts with
            ``target_row/target_col/target_layer`` are accepted too).
        grid_output_rows, grid_output_cols, grid_output_layers: the output grid size.
        loom_compat: reproduce Loom's whole-batch concatenation (concat only).
    """

    type_name = "parallel"
    config_fields = ("combine_mode", "grid_positions", "grid_output_rows", "grid_output_cols",
                     "grid_output_layers", "loom_compat")

    def __init__(self, branches: Sequence[Layer | dict] = (), combine_mode: str = "concat",
                 grid_positions: Sequence | None = None, grid_output_rows: int = 1,
                 grid_output_cols: int = 1, grid_output_layers: int = 1,
                 loom_compat: bool = False, **kw):
        super().__init__(**kw)
        mode = "avg" if combine_mode == "average" else (combine_mode or "concat")
        if mode not in COMBINE_MODES:
            raise ConfigError(f"Parallel combine_mode {combine_mode!r} is not one of "
                              f"{', '.join(COMBINE_MODES)}")
        self.combine_mode = mode
        self.branches: list[Layer] = [layer_from_config(b) if isinstance(b, dict) else b
                                      for b in branches]
        if not self.branches:
            raise ConfigError("Parallel needs at least one branch")
        for k, b in enumerate(self.branches):
            if not isinstance(b, Layer):
                raise ConfigError(f"Parallel branch {k} is a {type(b).__name__}, not a Layer")
            if getattr(b, "needs_skip", False):
                raise ConfigError(f"Parallel branch {k} is a Residual, whose skip source is a "
                                  "network slot; wrap it in a Network branch instead")
        self.grid_output_rows = int(grid_output_rows)
        self.grid_output_cols = int(grid_output_cols)
        self.grid_output_layers = int(grid_output_layers)
        self.grid_positions = None if grid_positions is None else [
            self._position(p) for p in grid_positions]
        self.loom_compat = bool(loom_compat)
        if self.loom_compat and mode != "concat":
            raise ConfigError("loom_compat only changes the concat mode; drop it for "
                              f"combine_mode {mode!r}")
        if mode == "grid_scatter":
            self._check_grid()

    @staticmethod
    def _position(p: Sequence[int] | dict) -> list[int]:
        if isinstance(p, dict):
            return [int(p.get("target_row", 0)), int(p.get("target_col", 0)),
                    int(p.get("target_layer", 0))]
        if len(p) != 3:
            raise ConfigError(f"a grid position is (row, col, layer), got {p!r}")
        return [int(v) for v in p]

    def _check_grid(self) -> None:
        dims = (self.grid_output_rows, self.grid_output_cols, self.grid_output_layers)
        if min(dims) <= 0:
            raise ConfigError(f"grid_scatter output grid {dims} must have positive sizes")
        if self.grid_positions is None or len(self.grid_positions) != len(self.branches):
            raise ConfigError(f"grid_scatter needs one grid position per branch: "
                              f"{len(self.branches)} branches, "
                              f"{0 if self.grid_positions is None else len(self.grid_positions)}"
                              " positions")
        cells = []
        for k, (r, c, li) in enumerate(self.grid_positions):
            if not (0 <= r < dims[0] and 0 <= c < dims[1] and 0 <= li < dims[2]):
                raise ConfigError(f"grid position {[r, c, li]} of branch {k} is outside the "
                                  f"{dims[0]}×{dims[1]}×{dims[2]} output grid")
            cells.append((r * dims[1] + c) * dims[2] + li)
        if len(set(cells)) != len(cells):
            raise ConfigError(f"two branches target the same output cell: positions "
                              f"{self.grid_positions}")
        # branch order in the output: increasing cell index
        self._order = sorted(range(len(cells)), key=lambda k: cells[k])

    def get_config(self) -> dict:
        cfg = super().get_config()
        cfg["branches"] = [b.get_config() for b in self.branches]
        return cfg

    def children(self) -> list[tuple[str, Layer]]:
        return [(f"branch{k}", b) for k, b in enumerate(self.branches)]

    # ------------------------------------------------------------------ build
    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        outs = []
        for k, b in enumerate(self.branches):
            try:
                outs.append(tuple(b.build(input_shape, self.child_backend(), rng)))
            except ShapeError as exc:
                raise ShapeError(f"Parallel branch {k} ({b.describe()}): {exc}") from exc
        self._branch_shapes = outs
        mode = self.combine_mode
        listing = ", ".join(str(list(s)) for s in outs)
        if mode in ("add", "avg"):
            if any(s != outs[0] for s in outs):
                raise ShapeError(f"Parallel {mode} needs equal branch output shapes, got {listing}")
            return outs[0]
        if mode == "grid_scatter":
            return (sum(math.prod(s) for s in outs),)
        if self.loom_compat:
            return (sum(math.prod(s) for s in outs),)
        if any(len(s) == 0 or s[:-1] != outs[0][:-1] for s in outs):
            raise ShapeError(f"Parallel concat joins along the last axis; branch outputs must "
                             f"agree on the other axes, got {listing}")
        return (*outs[0][:-1], sum(s[-1] for s in outs))

    # ------------------------------------------------------------------ run
    def forward(self, x: Array, train: bool = False) -> tuple[Array, Any]:
        self.check_input(x)
        for k, branch in enumerate(self.branches):
            if branch.disabled:  # a grid slot's flag: a branch has no identity to fall back on
                raise LoomxError(f"{self.describe()} branch {k} ({branch.describe()}) is "
                                 "disabled; a Parallel branch cannot be switched off (disable "
                                 "the Parallel slot, or build it without that branch)")
        xp = self.xp
        ys, ctxs = [], []
        for b in self.branches:
            y, c = b.forward(x, train)
            ys.append(y)
            ctxs.append(c)
        batch = x.shape[0]
        mode = self.combine_mode
        if mode == "add" or mode == "avg":
            out = ys[0]
            for y in ys[1:]:
                out = out + y
            if mode == "avg":
                out = out / len(ys)
        elif mode == "grid_scatter":
            out = xp.concat([xp.reshape(ys[k], (batch, -1)) for k in self._order], axis=-1)
        elif self.loom_compat:
            out = xp.reshape(xp.concat([xp.reshape(y, (-1,)) for y in ys], axis=0), (batch, -1))
        else:
            out = xp.concat(ys, axis=-1)
        return out, ctxs

    def backward(self, dy: Array, ctx: Any, need_input_grad: bool = True) -> Array | None:
        """``dx = Σ_k dx_k``; with ``need_input_grad=False`` every branch gets the flag too
        (its parameter gradients are still exact) and ``None`` is returned."""
        xp = self.xp
        batch = dy.shape[0]
        mode = self.combine_mode
        shapes = self._branch_shapes
        if mode == "add":
            dys = [dy] * len(self.branches)
        elif mode == "avg":
            g = dy / len(self.branches)
            dys = [g] * len(self.branches)
        elif mode == "grid_scatter":
            dys = [None] * len(self.branches)
            off = 0
            for k in self._order:
                n = math.prod(shapes[k])
                dys[k] = xp.reshape(dy[:, off:off + n], (batch, *shapes[k]))
                off += n
        elif self.loom_compat:
            flat = xp.reshape(dy, (-1,))
            dys, off = [], 0
            for s in shapes:
                n = batch * math.prod(s)
                dys.append(xp.reshape(flat[off:off + n], (batch, *s)))
                off += n
        else:
            dys, off = [], 0
            for s in shapes:
                dys.append(dy[..., off:off + s[-1]])
                off += s[-1]
        dx = None
        for b, g, c in zip(self.branches, dys, ctx, strict=True):
            d = call_backward(b, g, c, need_input_grad)
            if need_input_grad:
                dx = d if dx is None else dx + d
        return dx

    def __repr__(self) -> str:
        return f"Parallel({self.combine_mode}, {len(self.branches)} branches)"

