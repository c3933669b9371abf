"""Host-side reading and writing of Loom's JSON files (``modelhost/bundle`` and architecture).

A bundle is ``{"type": "modelhost/bundle", "version": 1, "models": [model, ...]}`` where each
model is ``{"id", "cfg": NetworkConfig, "weights": {"fmt": "jsonModelB64", "data": base64}}``
and ``data`` decodes to compact JSON ``{"type": "float32", "dtype": "", "layers": [...]}``.
This module only moves between text and plain Python structures (dicts, lists and float32
numpy arrays for weight vectors); the mapping to loomx layers is in
:mod:`loomx.grid.loom_format`.

The writer reproduces Loom's bytes: the outer JSON indented by two spaces, keys in Loom's
struct order, weights as compact JSON with float32 numbers in Go's shortest form
(``0.00001``, ``1e-7``), base64 with padding.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os

import numpy as np

from ..errors import FormatError
from .loomx_format import atomic_write_bytes, np_dtype

BUNDLE_TYPE = "modelhost/bundle"
WEIGHTS_FMT = "jsonModelB64"

#: LayerDefinition keys in Loom's struct order (``nn/serialization.go``).
CFG_KEYS = ("type", "activation", "width", "height", "input_size", "output_size",
            "input_channels", "filters", "kernel_size", "stride", "padding", "input_height",
            "input_width", "output_height", "output_width", "d_model", "num_heads",
            "seq_length", "hidden_size", "softmax_variant", "softmax_rows", "softmax_cols",
            "temperature", "gumbel_noise", "mask", "hierarchy_levels", "adaptive_clusters",
            "mixture_weights", "entmax_alpha", "norm_size", "epsilon", "branches",
            "combine_mode", "grid_positions", "grid_output_rows", "grid_output_cols",
            "grid_output_layers")
#: LayerWeights keys in Loom's struct order.
WEIGHT_KEYS = ("dtype", "biases", "kernel", "conv_bias", "q_weights", "k_weights", "v_weights",
               "output_weight", "q_bias", "k_bias", "v_bias", "output_bias", "weight_ih",
               "weight_hh", "bias_h", "weight_ii", "weight_if", "weight_ig", "weight_io",
               "weight_hi", "weight_hf", "weight_hg", "weight_ho", "bias_i", "bias_f", "bias_g",
               "bias_o", "gamma", "beta", "gate_weights", "up_weights", "down_weights",
               "gate_bias", "up_bias", "down_bias", "branch_weights")
FLOAT_CFG_KEYS = {"temperature", "entmax_alpha", "epsilon", "mixture_weights"}
NET_KEYS = ("id", "batch_size", "grid_rows", "grid_cols", "layers_per_cell", "layers", "seed")


# ---------------------------------------------------------------------- Go-style JSON
def go_float32(v: float) -> str:
    """``v`` as Go's ``encoding/json`` writes a float32 (shortest round-trip digits)."""
    f = np.float32(v)
    if not np.isfinite(f):
        raise FormatError(f"Loom JSON cannot hold the non-finite value {float(f)}")
    a = abs(float(f))
    if a != 0 and (a < 1e-6 or a >= 1e21):
        return np.format_float_scientific(f, unique=True, trim="-", exp_digits=1)
    return np.format_float_positional(f, unique=True, trim="-")


def _encode(obj, indent: int | None, level: int, float_keys: bool = False) -> str:
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if obj is None:
        return "null"
    if isinstance(obj, np.ndarray):
        obj = obj.tolist() if obj.dtype.kind in "biu" else [np.float32(v) for v in obj.ravel()]
    if isinstance(obj, (float, np.floating)):
        return go_float32(obj)
    if isinstance(obj, (int, np.integer)):
        return str(int(obj))
    if isinstance(obj, str):
        return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(
            ">", "\\u003e").replace("&", "\\u0026")
    if isinstance(obj, dict):
        items = list(obj.items())
        if not items:
            return "{}"
        if indent is None:
            return "{" + ",".join(f"{_encode(k, None, 0)}:{_encode(v, None, 0)}"
                                  for k, v in items) + "}"
        pad, inner = " " * (indent * level), " " * (indent * (level + 1))
        body = ",\n".join(f"{inner}{_encode(k, None, 0)}: {_encode(v, indent, level + 1)}"
                          for k, v in items)
        return "{\n" + body + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        if indent is None:
            return "[" + ",".join(_encode(v, None, 0) for v in obj) + "]"
        pad, inner = " " * (indent * level), " " * (indent * (level + 1))
        return "[\n" + ",\n".join(inner + _encode(v, indent, level + 1) for v in obj) + \
            "\n" + pad + "]"
    raise FormatError(f"cannot write a {type(obj).__name__} into Loom JSON")


def go_json(obj, indent: int | None = None) -> str:
    """Serialise like Go's ``json.Marshal`` (``indent=None``) / ``MarshalIndent`` (2)."""
    return _encode(obj, indent, 0)


def _ordered(d: dict, keys: tuple[str, ...]) -> dict:
    out = {k: d[k] for k in keys if k in d}
    out.update({k: v for k, v in d.items() if k not in out})
    return out


def order_layer_cfg(cfg: dict) -> dict:
    """A layer definition with keys in Loom's order (branches recursively)."""
    cfg = _ordered(cfg, CFG_KEYS)
    if "branches" in cfg:
        cfg["branches"] = [order_layer_cfg(b) for b in cfg["branches"]]
    return cfg


def order_layer_weights(w: dict) -> dict:
    """A layer's weights with keys in Loom's order (branch weights recursively)."""
    w = _ordered(w, WEIGHT_KEYS)
    if "branch_weights" in w:
        w["branch_weights"] = [order_layer_weights(b) for b in w["branch_weights"]]
    return w


# ---------------------------------------------------------------------- reading
def _to_arrays(obj):
    """Weight JSON → the same structure with numeric lists as float32 arrays."""
    if isinstance(obj, dict):
        return {k: _to_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            return np.asarray(obj, dtype=np.float32)
        return [_to_arrays(v) for v in obj]
    return obj


def read_text(text_or_path: str | os.PathLike) -> str:
    """The JSON text itself, or the contents of the file it names."""
    if isinstance(text_or_path, os.PathLike) or (
            isinstance(text_or_path, str) and not text_or_path.lstrip().startswith("{")):
        path = os.fspath(text_or_path)
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise FormatError(f"cannot read Loom file {path}: {exc.strerror}") from None
    return text_or_path


def parse_json(text: str, what: str) -> dict:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


def decode_weights(model: dict, where: str) -> dict:
    """Decode a model's ``weights`` (base64 of compact JSON) into arrays."""
    w = model.get("weights")
    if not isinstance(w, dict) or w.get("fmt") != WEIGHTS_FMT or "data" not in w:
        raise FormatError(f"{where}: weights must be {{'fmt': '{WEIGHTS_FMT}', 'data': ...}}, "
                          f"got {str(w)[:80]}")
    try:
        raw = base64.b64decode(w["data"], validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise FormatError(f"{where}: weights data is not valid base64 ({exc})") from None
    doc = parse_json(raw.decode("utf-8", errors="replace"), f"{where}: decoded weights")
    if not isinstance(doc.get("layers"), list):
        raise FormatError(f"{where}: decoded weights have no 'layers' list")
    return _to_arrays(doc)


def parse_bundle(text: str) -> list[dict]:
    """``[{"id", "cfg", "weights"}]`` from bundle text (weights decoded to arrays)."""
    doc = parse_json(text, "Loom bundle")
    if doc.get("type") != BUNDLE_TYPE:
        raise FormatError(f"not a Loom bundle: type is {doc.get('type')!r}, expected "
                          f"{BUNDLE_TYPE!r} (an architecture-only JSON goes through "
                          "load_loom_architecture)")
    models = doc.get("models")
    if not isinstance(models, list) or not models:
        raise FormatError("Loom bundle has no 'models' list")
    out = []
    for k, m in enumerate(models):
        if not isinstance(m, dict) or not isinstance(m.get("cfg"), dict):
            raise FormatError(f"Loom bundle model {k} has no 'cfg' object")
        mid = m.get("id", m["cfg"].get("id", str(k)))
        weights = decode_weights(m, f"model {mid!r}")
        layers = m["cfg"].get("layers")
        if not isinstance(layers, list):
            raise FormatError(f"model {mid!r}: cfg 'layers' must be a list of layer "
                              f"definitions, got {type(layers).__name__}")
        if len(layers) != len(weights["layers"]):
            raise FormatError(f"model {mid!r}: {len(layers)} layer definitions but "
                              f"{len(weights['layers'])} weight entries")
        for i, (c, w) in enumerate(zip(layers, weights["layers"])):
            for what, entry in (("layer definition", c), ("weight entry", w)):
                if not isinstance(entry, dict):
                    raise FormatError(f"model {mid!r}: {what} {i} must be an object, got "
                                      f"{type(entry).__name__} {str(entry)[:40]!r}")
        out.append({"id": mid, "cfg": m["cfg"], "weights": weights})
    return out


# ---------------------------------------------------------------------- writing
def dump_bundle(models: list[dict]) -> str:
    """Bundle text from ``[{"id", "cfg", "weights": {"layers": [...]}}]`` (Loom's bytes)."""
    entries = []
    for m in models:
        cfg = _ordered(dict(m["cfg"]), NET_KEYS)
        cfg["layers"] = [order_layer_cfg(c) for c in cfg["layers"]]
        wdoc = {"type": "float32", "dtype": "",
                "layers": [order_layer_weights(w) for w in m["weights"]["layers"]]}
        data = base64.b64encode(go_json(wdoc).encode("utf-8")).decode("ascii")
        entries.append({"id": m["id"], "cfg": cfg,
                        "weights": {"fmt": WEIGHTS_FMT, "data": data}})
    return go_json({"type": BUNDLE_TYPE, "version": 1, "models": entries}, indent=2)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------- weight layouts
def _vec(w: dict, key: str, n: int, where: str, default: float | None = None) -> np.ndarray:
    v = w.get(key)
    if v is None:
        if default is None:
            raise FormatError(f"{where}: weight {key!r} is missing")
        return np.full(n, default, dtype=np.float32)
    if not isinstance(v, np.ndarray):  # numeric lists were converted when the file was read
        raise FormatError(f"{where}: weight {key!r} must be a list of numbers, got "
                          f"{str(v)[:60]}")
    v = np.asarray(v, dtype=np.float32).ravel()
    if v.size != n:
        raise FormatError(f"{where}: weight {key!r} has {v.size} values, expected {n}")
    return v


def _mat_t(w: dict, key: str, rows: int, cols: int, where: str) -> np.ndarray:
    """Loom ``[rows][cols]`` (input-major) → loomx ``[cols, rows]``."""
    return np.ascontiguousarray(_vec(w, key, rows * cols, where).reshape(rows, cols).T)


def loom_weights_to_params(kind: str, w: dict, dims: dict, where: str) -> dict[str, np.ndarray]:
    """Loom weight vectors of one layer → loomx parameters (host arrays, loomx layouts).

    ``dims``: dense ``in, out``; conv2d ``shape`` (of the kernel); multi_head_attention
    ``d_model, kv``; rnn/lstm ``hidden, input``; layer_norm/rms_norm ``n``; swiglu ``d, m``.
    """
    p: dict[str, np.ndarray] = {}
    if kind == "dense":
        p["weight"] = _mat_t(w, "kernel", dims["in"], dims["out"], where)
        p["bias"] = _vec(w, "biases", dims["out"], where, 0.0)
    elif kind == "conv2d":
        shape = tuple(dims["shape"])
        p["weight"] = _vec(w, "kernel", math.prod(shape), where).reshape(shape)
        p["bias"] = _vec(w, "conv_bias", shape[0], where, 0.0)
    elif kind == "multi_head_attention":
        dm, kv = dims["d_model"], dims["kv"]
        p["q_weight"] = _mat_t(w, "q_weights", dm, dm, where)
        p["k_weight"] = _mat_t(w, "k_weights", dm, kv, where)
        p["v_weight"] = _mat_t(w, "v_weights", dm, kv, where)
        p["o_weight"] = _mat_t(w, "output_weight", dm, dm, where)
        for key, src, n in (("q_bias", "q_bias", dm), ("k_bias", "k_bias", kv),
                            ("v_bias", "v_bias", kv), ("o_bias", "output_bias", dm)):
            p[key] = _vec(w, src, n, where, 0.0)
    elif kind == "rnn":
        h, i = dims["hidden"], dims["input"]
        p["weight_ih"] = _vec(w, "weight_ih", h * i, where).reshape(h, i)
        p["weight_hh"] = _vec(w, "weight_hh", h * h, where).reshape(h, h)
        p["bias"] = _vec(w, "bias_h", h, where, 0.0)
    elif kind == "lstm":
        h, i = dims["hidden"], dims["input"]
        p["weight_ih"] = np.concatenate([_vec(w, f"weight_i{g}", h * i, where).reshape(h, i)
                                         for g in "ifgo"])
        p["weight_hh"] = np.concatenate([_vec(w, f"weight_h{g}", h * h, where).reshape(h, h)
                                         for g in "ifgo"])
        p["bias"] = np.concatenate([_vec(w, f"bias_{g}", h, where, 0.0) for g in "ifgo"])
    elif kind == "layer_norm":
        p["weight"] = _vec(w, "gamma", dims["n"], where, 1.0)
        p["bias"] = _vec(w, "beta", dims["n"], where, 0.0)
    elif kind == "rms_norm":
        p["weight"] = _vec(w, "gamma", dims["n"], where, 1.0)
    elif kind == "swiglu":
        d, m = dims["d"], dims["m"]
        p["gate_weight"] = _mat_t(w, "gate_weights", d, m, where)
        p["up_weight"] = _mat_t(w, "up_weights", d, m, where)
        p["down_weight"] = _mat_t(w, "down_weights", m, d, where)
        p["gate_bias"] = _vec(w, "gate_bias", m, where, 0.0)
        p["up_bias"] = _vec(w, "up_bias", m, where, 0.0)
        p["down_bias"] = _vec(w, "down_bias", d, where, 0.0)
    else:
        raise FormatError(f"{where}: no Loom weight layout for {kind!r}")
    return p


def params_to_loom_weights(kind: str, p: dict[str, np.ndarray]) -> dict:
    """loomx parameters (host arrays) of one layer → Loom's flat weight vectors."""
    def t(key):
        return np.asarray(p[key], np.float32).T.ravel()

    def v(key, n):
        return np.asarray(p[key], np.float32).ravel() if key in p else np.zeros(n, np.float32)

    if kind == "dense":
        return {"biases": v("bias", 0), "kernel": t("weight")}
    if kind == "conv2d":
        return {"kernel": v("weight", 0), "conv_bias": v("bias", 0)}
    if kind == "multi_head_attention":
        dm, kv = p["q_weight"].shape[0], p["k_weight"].shape[0]
        return {"q_weights": t("q_weight"), "k_weights": t("k_weight"),
                "v_weights": t("v_weight"), "output_weight": t("o_weight"),
                "q_bias": v("q_bias", dm), "k_bias": v("k_bias", kv), "v_bias": v("v_bias", kv),
                "output_bias": v("o_bias", dm)}
    if kind == "rnn":
        return {"weight_ih": v("weight_ih", 0), "weight_hh": v("weight_hh", 0),
                "bias_h": v("bias", 0)}
    if kind == "lstm":
        h = p["weight_hh"].shape[1]
        out: dict[str, np.ndarray] = {}
        for prefix, key in (("weight_i", "weight_ih"), ("weight_h", "weight_hh")):
            for g, name in enumerate("ifgo"):
                out[prefix + name] = np.asarray(p[key][g * h:(g + 1) * h], np.float32).ravel()
        for g, name in enumerate("ifgo"):
            out[f"bias_{name}"] = np.asarray(p["bias"][g * h:(g + 1) * h], np.float32)
        return out
    if kind == "layer_norm":
        return {"gamma": v("weight", 0), "beta": v("bias", 0)}
    if kind == "rms_norm":
        return {"gamma": v("weight", 0)}
    if kind == "swiglu":
        m, d = p["gate_weight"].shape
        return {"gate_weights": t("gate_weight"), "up_weights": t("up_weight"),
                "down_weights": t("down_weight"), "gate_bias": v("gate_bias", m),
                "up_bias": v("up_bias", m), "down_bias": v("down_bias", d)}
    raise FormatError(f"no Loom weight layout for {kind!r}")


def ext_params_to_json(params: dict[str, np.ndarray]) -> dict:
    """loomx-extension parameters: ``{name: {"shape", "dtype", "data" (float32 list)}}``."""
    return {name: {"shape": list(a.shape), "dtype": str(a.dtype),
                   "data": np.asarray(a, np.float32).ravel()} for name, a in params.items()}


def ext_params_from_json(stored: dict, shapes: dict[str, tuple], where: str
                         ) -> dict[str, np.ndarray]:
    """Inverse of :func:`ext_params_to_json`, checked against the expected shapes."""
    if set(stored) != set(shapes):
        raise FormatError(f"{where}: loomx_params {sorted(stored)} do not match the layer's "
                          f"parameters {sorted(shapes)}")
    out = {}
    for name, shape in shapes.items():
        entry = stored[name]
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: loomx parameter {name!r} must be an object with "
                              f"shape, dtype and data, got {type(entry).__name__}")
        data = np.asarray(entry.get("data", []), np.float32)
        if list(entry.get("shape", [])) != list(shape) or data.size != math.prod(shape):
            raise FormatError(f"{where}: loomx parameter {name!r} does not have shape "
                              f"{list(shape)}")
        try:
            dtype = np_dtype(str(entry.get("dtype", "float32")))
        except TypeError:
            raise FormatError(f"{where}: loomx parameter {name!r} has unknown dtype "
                              f"{entry.get('dtype')!r}") from None
        out[name] = data.astype(dtype).reshape(shape)
    return out


def flat_to_batch(flat, batch: int | None, shape: tuple[int, ...]) -> np.ndarray:
    """A Loom flat vector (sample-major) → host ``[batch, *shape]`` float32."""
    host = np.asarray(flat, dtype=np.float32).ravel()
    per = math.prod(shape)
    bs = host.size // per if batch is None and per else batch
    if bs is None or host.size != bs * per:
        raise FormatError(f"a Loom input of {host.size} values is not batch_size={bs} × "
                          f"{per} features ({list(shape)})")
    return host.reshape((bs, *shape))


def batch_to_flat(host: np.ndarray) -> np.ndarray:
    """A host ``[B, ...]`` array → Loom's flat sample-major vector."""
    return np.asarray(host).reshape(-1)
