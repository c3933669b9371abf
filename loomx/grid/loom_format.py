"""Loom's JSON formats ↔ loomx networks (``modelhost/bundle`` and architecture-only JSON).

Loom passes every layer a flat float32 vector of ``batch_size × features`` values and each
layer reinterprets it. loomx networks take shaped batches, so this module

- turns each Loom layer definition into one loomx layer with its natural per-sample input
  shape (Dense ``[in]``, Conv2D ``[C, H, W]``, RNN/LSTM ``[T, I]``, attention ``[S, D]``, ...);
  where the previous layer's output has another shape with the same number of values, the
  slot holds a two-layer chain ``[Reshape(shape), layer]`` named ``"loom_adapter"`` (Loom's
  flat reinterpretation, made explicit);
- converts weight layouts: Dense ``kernel [in][out]`` → ``weight [out, in]``; Conv2D
  ``kernel [F][C][kh][kw]`` as is; attention ``q/k/v/output`` ``[in][out]`` → ``[out, in]``;
  LSTM's 12 gate tensors → ``weight_ih [4H, I]``, ``weight_hh [4H, H]``, ``bias [4H]`` (gate
  order i, f, g, o); RNN ``weight_ih/weight_hh/bias_h``; LayerNorm ``gamma/beta``; RMSNorm
  ``gamma`` (an omitted epsilon means 1e-6, as in Loom's forward); SwiGLU ``gate/up [d][m]``
  → ``[m, d]``, ``down [m][d]`` → ``[d, m]``; Parallel ``branch_weights`` recursively;
- maps names: Loom's ``"relu"`` → ``"scaled_relu"``, ``"leaky_relu"`` → ``"loom_leaky_relu"``,
  ``"linear"`` → ``"identity"``, softmax ``"sparse"`` → ``"sparsemax"``.

Layers Loom cannot describe (Embedding, Conv1D, GRU, pooling, a Residual with another source,
a nested Network, an empty slot, ...) are written as ``{"type": "loomx", "loomx_config": ...}``
with their parameters under ``"loomx_params"``; loomx reads them back exactly, Loom refuses
them (as it refuses its own Embedding and Conv1D layers).

Use :func:`loom_input` / :func:`loom_output` to convert Loom's flat vectors at the edge.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from ..backends import Backend, get_backend
from ..errors import ConfigError, FormatError, LoomxError
from ..io import loom_bundle as lb
from ..layers.activations import LOOM_ACTIVATIONS
from ..layers.base import Array, Layer, Shape, layer_from_config
from .network import Network
from .parallel import Parallel
from .residual import Residual

LOOM_TO_ACT = {**LOOM_ACTIVATIONS, "": "scaled_relu"}  # Loom's default activation is "relu"
ACT_TO_LOOM = {"scaled_relu": "relu", "loom_relu": "relu", "sigmoid": "sigmoid",
               "tanh": "tanh", "softplus": "softplus", "loom_leaky_relu": "leaky_relu",
               "identity": "linear", "linear": "linear", "none": "linear"}
TYPE_ALIASES = {"mha": "multi_head_attention", "layernorm": "layer_norm",
                "rmsnorm": "rms_norm", "linear": "dense", "fc": "dense", "conv": "conv2d"}
LOOM_ATTENTION_THETA = 1_000_000.0
ADAPTER = "loom_adapter"
REGISTER = "loom_register"


def _int(d: dict, key: str, where: str, default: int = 0) -> int:
    """Loom's integer field ``key`` of ``d`` (``default`` when absent or null).

    Raises :class:`FormatError` for a value that is not an integral number (a string, a bool,
    a fraction): Go's decoder refuses those for Loom's int fields.
    """
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v != int(v):
        raise FormatError(f"{where}: {key} must be an integer, got {v!r}")
    return int(v)


def _first(d: dict, *keys: str, where: str = "layer") -> int:
    """The first of ``keys`` that holds a positive integer (0 when none does)."""
    for k in keys:
        v = _int(d, k, where)
        if v > 0:
            return v
    return 0


def _act(d: dict, where: str) -> str:
    name = d.get("activation", "relu")
    if name not in LOOM_TO_ACT:
        raise FormatError(f"{where}: unknown Loom activation {name!r}; known: "
                          f"{', '.join(k for k in LOOM_TO_ACT if k)}")
    return LOOM_TO_ACT[name]


# ---------------------------------------------------------------------- Loom → loomx
class _Record:
    """A converted layer waiting for its weights."""

    def __init__(self, kind: str, layer: Layer, weights: dict | None, where: str):
        self.kind, self.layer, self.weights, self.where = kind, layer, weights, where


def _softmax_layer(d: dict, n: int, where: str) -> Layer:
    from ..layers import Softmax

    variant = d.get("softmax_variant", "standard") or "standard"
    t = float(d.get("temperature") or 1.0)
    if variant in ("standard", "temperature", "gumbel"):
        return Softmax(variant=variant, temperature=t)
    if variant == "grid":
        rows, cols = _int(d, "softmax_rows", where), _int(d, "softmax_cols", where)
        if rows <= 0 or cols <= 0 or rows * cols != n:
            raise FormatError(f"{where}: grid softmax {rows}×{cols} does not cover the {n} "
                              "values per sample (Loom zero-fills or panics here)")
        return Softmax(variant="grid", rows=rows, cols=cols, temperature=t)
    if variant == "hierarchical":
        levels = [_int({"level": v}, "level", where) for v in d.get("hierarchy_levels") or []]
        if not levels or math.prod(levels) != n:
            return Softmax(variant="standard", temperature=t)
        return Softmax(variant="hierarchical", levels=levels, temperature=t)
    if variant == "masked":
        mask = [bool(v) for v in d.get("mask") or []]
        if len(mask) != n:
            return Softmax(variant="standard", temperature=t)
        return Softmax(variant="masked", mask=mask, temperature=t)
    if variant in ("sparse", "sparsemax"):
        return Softmax(variant="sparsemax", temperature=t)
    if variant == "entmax":
        alpha = float(d.get("entmax_alpha") or 0.0)
        if alpha <= 1.0:
            return Softmax(variant="standard")
        return Softmax(variant="entmax", alpha=alpha)
    # adaptive, mixture and unknown names: Loom computes a standard softmax at T = 1
    return Softmax(variant="standard")


def _main_layer(d: dict, n: int, cur: Shape, where: str) -> tuple[Layer, Shape, str]:
    """``(layer, natural per-sample input shape, kind)`` for one Loom definition."""
    from ..layers import LAYER_TYPES

    kind = d.get("type")
    kind = TYPE_ALIASES.get(kind, kind)
    if kind == "dense":
        i = _first(d, "input_height", "input_size", "width", where=where)
        o = _first(d, "output_height", "output_size", "height", where=where)
        if i <= 0 or o <= 0:
            raise FormatError(f"{where}: dense layer without input/output sizes")
        return LAYER_TYPES["dense"](o, in_features=i, activation=_act(d, where)), (i,), kind
    if kind == "conv2d":
        c, h, w = (_int(d, k, where) for k in ("input_channels", "input_height", "input_width"))
        f, k = _int(d, "filters", where), _int(d, "kernel_size", where)
        if min(c, h, w, f, k) <= 0:
            raise FormatError(f"{where}: conv2d needs input_channels, input_height, "
                              "input_width, filters and kernel_size")
        layer = LAYER_TYPES["conv2d"](f, k, stride=_int(d, "stride", where) or 1,
                                      padding=_int(d, "padding", where), in_channels=c,
                                      activation=_act(d, where))
        return layer, (c, h, w), kind
    if kind == "multi_head_attention":
        dm, heads = _int(d, "d_model", where), _int(d, "num_heads", where)
        if dm <= 0 or heads <= 0 or dm % heads:
            raise FormatError(f"{where}: attention needs d_model divisible by num_heads "
                              f"(got {dm}, {heads})")
        layer = LAYER_TYPES["mha"](heads, head_dim=dm // heads, d_model=dm, q_bias=True,
                                   k_bias=True, v_bias=True, o_bias=True, causal=True,
                                   rope_theta=LOOM_ATTENTION_THETA, rope_style="half")
        return layer, (n // dm, dm), kind
    if kind in ("rnn", "lstm"):
        i, h = _int(d, "input_size", where), _int(d, "hidden_size", where)
        if i <= 0 or h <= 0:
            raise FormatError(f"{where}: {kind} needs input_size and hidden_size")
        t = _int(d, "seq_length", where) or n // i
        return LAYER_TYPES[kind](h, input_size=i), (t, i), kind
    if kind == "softmax":
        return _softmax_layer(d, n, where), (n,), kind
    if kind in ("layer_norm", "rms_norm"):
        size = _int(d, "norm_size", where) or n
        eps = float(d.get("epsilon") or (1e-5 if kind == "layer_norm" else 1e-6))
        layer = LAYER_TYPES[kind](eps=eps)
        return layer, ((size,) if n == size else (n // size, size)), kind
    if kind == "swiglu":
        dd = _first(d, "input_height", "input_size", where=where)
        m = _first(d, "output_height", "output_size", where=where)
        if dd <= 0 or m <= 0:
            raise FormatError(f"{where}: swiglu needs input_height and output_height")
        layer = LAYER_TYPES["swiglu"](m, bias=True)
        return layer, ((dd,) if n == dd else (n // dd, dd)), kind
    if kind == "residual":
        return Residual(-1), cur, kind
    if kind == "loomx":
        cfg = d.get("loomx_config")
        if cfg is None:
            return None, cur, kind
        layer = layer_from_config(cfg)
        layer.disabled = bool(d.get("loomx_disabled", False))
        return layer, cur, kind
    if kind == "parallel":
        raise AssertionError("parallel is converted by _convert")
    raise FormatError(f"{where}: Loom layer type {d.get('type')!r} cannot be read (Loom "
                      "writes Embedding and Conv1D as 'unknown' and drops their weights)")


def _convert(d: dict, w: dict | None, cur: Shape, where: str, loom_compat: bool,
             records: list[_Record], backend: Backend) -> tuple[Layer | None, Shape]:
    """One Loom definition → (slot layer, per-sample output shape); appends weight records."""
    if not isinstance(d, dict):
        raise FormatError(f"{where}: a layer definition must be an object, got {d!r}")
    n = math.prod(cur)
    kind = TYPE_ALIASES.get(d.get("type"), d.get("type"))
    if kind == "parallel":
        defs = d.get("branches") or []
        bw = (w or {}).get("branch_weights") if w is not None else None
        if not defs:
            raise FormatError(f"{where}: parallel layer without branches")
        if w is not None and (not isinstance(bw, list) or len(bw) != len(defs)):
            raise FormatError(f"{where}: {len(defs)} branches but "
                              f"{0 if not isinstance(bw, list) else len(bw)} branch_weights")
        branches = []
        for k, bd in enumerate(defs):
            layer, out = _convert(bd, None if w is None else bw[k], cur,
                                  f"{where} branch {k}", loom_compat, records, backend)
            if len(out) != 1:
                inner = [la for _, la in layer.layers()] if _is_adapter(layer) else [layer]
                layer = _chain([*inner, layer_from_config({"type": "flatten"})])
            branches.append(layer)
        mode = d.get("combine_mode") or "concat"
        kw: dict[str, Any] = {}
        if mode == "grid_scatter":
            kw = dict(grid_positions=d.get("grid_positions") or [],
                      grid_output_rows=_int(d, "grid_output_rows", where),
                      grid_output_cols=_int(d, "grid_output_cols", where),
                      grid_output_layers=_int(d, "grid_output_layers", where))
        try:
            par = Parallel(branches, combine_mode=mode,
                           loom_compat=loom_compat and mode == "concat", **kw)
            out = par.build(cur, backend, 0)
        except LoomxError as exc:
            raise FormatError(f"{where}: {exc}") from exc
        return par, out
    layer, natural, kind = _main_layer(d, n, cur, where)
    if layer is None:
        return None, cur
    if math.prod(natural) != n:
        raise FormatError(f"{where}: {kind} layer expects {math.prod(natural)} values per "
                          f"sample ({list(natural)}) but receives {n} ({list(cur)})")
    records.append(_Record(kind, layer, w, where))
    try:
        if tuple(natural) != tuple(cur):
            slot = _chain([layer_from_config({"type": "reshape", "shape": list(natural)}), layer])
            out = slot.build(cur, backend, 0)
        else:
            slot = layer
            out = layer.build(cur, backend, 0)
    except LoomxError as exc:
        raise FormatError(f"{where}: {exc}") from exc
    return slot, out


def _is_adapter(layer: Layer | None) -> bool:
    return isinstance(layer, Network) and layer.name == ADAPTER


def _chain(layers: list[Layer]) -> Network:
    return Network(1, len(layers), 1, layers=layers, name=ADAPTER)


def _with_tokens(width: int, later: list, where: str) -> Shape:
    """A first layer that only tells the row width ``w`` (a norm, SwiGLU): ``(T, w)`` when a
    later attention or recurrent definition of that width states its ``seq_length`` ``T``
    (Loom runs those on ``T`` rows of the same flat input), else ``(w,)``."""
    for d in later:
        if not isinstance(d, dict):
            continue
        kind = TYPE_ALIASES.get(d.get("type"), d.get("type"))
        key = {"multi_head_attention": "d_model", "rnn": "input_size",
               "lstm": "input_size"}.get(kind)
        if key and _int(d, key, where) == width and _int(d, "seq_length", where) > 0:
            return (_int(d, "seq_length", where), width)
    return (width,)


def _input_shape(d: dict, where: str, later: list | None = None) -> Shape:
    """The per-sample input shape told by the first definition ``d`` (``later``: the
    definitions after it, for a first layer that only tells a row width)."""
    later = later or []
    kind = TYPE_ALIASES.get(d.get("type"), d.get("type"))
    if kind == "parallel":
        return _input_shape((d.get("branches") or [{}])[0], where, later)
    if kind == "dense":
        return (_first(d, "input_height", "input_size", "width", where=where),)
    if kind == "conv2d":
        return tuple(_int(d, k, where) for k in ("input_channels", "input_height", "input_width"))
    if kind in ("rnn", "lstm") and d.get("seq_length"):
        return (_int(d, "seq_length", where), _int(d, "input_size", where))
    if kind == "multi_head_attention" and d.get("seq_length"):
        return (_int(d, "seq_length", where), _int(d, "d_model", where))
    if kind == "swiglu":
        return _with_tokens(_first(d, "input_height", "input_size", where=where), later, where)
    if kind in ("layer_norm", "rms_norm") and d.get("norm_size"):
        return _with_tokens(_int(d, "norm_size", where), later, where)
    if kind == "loomx" and d.get("loomx_input_shape"):
        return tuple(d["loomx_input_shape"])
    raise FormatError(f"{where}: cannot tell the per-sample input shape from a first layer of "
                      f"type {d.get('type')!r}; pass input_shape=")


def _register_residuals(kinds: list[str], slots: list, sizes: list[tuple[Shape, Shape]],
                        where: str) -> list:
    """Loom's implicit residual register (``ForwardCPU``) as explicit ``Residual`` slots.

    RMSNorm stores its input; attention and SwiGLU add the stored value to their output when
    the lengths match and store the sum; LayerNorm normalises ``input + stored`` when the
    lengths match and stores its output when something was stored.
    """
    new: list = []
    reg: tuple[int, Shape] | None = None  # (slot whose input holds the register, its shape)

    def add(source: tuple[int, Shape], shape: Shape, k: int) -> None:
        if tuple(source[1]) != tuple(shape):
            raise FormatError(f"{where} layer {k}: the implicit residual joins shapes "
                              f"{list(source[1])} and {list(shape)}; pass input_shape= so "
                              "that both read the same [tokens, features] layout")
        new.append(Residual(source[0], name=REGISTER))

    for k, (kind, slot, (ins, outs)) in enumerate(zip(kinds, slots, sizes, strict=True)):
        if kind == "layer_norm" and reg is not None and math.prod(reg[1]) == math.prod(ins):
            add(reg, ins, k)
        if kind == "rms_norm":
            reg = (len(new), ins)
        new.append(slot)
        if kind in ("multi_head_attention", "swiglu"):
            if reg is not None and math.prod(reg[1]) == math.prod(outs):
                add(reg, outs, k)
            reg = (len(new), outs)
        elif kind == "layer_norm" and reg is not None:
            reg = (len(new), outs)
    return new


def _network_from_cfg(cfg: dict, weights: list | None, backend, seed: int,
                      input_shape: Shape | None, loom_compat: bool, where: str,
                      implicit_residuals: bool = False) -> Network:
    try:
        rows, cols, per = (int(cfg[k]) for k in ("grid_rows", "grid_cols", "layers_per_cell"))
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{where}: cfg needs integer grid_rows, grid_cols and "
                          "layers_per_cell") from None
    defs = cfg.get("layers")
    if not isinstance(defs, list) or len(defs) != rows * cols * per:
        raise FormatError(f"{where}: {rows}×{cols}×{per} grid needs {rows * cols * per} layer "
                          f"definitions, found {len(defs) if isinstance(defs, list) else 0}")
    if weights is not None and len(weights) != len(defs):
        raise FormatError(f"{where}: {len(defs)} layers but {len(weights)} weight entries")
    b = get_backend(backend)
    if input_shape is not None:
        cur = tuple(input_shape)
    else:
        i0 = next((i for i, d in enumerate(defs)
                   if d.get("type") != "loomx" or d.get("loomx_config")), len(defs))
        cur = _input_shape(defs[i0] if i0 < len(defs) else {}, where, defs[i0 + 1:])
    first = cur
    records: list[_Record] = []
    slots, kinds, sizes = [], [], []
    for i, d in enumerate(defs):
        before = cur
        slot, cur = _convert(d, None if weights is None else weights[i], cur,
                             f"{where} layer {i}", loom_compat, records, b)
        slots.append(slot)
        kinds.append(TYPE_ALIASES.get(d.get("type"), d.get("type")))
        sizes.append((before, cur))
    grid = (rows, cols, per)
    if implicit_residuals:
        slots = _register_residuals(kinds, slots, sizes, where)
        if len(slots) != len(defs):
            grid = (1, len(slots), 1)
    try:
        net = Network(*grid, layers=slots, input_shape=first, backend=b, seed=seed)
    except LoomxError as exc:
        raise FormatError(f"{where}: {exc}") from exc
    net.loom_batch_size = int(cfg.get("batch_size") or 1)
    net.loom_grid = (rows, cols, per)
    if weights is not None:
        staged = [(r, _weights_for(r, b)) for r in records]
        for r, values in staged:  # every check passed: copy in
            r.layer.params.update(values)
        net.zero_grad()
    return net


def _dims(r: _Record) -> dict:
    layer = r.layer
    if r.kind == "dense":
        return {"in": layer.in_features, "out": layer.out_features}
    if r.kind == "conv2d":
        return {"shape": tuple(layer.params["weight"].shape)}
    if r.kind == "multi_head_attention":
        return {"d_model": layer.d_model, "kv": int(layer.params["k_weight"].shape[0])}
    if r.kind in ("rnn", "lstm"):
        return {"hidden": layer.hidden_size, "input": layer.input_size}
    if r.kind in ("layer_norm", "rms_norm"):
        return {"n": int(layer.params["weight"].shape[0])}
    m, d = (int(s) for s in layer.params["gate_weight"].shape)
    return {"d": d, "m": m}


def _weights_for(r: _Record, b: Backend) -> dict[str, Array]:
    """Loom weights of one layer as loomx parameters on ``b`` (checked, not yet assigned)."""
    layer = r.layer
    if r.kind in ("softmax", "residual") and not layer.params:
        return {}
    if r.kind == "loomx":
        refs = {ref.name: ref for ref in layer.parameters()}
        host = lb.ext_params_from_json((r.weights or {}).get("loomx_params") or {},
                                       {k: tuple(v.value.shape) for k, v in refs.items()},
                                       r.where)
        for name, ref in refs.items():  # the layer is private to the network being built
            ref.value = b.from_host(host[name], dtype=ref.value.dtype)
        return {}
    host = lb.loom_weights_to_params(r.kind, r.weights or {}, _dims(r), r.where)
    unknown = set(host) - set(layer.params)
    missing = set(layer.params) - set(host)
    if unknown or missing:
        raise FormatError(f"{r.where}: Loom weights {sorted(host)} do not match the loomx "
                          f"parameters {sorted(layer.params)}")
    return {k: b.from_host(v, dtype=layer.params[k].dtype) for k, v in host.items()}


def load_loom_bundle(source: str | os.PathLike, model_id: str | None = None,
                     backend: Backend | str | None = None, input_shape: Shape | None = None,
                     loom_compat: bool = False, implicit_residuals: bool = False) -> Network:
    """Read one model of a Loom bundle (text or path) as a built :class:`Network`.

    Args:
        source: the bundle JSON text or a path to it.
        model_id: which model of a multi-model bundle (default: the only one).
        backend: where the parameters go.
        input_shape: per-sample input shape, when the first layer does not imply one.
        loom_compat: make Parallel concat reproduce Loom's whole-batch concatenation.
        implicit_residuals: reproduce Loom's hidden residual register (RMSNorm → attention /
            SwiGLU, LayerNorm) with explicit ``Residual`` slots named ``"loom_register"``;
            the result is a 1 × N × 1 chain when slots are added (the Loom grid is kept in
            ``net.loom_grid`` and restored when the network is written back).

    The network's ``loom_batch_size`` holds the bundle's ``batch_size``.
    """
    models = lb.parse_bundle(lb.read_text(source))
    if model_id is None:
        if len(models) != 1:
            raise FormatError(f"the bundle holds {len(models)} models "
                              f"({', '.join(repr(m['id']) for m in models)}); pass model_id=")
        chosen = models[0]
    else:
        found = [m for m in models if m["id"] == model_id]
        if not found:
            raise FormatError(f"no model {model_id!r} in the bundle; it holds "
                              f"{', '.join(repr(m['id']) for m in models)}")
        chosen = found[0]
    return _network_from_cfg(chosen["cfg"], chosen["weights"]["layers"], backend, 0,
                             input_shape, loom_compat, f"model {chosen['id']!r}",
                             implicit_residuals)


def load_loom_bundle_all(source: str | os.PathLike, backend: Backend | str | None = None,
                         loom_compat: bool = False,
                         implicit_residuals: bool = False) -> dict[str, Network]:
    """Every model of a bundle, by id (options as :func:`load_loom_bundle`)."""
    return {m["id"]: _network_from_cfg(m["cfg"], m["weights"]["layers"], backend, 0, None,
                                       loom_compat, f"model {m['id']!r}", implicit_residuals)
            for m in lb.parse_bundle(lb.read_text(source))}


def load_loom_architecture(source: str | os.PathLike | dict,
                           backend: Backend | str | None = None, seed: int = 0,
                           input_shape: Shape | None = None, loom_compat: bool = False,
                           implicit_residuals: bool = False) -> Network:
    """Build a network (fresh loomx initialisation) from Loom's architecture-only JSON.

    Accepts ``grid_rows``, ``grid_cols``, ``layers_per_cell``, ``layers`` (type aliases such
    as ``"mha"``, ``"layernorm"``; Dense sizes from ``input_height/output_height``,
    ``input_size/output_size`` or ``width/height``), branch configs and ``batch_size``.
    """
    cfg = source if isinstance(source, dict) else lb.parse_json(
        lb.read_text(source), "Loom architecture JSON")
    return _network_from_cfg(cfg, None, backend, seed, input_shape, loom_compat,
                             "architecture", implicit_residuals)


# ---------------------------------------------------------------------- loomx → Loom
def _unwrap(layer: Layer) -> Layer:
    """The main layer of a ``loom_adapter`` chain (reshape/flatten around one layer)."""
    if _is_adapter(layer):
        main = [la for _, la in layer.layers() if la.type_name not in ("reshape", "flatten")]
        if len(main) == 1:
            return main[0]
    return layer


def _host_params(layer: Layer) -> dict:
    """``{name: host array}`` of every parameter of ``layer`` (nested ones included)."""
    return {ref.name: layer.backend.to_host(ref.value) for ref in layer.parameters()}


def _extension(layer: Layer | None) -> tuple[dict, dict]:
    if layer is None:
        return {"type": "loomx", "activation": "linear", "loomx_config": None}, {}
    params = _host_params(layer)
    d = {"type": "loomx", "activation": "linear", "loomx_config": layer.get_config()}
    if layer.disabled:  # Loom has no disabled layers: only loomx reads this back
        d["loomx_disabled"] = True
    if layer.input_shape is not None:
        d["loomx_input_shape"] = list(layer.input_shape)
    return d, ({"loomx_params": lb.ext_params_to_json(params)} if params else {})


def _softmax_def(layer: Layer) -> dict | None:
    v = layer.variant
    names = {"standard": "standard", "temperature": "temperature", "grid": "grid",
             "hierarchical": "hierarchical", "gumbel": "gumbel", "masked": "masked",
             "sparsemax": "sparse", "entmax": "entmax"}
    if v not in names or (len(layer.input_shape) != 1 and v != "grid"):
        return None
    # Loom ignores the temperature of these two and has no entmax iteration count
    if (v in ("sparsemax", "entmax") and layer.temperature != 1.0) or (
            v == "entmax" and layer.iterations != 50):
        return None
    d: dict[str, Any] = {"type": "softmax", "activation": "relu", "softmax_variant": names[v]}
    if v == "grid":
        n = layer.input_shape[-1]
        rows = layer.rows if layer.rows is not None else n // layer.cols
        if math.prod(layer.input_shape) != n:
            return None
        d["softmax_rows"], d["softmax_cols"] = rows, n // rows
    if v == "hierarchical":
        d["hierarchy_levels"] = list(layer.levels)
    if v == "masked":
        d["mask"] = list(layer.mask)
    if v == "entmax":
        d["entmax_alpha"] = layer.alpha
    d["temperature"] = layer.temperature
    return d


def _native_def(layer: Layer, top: bool) -> tuple[dict, str] | None:
    """``(Loom definition, weight layout kind)`` of ``layer``, or ``None`` when Loom cannot
    express it exactly."""
    t = layer.type_name
    ins = layer.input_shape
    if t == "dense":
        act = ACT_TO_LOOM.get(layer.activation)
        if act is None or not layer.bias or len(ins) != 1:
            return None
        size = {"width": 1, "height": 1} if top else {}  # Loom writes these at top level only
        return {"type": "dense", "activation": act, **size, "input_height": layer.in_features,
                "output_height": layer.out_features}, t
    if t == "conv2d":
        act = ACT_TO_LOOM.get(layer.activation)
        k, s, pad = layer._k, layer._s, layer.padding
        if pad == "valid":
            pad = 0
        pads = (pad,) if isinstance(pad, int) else tuple(pad) if isinstance(pad, (list, tuple)) \
            else ()
        if not (act is not None and layer.bias and len(set(k)) == 1 and len(set(s)) == 1
                and len(set(pads)) == 1 and set(layer._d) == {1} and layer.groups == 1):
            return None
        c, h, w = ins
        f, oh, ow = layer.output_shape
        return {"type": "conv2d", "activation": act, "input_channels": c, "filters": f,
                "kernel_size": k[0], "stride": s[0], "padding": int(pads[0]),
                "input_height": h, "input_width": w, "output_height": oh,
                "output_width": ow}, t
    if t == "mha":
        dm, heads = layer.d_model, layer.num_heads
        if not (layer.causal and layer.rope_theta == LOOM_ATTENTION_THETA
                and layer.rope_style == "half" and layer.rope_fraction == 1.0
                and layer.rope_scaling is None
                and not layer.qk_norm and layer.kv_heads == heads
                and int(layer.params["q_weight"].shape[0]) == dm):
            return None
        return {"type": "multi_head_attention", "activation": "linear", "d_model": dm,
                "num_heads": heads, "seq_length": ins[0]}, "multi_head_attention"
    if t in ("rnn", "lstm"):
        if not layer.return_sequences or not layer.bias:
            return None
        return {"type": t, "activation": "tanh", "input_size": layer.input_size,
                "seq_length": ins[0], "hidden_size": layer.hidden_size}, t
    if t == "softmax":
        d = _softmax_def(layer)
        return None if d is None else (d, "")
    if t == "layer_norm":
        if not layer.affine or not layer.bias:
            return None
        return {"type": "layer_norm", "activation": "relu", "norm_size": ins[-1],
                "epsilon": layer.eps}, t
    if t == "rms_norm":
        if layer.unit_offset:
            return None
        d = {"type": "rms_norm", "activation": "relu", "norm_size": ins[-1]}
        if layer.eps != 1e-6:  # an omitted epsilon is 1e-6 in Loom's RMSNorm forward
            d["epsilon"] = layer.eps
        return d, t
    if t == "swiglu":
        if layer.activation != "silu":  # Loom's SwiGLU gate is always SiLU
            return None
        m, dd = (int(v) for v in layer.params["gate_weight"].shape)
        return {"type": "swiglu", "activation": "relu", "input_height": dd,
                "output_height": m}, t
    if t == "residual":
        return ({"type": "residual", "activation": "relu"}, "") if layer.source == -1 else None
    return None


def _native(layer: Layer, top: bool = True) -> tuple[dict, dict] | None:
    """Loom definition and weights of ``layer``, or ``None`` when Loom cannot express it."""
    if layer.type_name == "parallel":
        defs, ws = [], []
        for br in layer.branches:
            got = _native(_unwrap(br), top=False)
            if got is None:
                return None
            defs.append(got[0])
            ws.append(got[1])
        d = {"type": "parallel", "activation": "relu", "branches": defs,
             "combine_mode": layer.combine_mode}
        if layer.combine_mode == "grid_scatter":
            d.update(grid_output_rows=layer.grid_output_rows,
                     grid_output_cols=layer.grid_output_cols,
                     grid_output_layers=layer.grid_output_layers,
                     grid_positions=[{"branch_index": k, "target_row": r, "target_col": c,
                                      "target_layer": li}
                                     for k, (r, c, li) in enumerate(layer.grid_positions)])
        return d, {"branch_weights": ws}
    got = _native_def(layer, top)
    if got is None:
        return None
    d, kind = got
    weights = lb.params_to_loom_weights(kind, {k: layer.backend.to_host(v) for k, v in
                                               layer.params.items()}) if kind else {}
    return d, weights


def _layer_to_loom(slot: Layer | None) -> tuple[dict, dict]:
    if slot is None:
        return _extension(None)
    main = _unwrap(slot)
    got = _native(main) if main is not slot or not isinstance(slot, Network) else None
    if got is None or slot.disabled:
        return _extension(slot)
    return got


def loom_model(net: Network, model_id: str = "model", batch_size: int | None = None) -> dict:
    """``{"id", "cfg", "weights": {"layers": [...]}}`` of a built network."""
    if not isinstance(net, Network) or not net.built:
        raise LoomxError("only a built Network can be written in Loom's format")
    slots = [s for s in net.slots if not (isinstance(s, Residual) and s.name == REGISTER)]
    grid = (net.grid_rows, net.grid_cols, net.layers_per_cell)
    if len(slots) != net.size:  # implicit-register residuals dropped: Loom re-creates them
        saved = getattr(net, "loom_grid", None)
        grid = saved if saved and math.prod(saved) == len(slots) else (1, len(slots), 1)
    defs, ws = [], []
    for slot in slots:
        d, w = _layer_to_loom(slot)
        defs.append(d)
        ws.append(w)
    bs = batch_size if batch_size is not None else getattr(net, "loom_batch_size", 1)
    cfg = {"id": model_id, "batch_size": int(bs), "grid_rows": grid[0], "grid_cols": grid[1],
           "layers_per_cell": grid[2], "layers": defs}
    return {"id": model_id, "cfg": cfg, "weights": {"layers": ws}}


def save_loom_bundle(nets: Network | dict[str, Network], path: str | os.PathLike | None = None,
                     model_id: str = "model", batch_size: int | None = None) -> str:
    """Loom bundle text of one network (or ``{id: network}``, in that order); written to
    ``path`` atomically when given."""
    if isinstance(nets, Network):
        nets = {model_id: nets}
    text = lb.dump_bundle([loom_model(n, mid, batch_size) for mid, n in nets.items()])
    if path is not None:
        lb.write_text(path, text)
    return text


def loom_architecture(net: Network, batch_size: int | None = None) -> dict:
    """Loom's architecture-only JSON (a ``NetworkConfig`` without weights) of ``net``."""
    cfg = loom_model(net, "model", batch_size)["cfg"]
    cfg.pop("id")
    return cfg


# ---------------------------------------------------------------------- flat edges
def loom_input(flat: Sequence[float] | Array, net: Network, batch_size: int | None = None,
               backend: Backend | str | None = None) -> Array:
    """A Loom flat input vector (``batch_size × features``) as ``[B, *net.input_shape]``.

    ``batch_size`` defaults to the bundle's (``net.loom_batch_size``) or is inferred.
    """
    b = get_backend(backend) if backend is not None else net.backend
    bs = batch_size if batch_size is not None else getattr(net, "loom_batch_size", None)
    if not isinstance(flat, (list, tuple)) and b.is_array(flat):
        flat = b.to_host(flat)
    try:
        host = lb.flat_to_batch(flat, bs, net.input_shape)
    except FormatError as exc:
        raise ConfigError(str(exc)) from None
    return b.from_host(host)


def loom_output(y: Array, net: Network) -> Any:
    """A ``[B, ...]`` output of ``net`` as Loom's flat host vector (sample-major)."""
    return lb.batch_to_flat(net.backend.to_host(y))
