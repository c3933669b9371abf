"""Introspection of a grid network: summary tables, statistics, the JSON blueprint.

- :func:`summary_text` / :func:`summary_html`: one row per occupied slot (flat index,
  position, type, output shape, parameters), Parallel branches indented below their layer,
  totals at the end (``net.summary()``, ``net._repr_html_()`` in notebooks).
- :func:`activation_stats` / :func:`gradient_stats`: mean, std, min, max per layer, computed
  on the device and moved to the host in one copy.
- :func:`blueprint`: a JSON-serialisable description in the spirit of Loom's telemetry
  blueprint (``ExtractNetworkBlueprint``), for visualisation tools.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from ..errors import LoomxError
from ..layers.base import Array, Layer, Shape

if TYPE_CHECKING:
    from .network import Network


def _shape(s: Shape | None) -> str:
    """``[B, d1, d2]`` for a per-sample shape (``?`` when unknown)."""
    if s is None:
        return "?"
    return "[" + ", ".join(["B", *map(str, s)]) + "]"


def _rows(net: Network) -> list[tuple[str, str, str, str, str, str]]:
    rows = []

    def add_children(layer: Layer, indent: str) -> None:
        for name, child in layer.children():
            rows.append(("", "", f"{indent}└ {name}: {type(child).__name__}",
                         _shape(child.output_shape), f"{child.param_count():,}", ""))
            if type(child).__name__ != "Network":
                add_children(child, indent + "  ")

    for i, layer in net.layers():
        kind = type(layer).__name__
        if layer.name:
            kind += f" '{layer.name}'"
        if getattr(layer, "needs_skip", False):
            kind += f" (+ input of slot {net.resolve_source(layer.source, i)})"
        rows.append((str(i), str(net.position(i)), kind, _shape(layer.output_shape),
                     f"{layer.param_count():,}" if layer.built else "?",
                     "disabled" if layer.disabled else ""))
        add_children(layer, "  ")
    return rows


HEADER = ("#", "(row, col, layer)", "type", "output shape", "params", "")


def summary_text(net: Network) -> str:
    """A fixed-width table of the network's slots with totals."""
    rows = _rows(net)
    widths = [max(len(r[c]) for r in [HEADER, *rows]) for c in range(len(HEADER))]
    line = "  ".join("-" * w for w in widths).rstrip()

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(v.rjust(w) if c in (0, 4) else v.ljust(w)
                         for c, (v, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    total = net.param_count() if net.built else 0
    head = (f"Network {net.grid_rows}×{net.grid_cols}×{net.layers_per_cell} "
            f"({len(net.layers())} of {net.size} slots used)")
    out = [head, line, fmt(HEADER), line, *(fmt(r) for r in rows), line]
    if net.built:
        out.append(f"input {_shape(net.input_shape)} → output {_shape(net.output_shape)}")
        out.append(f"total parameters: {total:,}"
                   f"  ({net.backend.describe()})")
    else:
        out.append("not built: call build(input_shape)")
    return "\n".join(out)


def summary_html(net: Network) -> str:
    """The summary as an HTML table (for notebooks)."""
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>"
                   for r in _rows(net))
    total = f"{net.param_count():,}" if net.built else "not built"
    return (f"<div><b>Network {net.grid_rows}×{net.grid_cols}×{net.layers_per_cell}</b>"
            f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"
            f"<p>total parameters: {total}</p></div>")


def _stats_on_device(net: Network, arrays: list[Array]) -> list[list[float]]:
    """``[[mean, std, min, max], ...]`` of ``arrays`` with one device→host copy."""
    if not arrays:
        return []
    xp, dt = net.backend.xp, net.backend.float_dtype
    rows = []
    for a in arrays:
        a = xp.astype(xp.reshape(a, (-1,)), dt)
        rows.append(xp.stack([xp.mean(a), xp.std(a), xp.min(a), xp.max(a)]))
    host = net.backend.to_host(xp.stack(rows))
    return [[float(v) for v in r] for r in host]


def _describe(net: Network, i: int, layer: Layer) -> dict[str, Any]:
    return {"index": i, "position": net.position(i), "type": layer.type_name}


def activation_stats(net: Network) -> list[dict]:
    """Per occupied slot: ``{index, position, type, mean, std, min, max}`` of its output."""
    if not net.activations:
        raise LoomxError("run a forward pass before asking for activation statistics")
    chosen = net.layers()
    values = _stats_on_device(net, [net.activations[i + 1] for i, _ in chosen])
    keys = ("mean", "std", "min", "max")
    return [{**_describe(net, i, layer), **dict(zip(keys, v, strict=True))}
            for (i, layer), v in zip(chosen, values, strict=True)]


def gradient_stats(net: Network) -> list[dict]:
    """Per occupied slot: statistics of its parameter gradients (all of them together) and of
    the gradient arriving at its output (after a backward pass)."""
    chosen = net.layers()
    arrays, owners = [], []
    xp = net.backend.xp
    for i, layer in chosen:
        grads = [xp.reshape(p.grad, (-1,)) for p in layer.parameters()]
        if grads:
            arrays.append(xp.concat(grads) if len(grads) > 1 else grads[0])
            owners.append((i, "param"))
        if net.activation_grads and net.activation_grads[i + 1] is not None:
            arrays.append(net.activation_grads[i + 1])
            owners.append((i, "output"))
    if not arrays:
        raise LoomxError("no gradients yet: run forward and backward first")
    values = _stats_on_device(net, arrays)
    found: dict[tuple[int, str], list[float]] = dict(zip(owners, values, strict=True))
    keys = ("mean", "std", "min", "max")
    out = []
    for i, layer in chosen:
        entry = _describe(net, i, layer)
        for kind in ("param", "output"):
            if (i, kind) in found:
                entry[f"{kind}_grad"] = dict(zip(keys, found[(i, kind)], strict=True))
        out.append(entry)
    return out


def _layer_blueprint(layer: Layer, pos: tuple[int, int, int] | None) -> dict:
    entry: dict[str, Any] = {
        "type": layer.type_name,
        "activation": getattr(layer, "activation", None),
        "parameters": layer.param_count() if layer.built else 0,
        "input_shape": None if layer.input_shape is None else list(layer.input_shape),
        "output_shape": None if layer.output_shape is None else list(layer.output_shape),
        "disabled": layer.disabled,
    }
    if pos is not None:
        entry.update(grid_row=pos[0], grid_col=pos[1], cell_layer=pos[2])
    if layer.type_name == "parallel":
        entry["combine_mode"] = layer.combine_mode
    children = layer.children()
    if children and layer.type_name != "network":
        entry["branches"] = [_layer_blueprint(c, None) for _, c in children]
    if layer.type_name == "network":
        entry["layers"] = [{"index": i, **_layer_blueprint(c, layer.position(i))}
                           for i, c in layer.layers()]
    return entry


def blueprint(net: Network, model_id: str = "model") -> dict:
    """``{id, grid, total_layers, total_parameters, layers: [...]}`` (JSON-serialisable)."""
    return {
        "id": model_id,
        "grid_rows": net.grid_rows, "grid_cols": net.grid_cols,
        "layers_per_cell": net.layers_per_cell,
        "total_layers": len(net.layers()),
        "total_parameters": net.param_count() if net.built else 0,
        "input_shape": None if net.input_shape is None else list(net.input_shape),
        "output_shape": None if net.output_shape is None else list(net.output_shape),
        "layers": [{"index": i, **_layer_blueprint(layer, net.position(i))}
                   for i, layer in net.layers()],
    }
