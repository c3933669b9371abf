"""The shape sniffer: a checkpoint's tensor names and shapes → an architecture report.

Tensors are grouped by name path: the first integer component of a name is the block index
(``model.layers.3.self_attn.q_proj.weight`` → block 3, local name ``self_attn.q_proj``), the
rest are global (embedding, positions, final norm, head). Within a block each tensor gets a role
(q, k, v, fused qkv, o, norms, gate/up/down, fused gate_up, router, experts) from a table of the
naming schemes in common use. Shapes then give hidden size, vocabulary, layer count, q/kv widths,
intermediate size, gated vs plain MLP, biases, LayerNorm vs RMSNorm, qk-norm, fused layouts,
learned positions, tied vs untied head and MoE experts.

What shapes cannot tell (head count, rope theta, norm eps, activation, Gemma's conventions,
parallel residual) comes from ``config.json`` (old and new key forms) or GGUF metadata, else a
documented default. Every hyperparameter in the report carries its source: ``"shapes"`` (the
tensor names and shapes in the file), ``"config"``, ``"gguf"`` or ``"default"``. Tensors that fit
no role are listed in :attr:`SniffReport.unrecognised`, never dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FormatError
from ..layers.rope import ROPE_SCALINGS, check_rope_scaling

#: block-local name (without ``.weight``/``.bias``) → role
BLOCK_ROLES: dict[str, str] = {
    # attention projections
    "self_attn.q_proj": "q", "attention.self.query": "q", "attn.q_proj": "q",
    "attention.q_proj": "q", "attention.wq": "q", "self_attention.query": "q",
    "self_attn.k_proj": "k", "attention.self.key": "k", "attn.k_proj": "k",
    "attention.k_proj": "k", "attention.wk": "k", "self_attention.key": "k",
    "self_attn.v_proj": "v", "attention.self.value": "v", "attn.v_proj": "v",
    "attention.v_proj": "v", "attention.wv": "v", "self_attention.value": "v",
    "self_attn.qkv_proj": "qkv", "attn.qkv_proj": "qkv", "attn.c_attn": "qkv",
    "attention.query_key_value": "qkv_interleaved",
    "self_attention.query_key_value": "qkv_interleaved",
    "self_attn.o_proj": "o", "attention.output.dense": "o", "attn.c_proj": "o",
    "attention.dense": "o", "self_attn.dense": "o", "self_attn.out_proj": "o",
    "attn.out_proj": "o", "attention.wo": "o", "attn.o_proj": "o",
    "self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm",
    "attention.q_norm": "q_norm", "attention.k_norm": "k_norm",
    # norms
    "input_layernorm": "attn_norm", "ln_1": "attn_norm", "attention_norm": "attn_norm",
    "post_attention_layernorm": "mlp_norm", "ln_2": "mlp_norm", "ffn_norm": "mlp_norm",
    "pre_feedforward_layernorm": "pre_ffn_norm",
    "post_feedforward_layernorm": "mlp_post_norm",
    "attention.output.LayerNorm": "attn_post_norm", "output.LayerNorm": "mlp_post_norm",
    # MLP
    "mlp.gate_proj": "gate", "feed_forward.w1": "gate",
    "mlp.up_proj": "up", "mlp.c_fc": "up", "mlp.dense_h_to_4h": "up", "mlp.fc1": "up",
    "intermediate.dense": "up", "feed_forward.w3": "up",
    "mlp.down_proj": "down", "mlp.c_proj": "down", "mlp.dense_4h_to_h": "down",
    "mlp.fc2": "down", "output.dense": "down", "feed_forward.w2": "down",
    "mlp.gate_up_proj": "gate_up",
    "mlp.gate": "router", "block_sparse_moe.gate": "router", "mlp.router": "router",
    "mlp.shared_expert.gate_proj": "shared_gate", "mlp.shared_expert.up_proj": "shared_up",
    "mlp.shared_expert.down_proj": "shared_down", "mlp.shared_expert_gate": "shared_router",
}
#: global name suffix (without ``.weight``/``.bias``) → role
GLOBAL_ROLES: dict[str, str] = {
    "embed_tokens": "embed", "wte": "embed", "word_embeddings": "embed", "embed_in": "embed",
    "tok_embeddings": "embed",
    "wpe": "positions", "position_embeddings": "positions", "embed_positions": "positions",
    "token_type_embeddings": "token_types",
    "embeddings.LayerNorm": "embed_norm", "emb_ln": "embed_norm",
    "norm": "final_norm", "ln_f": "final_norm", "final_layer_norm": "final_norm",
    "final_layernorm": "final_norm", "norm_f": "final_norm",
    "lm_head": "head", "embed_out": "head",
    "pooler.dense": "pooler",
}
#: non-parameter buffers some checkpoints carry; listed as ignored with the reason
BUFFERS: dict[str, str] = {
    "position_ids": "position index buffer (positions are computed at run time)",
    "rotary_emb.inv_freq": "RoPE frequency buffer (recomputed from rope_theta)",
    "attn.bias": "causal-mask buffer", "attn.masked_bias": "causal-mask buffer",
    "attention.bias": "causal-mask buffer", "attention.masked_bias": "causal-mask buffer",
}
_EXPERT_RE = re.compile(r"^(?:mlp|block_sparse_moe|feed_forward)\.experts\.(\d+)\.(.+)$")
_MOE_LOCAL = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up",
              "down_proj": "down"}

SOURCES = ("shapes", "config", "gguf", "default")


@dataclass
class Hyper:
    """One hyperparameter: its value and where it came from (one of :data:`SOURCES`)."""

    value: Any
    source: str
    note: str = ""


@dataclass
class SniffReport:
    """The result of :func:`sniff`.

    Attributes:
        path: what was sniffed.
        format: ``"safetensors"`` or ``"gguf"``.
        hparams: name → :class:`Hyper` (value + source) for every hyperparameter.
        globals: role → tensor name for embedding, positions, final norm, head, ...
        blocks: per block, role → tensor-name stem (``…q_proj``, without ``.weight``).
        biases: per block, the set of roles that have a ``.bias`` tensor.
        experts: per block, expert index → role → tensor stem (MoE only).
        unrecognised: tensor names that fit no role (never dropped silently).
        ignored: (tensor name, reason) for buffers that carry no parameters.
        warnings: things the runtime cannot honour (e.g. an unsupported rope scaling).
        config: the ``config.json`` (or GGUF metadata translated to its keys) used.
        tokenizer: path of ``tokenizer.json`` when one was found next to the weights.
    """

    path: str
    format: str
    hparams: dict[str, Hyper] = field(default_factory=dict)
    globals: dict[str, str] = field(default_factory=dict)
    blocks: list[dict[str, str]] = field(default_factory=list)
    biases: list[set[str]] = field(default_factory=list)
    experts: list[dict[int, dict[str, str]]] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    source: Any = field(default=None, repr=False)

    def __getitem__(self, name: str) -> Any:
        return self.hparams[name].value

    def get(self, name: str, default: Any = None) -> Any:
        h = self.hparams.get(name)
        return default if h is None else h.value

    def source_of(self, name: str) -> str:
        return self.hparams[name].source

    @property
    def architecture(self) -> str:
        """A one-line summary, e.g. ``"decoder, 30 blocks, pre-norm, rms, gated silu"``."""
        a = self
        attn = f"{a['num_heads']}/{a['num_kv_heads']} heads x {a['head_dim']}"
        mlp = f"{'gated' if a['gated_mlp'] else 'plain'} {a['activation']} MLP"
        pos = a["positions"]
        if pos == "rope":
            scaling = a.get("rope_scaling")
            extra = f", {scaling['type']} x{scaling['factor']:g}" if scaling else ""
            pos = f"rope(theta={a['rope_theta']:g}, fraction={a['rope_fraction']:g}{extra})"
        return (f"{a['kind']} ({a.get('model_type') or 'unknown family'}): {a['num_layers']} "
                f"blocks, d={a['hidden_size']}, vocab={a['vocab_size']}, {attn}, {mlp} "
                f"(I={a['intermediate_size']}), {a['norm']} norm, {a['residual']} residual, "
                f"{pos}, {'tied' if a['tied_head'] else 'untied'} head")

    def __str__(self) -> str:
        lines = [f"{self.path} [{self.format}]", self.architecture, "",
                 f"{'hyperparameter':<22} {'value':<28} source"]
        for name, h in self.hparams.items():
            val = repr(h.value) if not isinstance(h.value, str) else h.value
            note = f"  ({h.note})" if h.note else ""
            lines.append(f"{name:<22} {val[:28]:<28} {h.source}{note}")
        if self.experts and any(self.experts):
            lines.append(f"\nMoE: {self['num_experts']} experts per block")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        if self.ignored:
            lines.append(f"\nignored buffers ({len(self.ignored)}):")
            lines += [f"  {n}: {why}" for n, why in self.ignored[:10]]
            if len(self.ignored) > 10:
                lines.append(f"  ... and {len(self.ignored) - 10} more")
        lines.append(f"\nunrecognised tensors ({len(self.unrecognised)}):")
        lines += [f"  {n}" for n in self.unrecognised] or ["  none"]
        return "\n".join(lines)


# ---------------------------------------------------------------------- opening files


def open_checkpoint(path: str | Path) -> tuple[Any, str, dict, str | None, str | None]:
    """Open weights at ``path`` (file, shard index or folder).

    Returns ``(tensor source, format, config dict, config source, tokenizer.json path)``; the
    tensor source offers ``names()``, ``shape(name)``, ``dtype(name)``, ``host(name)`` and
    ``load(name, backend, dtype)``.
    """
    from ..io.safetensors import open_safetensors

    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or folder")
    folder = p if p.is_dir() else p.parent
    gguf_files = sorted(folder.glob("*.gguf")) if p.is_dir() else []
    if p.suffix == ".gguf" or (p.is_dir() and gguf_files and not any(folder.glob("*.safetensors"))
                               and not (folder / "model.safetensors.index.json").exists()):
        from ..io.gguf import GGUFFile

        parts = [f for f in ([p] if p.suffix == ".gguf" else gguf_files)
                 if re.search(r"-\d{5}-of-\d{5}\.gguf$", f.name)]
        if parts:  # one model split over several files: each file alone is incomplete
            raise FormatError(f"{parts[0]}: a split GGUF (one part of several); loomx reads "
                              "single-file GGUF, so merge the parts first (llama.cpp's "
                              "llama-gguf-split --merge)")
        if p.is_dir() and len(gguf_files) > 1:  # several quantisations side by side, say
            raise FormatError(f"{p}: holds {len(gguf_files)} GGUF files "
                              f"({', '.join(f.name for f in gguf_files)}); pass one of them")
        src = GGUFFile(p if p.suffix == ".gguf" else gguf_files[0])
        tok = folder / "tokenizer.json"
        return src, "gguf", src.config(), "gguf", str(tok) if tok.is_file() else None
    src = open_safetensors(p)
    config, csource = {}, None
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise FormatError(f"{cfg_path}: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise FormatError(f"{cfg_path}: must hold a JSON object")
        csource = "config"
        gen = folder / "generation_config.json"
        if gen.is_file():
            try:
                gcfg = json.loads(gen.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise FormatError(f"{gen}: not valid JSON ({exc})") from None
            if not isinstance(gcfg, dict):
                raise FormatError(f"{gen}: must hold a JSON object, got {type(gcfg).__name__}")
            # generation settings win, as in transformers' generate (Llama 3 Instruct's
            # end-of-turn id is only there)
            for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
                if gcfg.get(k) is not None:
                    config[k] = gcfg[k]
    tok = folder / "tokenizer.json"
    return src, "safetensors", config, csource, str(tok) if tok.is_file() else None


# ---------------------------------------------------------------------- grouping


def _split(name: str) -> tuple[str, str]:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix[1:]
    return name, ""


def _group(names: list[str], report: SniffReport) -> str:
    """Fill report.globals / blocks / experts / unrecognised / ignored; return block prefix."""
    per_prefix: dict[str, int] = {}
    parsed = []
    for name in names:
        parts = name.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if idx is None:
            parsed.append((name, None, None, None))
            continue
        prefix = ".".join(parts[:idx])
        per_prefix[prefix] = per_prefix.get(prefix, 0) + 1
        parsed.append((name, prefix, int(parts[idx]), ".".join(parts[idx + 1:])))
    block_prefix = max(per_prefix, key=per_prefix.get) if per_prefix else ""
    n_blocks = 1 + max((b for _, pre, b, _ in parsed if pre == block_prefix and b is not None),
                       default=-1)
    report.blocks = [{} for _ in range(n_blocks)]
    report.biases = [set() for _ in range(n_blocks)]
    report.experts = [{} for _ in range(n_blocks)]
    for name, prefix, block, local in parsed:
        if prefix is not None and prefix == block_prefix:
            _place_block(name, block, local, report)
        else:
            _place_global(name, report)
    return block_prefix


def _buffer_reason(stem_or_name: str) -> str | None:
    for suffix, why in BUFFERS.items():
        if stem_or_name == suffix or stem_or_name.endswith("." + suffix):
            return why
    return None


def _place_block(name: str, block: int, local: str, report: SniffReport) -> None:
    stem, kind = _split(local)
    why = _buffer_reason(local) or (_buffer_reason(stem) if kind == "bias" else None)
    if why and not (kind == "bias" and stem in BLOCK_ROLES):
        report.ignored.append((name, why))
        return
    m = _EXPERT_RE.match(stem)
    if m and _MOE_LOCAL.get(m.group(2)):
        experts = report.experts[block].setdefault(int(m.group(1)), {})
        experts[_MOE_LOCAL[m.group(2)]] = name[: len(name) - len(kind) - 1] if kind else name
        return
    role = BLOCK_ROLES.get(stem)
    if role is None or not kind:
        report.unrecognised.append(name)
        return
    full_stem = name[: -(len(kind) + 1)]
    report.blocks[block][role] = full_stem
    if kind == "bias":
        report.biases[block].add(role)


def _place_global(name: str, report: SniffReport) -> None:
    stem, kind = _split(name)
    why = _buffer_reason(name)
    if why:
        report.ignored.append((name, why))
        return
    for suffix, role in GLOBAL_ROLES.items():
        if kind and (stem == suffix or stem.endswith("." + suffix)):
            report.globals[role] = stem
            if kind == "bias":
                report.globals[role + ".bias"] = stem
            return
    report.unrecognised.append(name)


# ---------------------------------------------------------------------- config helpers


def _cfg(config: dict, *keys: str) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return None


def _cfg_num(config: dict, keys: tuple[str, ...], kind: type = int) -> Any:
    """The first of ``keys`` present, converted by :func:`_number` (None when absent)."""
    for k in keys:
        if config.get(k) is not None:
            return _number(config[k], k, kind)
    return None


def _number(value: Any, key: str, kind: type = int, positive: bool = True) -> Any:
    """``value`` of config key ``key`` as ``kind`` (int or float); ConfigError if it is not."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        out = kind(value)
        if kind is int and out != float(value):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"config {key!r} must be a{'n integer' if kind is int else ' number'}"
                          f", got {value!r}") from None
    if not math.isfinite(out) or (positive and out <= 0):
        raise ConfigError(f"config {key!r} must be {'positive' if positive else 'finite'}, "
                          f"got {value!r}")
    return out


def _rope_params(config: dict) -> dict:
    """Merge old (``rope_theta``, ``rope_scaling``) and new (``rope_parameters``) key forms."""
    out: dict[str, Any] = {}
    rp = config.get("rope_parameters")
    if isinstance(rp, dict):
        if "rope_theta" not in rp and "full_attention" in rp and isinstance(
                rp["full_attention"], dict):
            rp = rp["full_attention"]
        out.update(rp)
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind and kind != "default":
            out["rope_type"] = kind
        for k, v in scaling.items():
            out.setdefault(k, v)
    for k in ("rope_theta", "partial_rotary_factor", "rotary_pct"):
        if config.get(k) is not None:
            out.setdefault(k, config[k])
    if config.get("rotary_emb_base") is not None:  # GPT-NeoX's name for the base
        out.setdefault("rope_theta", config["rotary_emb_base"])
    if str(config.get("model_type", "")).startswith("gpt_neox"):
        out.setdefault("rotary_pct", 0.25)  # transformers' GPTNeoXConfig default
    if "rotary_pct" in out:
        out.setdefault("partial_rotary_factor", out["rotary_pct"])
    return out


# ---------------------------------------------------------------------- sniffing


def sniff(path: str | Path, config: dict | str | Path | None = None) -> SniffReport:
    """Sniff the checkpoint at ``path`` (``.safetensors``, shard index, ``.gguf`` or folder).

    Args:
        path: the weights (a folder is searched for ``model.safetensors``, an index or a GGUF).
        config: a ``config.json`` dict or path overriding the one found next to the weights;
            pass ``{}`` to sniff from the tensors alone.

    Returns:
        a :class:`SniffReport`; ``print(report)`` shows every hyperparameter and its source.
    """
    src, fmt, cfg, csource, tokenizer = open_checkpoint(path)
    if config is not None:
        where = "the config" if isinstance(config, dict) else str(config)
        if not isinstance(config, dict):
            try:
                config = json.loads(Path(config).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise FormatError(f"{where}: cannot read config ({exc})") from None
        if not isinstance(config, dict):
            raise FormatError(f"{where}: the config must be a JSON object, got "
                              f"{type(config).__name__}")
        cfg, csource = dict(config), "config"
    report = SniffReport(path=str(path), format=fmt, config=cfg, tokenizer=tokenizer,
                         source=src)
    names = src.names()
    _group(names, report)
    report.warnings.extend(getattr(src, "warnings", None) or [])
    try:
        _Sniffer(report, src, cfg, csource or "default").run()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return report


class _Sniffer:
    def __init__(self, report: SniffReport, src: Any, cfg: dict, csource: str):
        self.r, self.src, self.cfg, self.cs = report, src, cfg, csource
        self.h = report.hparams

    def set(self, name: str, value: Any, source: str, note: str = "") -> Any:
        self.h[name] = Hyper(value, source, note)
        return value

    def from_cfg(self, name: str, keys: tuple[str, ...], default: Any, note: str = "") -> Any:
        v = _cfg(self.cfg, *keys)
        if v is not None:
            return self.set(name, v, self.cs)
        return self.set(name, default, "default", note)

    def shape(self, stem: str, kind: str = "weight") -> tuple[int, ...]:
        return tuple(self.src.shape(f"{stem}.{kind}"))

    def run(self) -> None:
        r, g = self.r, self.r.globals
        if "embed" not in g:
            raise FormatError(f"{r.path}: no token embedding found (looked for names ending in "
                              f"{', '.join(k for k, v in GLOBAL_ROLES.items() if v == 'embed')})"
                              "; this does not look like a transformer checkpoint")
        if not r.blocks:
            raise FormatError(f"{r.path}: no numbered blocks found (names like "
                              "'model.layers.0.…'); this does not look like a transformer")
        self.set("model_type", _cfg(self.cfg, "model_type") or "",
                 self.cs if _cfg(self.cfg, "model_type") else "default")
        emb = self.shape(g["embed"])
        if len(emb) != 2 or 0 in emb:
            raise FormatError(f"{r.path}: the token embedding {g['embed']}.weight must be a "
                              f"[vocab, hidden] matrix, got shape {list(emb)}")
        vocab, hidden = emb
        self.set("vocab_size", vocab, "shapes")
        self.set("hidden_size", hidden, "shapes")
        self.set("num_layers", len(r.blocks), "shapes")
        b0 = r.blocks[0]
        for i, blk in enumerate(r.blocks):
            if set(blk) != set(b0):
                raise FormatError(f"{r.path}: block {i} has roles {sorted(blk)} but block 0 has "
                                  f"{sorted(b0)}; mixed block layouts are not supported")
        self._attention(b0, hidden)
        self._mlp(b0, hidden)
        self._norms(b0)
        self._positions(hidden)
        self._residual(b0)
        self._head()
        self._tokens()
        self._unsupported()

    def _unsupported(self) -> None:
        """Config features and tensors that change every output and that the runtime does not
        build: each becomes a warning that ``load_model`` refuses ("not built"), instead of a
        model that loads and computes something else."""
        cfg, mt = self.cfg, str(self.r["model_type"])
        found = []
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if _cfg(cfg, key):
                found.append(f"{key} ({cfg[key]})")
        qpas = _cfg(cfg, "query_pre_attn_scalar")
        if qpas is not None and qpas != self.r["head_dim"]:
            found.append(f"query_pre_attn_scalar {qpas} (attention scaled by 1/sqrt of it, "
                         f"not of head_dim {self.r['head_dim']})")
        if mt.startswith("gemma3"):
            found.append("Gemma 3's unit-offset q/k norms and per-layer RoPE bases")
        if _cfg(cfg, "scale_attn_by_inverse_layer_idx"):
            found.append("scale_attn_by_inverse_layer_idx")
        if _cfg(cfg, "scale_attn_weights") is False:
            found.append("scale_attn_weights=false")
        if mt.startswith("cohere") or _cfg(cfg, "logit_scale") not in (None, 1, 1.0):
            found.append("Cohere's bias-free LayerNorm and logit_scale")
        if mt.startswith("olmo2"):
            found.append("OLMo 2's norms after each sublayer (and on q/k)")
        if mt in ("roberta", "xlm-roberta", "camembert", "data2vec-text"):
            found.append(f"{mt}'s position ids, which start after the padding id")
        block_params = [n for n in self.r.unrecognised
                        if n.endswith((".weight", ".bias")) and any(c.isdigit() for c in n)]
        if block_params:
            shown = ", ".join(block_params[:4]) + (" ..." if len(block_params) > 4 else "")
            found.append(f"{len(block_params)} block tensors that fit no role ({shown})")
        for what in found:
            self.r.warnings.append(f"{what}: not built by the loader, so every output would "
                                   "differ from the reference; refusing to load")

    # -- attention
    def _attention(self, b: dict, hidden: int) -> None:
        r = self.r
        conv1d = False
        if "qkv" in b or "qkv_interleaved" in b:
            key = "qkv" if "qkv" in b else "qkv_interleaved"
            shp = self.shape(b[key])
            if shp[0] == hidden and shp[1] != hidden:
                conv1d, total = True, shp[1]
            else:
                total = shp[0]
            q_width = self.shape(b["o"])[0 if conv1d else 1] if "o" in b else hidden
            kv_width = (total - q_width) // 2
            layout = "conv1d" if conv1d else ("interleaved" if key == "qkv_interleaved"
                                              else "fused")
            self.set("qkv_layout", layout, "shapes",
                     {"conv1d": "one [in, 3·out] Conv1D matrix, [q|k|v]",
                      "interleaved": "per head (heads, 3, head_dim)",
                      "fused": "one matrix, [q|k|v] rows"}[layout])
        elif all(k in b for k in ("q", "k", "v")):
            q_width, kv_width = self.shape(b["q"])[0], self.shape(b["k"])[0]
            self.set("qkv_layout", "separate", "shapes")
        else:
            raise FormatError(f"{r.path}: block 0 has no attention projections (roles found: "
                              f"{sorted(b)})")
        self.set("conv1d_weights", conv1d, "shapes")
        self.set("q_width", q_width, "shapes")
        self.set("kv_width", kv_width, "shapes")
        qk_norm = "q_norm" in b
        self.set("qk_norm", qk_norm, "shapes")
        heads = _cfg_num(self.cfg, ("num_attention_heads", "n_head", "num_heads"))
        hd = _cfg_num(self.cfg, ("head_dim",))
        if qk_norm and self.shape(b["q_norm"])[0] < q_width:
            head_dim = self.set("head_dim", self.shape(b["q_norm"])[0], "shapes",
                                "length of the per-head q_norm")
        elif hd is not None:
            head_dim = self.set("head_dim", int(hd), self.cs)
        elif heads is not None:
            head_dim = self.set("head_dim", q_width // int(heads), self.cs,
                                "q width / num_attention_heads")
        else:
            guess = next((c for c in (64, 128, 32, 16, 8)
                          if q_width % c == 0 and kv_width % c == 0), math.gcd(q_width, kv_width))
            head_dim = self.set("head_dim", guess, "default",
                                "guess: head count cannot be read from shapes")
        if heads is not None:
            self.set("num_heads", int(heads), self.cs)
        else:
            self.set("num_heads", q_width // head_dim, self.h["head_dim"].source,
                     "q width / head_dim")
        kv = _cfg_num(self.cfg, ("num_key_value_heads", "n_head_kv", "num_kv_heads"))
        if kv is not None:
            self.set("num_kv_heads", int(kv), self.cs)
        else:
            self.set("num_kv_heads", kv_width // head_dim, self.h["head_dim"].source,
                     "kv width / head_dim")
        heads, kv = self.r["num_heads"], self.r["num_kv_heads"]
        if head_dim <= 0 or heads * head_dim != q_width or kv * head_dim != kv_width:
            raise FormatError(
                f"{r.path}: attention widths disagree with the head layout: q width {q_width}, "
                f"kv width {kv_width}, but {self.r['num_heads']} heads / "
                f"{self.r['num_kv_heads']} kv heads x head_dim {head_dim}; fix config.json")
        bias = r.biases[0]
        for role in ("q", "k", "v", "o"):
            fused = "qkv" if "qkv" in b else "qkv_interleaved"
            has = role in bias or (role in "qkv" and fused in bias)
            self.set(f"{role}_bias", has, "shapes")
        if qk_norm:
            self.from_cfg("qk_norm_eps", ("rms_norm_eps",), 1e-6)

    # -- MLP
    def _mlp(self, b: dict, hidden: int) -> None:
        r = self.r
        experts = r.experts[0]
        if experts:
            e0 = experts[min(experts)]
            self.set("num_experts", len(experts), "shapes")
            self.from_cfg("experts_per_token", ("num_experts_per_tok", "top_k"), 2)
            inter = self.shape(e0["up"])[0] if "up" in e0 else self.shape(e0["down"])[1]
            self.set("intermediate_size", inter, "shapes", "per expert")
            self.set("gated_mlp", "gate" in e0, "shapes")
            self.set("mlp_bias", False, "shapes")
            self.set("shared_expert_size", self.shape(b["shared_up"])[0]
                     if "shared_up" in b else 0, "shapes", "gated shared expert (Qwen2-MoE)"
                     if "shared_up" in b else "no shared expert")
            if _cfg(self.cfg, "norm_topk_prob") is not None:  # Qwen2-MoE, Qwen3-MoE, ...
                self.from_cfg("normalize_topk", ("norm_topk_prob",), False)
            elif str(self.r["model_type"]).startswith("qwen2_moe"):
                self.set("normalize_topk", False, "default", "Qwen2-MoE's default")
            else:
                self.set("normalize_topk", True, "default", "renormalise the top-k (Mixtral)")
        elif "gate_up" in b:
            self.set("intermediate_size", self.shape(b["gate_up"])[0] // 2, "shapes")
            self.set("gated_mlp", True, "shapes")
            self.set("mlp_layout", "fused", "shapes", "one [2I, d] matrix, [gate|up] rows")
        elif "up" in b and "down" in b:
            shp = self.shape(b["up"])
            inter = shp[1] if self.h["conv1d_weights"].value else shp[0]
            self.set("intermediate_size", inter, "shapes")
            self.set("gated_mlp", "gate" in b, "shapes")
            self.set("mlp_layout", "separate", "shapes")
        else:
            raise FormatError(f"{r.path}: block 0 has no MLP (roles found: {sorted(b)})")
        if not experts:
            self.set("mlp_bias", bool({"up", "down", "gate_up"} & r.biases[0]), "shapes")
        gated = self.r["gated_mlp"]
        act = _cfg(self.cfg, "hidden_activation", "hidden_act", "activation_function")
        if act is not None:
            if str(act) == "gelu" and str(self.r["model_type"]).startswith("gemma"):
                self.set("activation", "gelu_tanh", self.cs,
                         "Gemma's 'gelu' is the tanh approximation (as in transformers)")
            else:
                self.set("activation", str(act), self.cs)
        else:
            self.set("activation", "silu" if gated else "gelu", "default",
                     "silu for gated MLPs, gelu otherwise")

    # -- norms
    def _norms(self, b: dict) -> None:
        r = self.r
        norm_roles = [k for k in b if k.endswith("norm") and k not in ("q_norm", "k_norm")]
        has_bias = any(k in r.biases[0] for k in norm_roles)
        norm = self.set("norm", "layer" if has_bias else "rms", "shapes",
                        "LayerNorm: norm weights come with biases" if has_bias else
                        "RMSNorm: norm weights without biases")
        keys = (("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps",
                 "norm_epsilon") if norm == "rms" else
                ("layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon",
                 "rms_norm_eps"))
        self.from_cfg("norm_eps", keys, 1e-6 if norm == "rms" else 1e-5)
        mt = str(self.r["model_type"])
        gemma = mt.startswith("gemma")
        if gemma and r.format == "gguf":
            self.set("norm_unit_offset", False, "gguf",
                     "Gemma norms: llama.cpp stores 1+γ in the file")
        else:
            self.set("norm_unit_offset", gemma, self.cs if gemma else "default",
                     "Gemma (1+γ) RMSNorm" if gemma else "")
        hidden = self.r["hidden_size"]
        self.set("embed_scale", math.sqrt(hidden) if gemma else 1.0,
                 self.cs if gemma else "default", "Gemma scales embeddings by sqrt(d)"
                 if gemma else "")
        self.set("final_norm", "final_norm" in r.globals, "shapes")
        self.set("embed_norm", "embed_norm" in r.globals, "shapes")

    # -- positions
    def _positions(self, hidden: int) -> None:
        r, g = self.r, self.r.globals
        self.set("token_types", self.shape(g["token_types"])[0] if "token_types" in g else 0,
                 "shapes")
        maxpos = _cfg(self.cfg, "max_position_embeddings", "n_positions", "n_ctx")
        if "positions" in g:
            self.set("positions", "learned", "shapes")
            self.set("max_positions", self.shape(g["positions"])[0], "shapes")
            return
        rope = _rope_params(self.cfg)
        self.set("positions", "rope", "shapes", "no position table in the file")
        if maxpos is not None:
            maxpos = _number(maxpos, "max_position_embeddings")
            self.set("max_positions", maxpos, self.cs)
        else:
            self.set("max_positions", 2048, "default")
        if "rope_theta" in rope:
            self.set("rope_theta", _number(rope["rope_theta"], "rope_theta", float), self.cs)
        else:
            self.set("rope_theta", 10000.0, "default")
        if rope.get("partial_rotary_factor") is not None:
            frac = _number(rope["partial_rotary_factor"], "partial_rotary_factor", float)
            if frac > 1:
                raise ConfigError(f"config 'partial_rotary_factor' must be in (0, 1], got {frac}")
            self.set("rope_fraction", frac, self.cs)
        else:
            self.set("rope_fraction", 1.0, "default")
        self._rope_scaling(rope, maxpos)
        if _cfg(self.cfg, "sliding_window") and _cfg(self.cfg, "use_sliding_window") is not False:
            r.warnings.append(f"sliding-window attention ({self.cfg['sliding_window']}) is not "
                              "applied: sequences longer than the window differ")

    def _rope_scaling(self, rope: dict, maxpos: Any) -> None:
        kind = rope.get("rope_type") or "default"
        if kind == "default":
            self.set("rope_scaling", None, "default", "plain RoPE")
            return
        old = self.cfg.get("rope_scaling")
        key = "rope_scaling" if isinstance(old, dict) and old.get(
            "rope_type", old.get("type")) not in (None, "default") else "rope_parameters"
        if kind not in ROPE_SCALINGS:
            self.set("rope_scaling", None, "default", f"{key} type {kind!r} not supported")
            self.r.warnings.append(
                f"rope type {kind!r} ({key}) is not implemented (supported: "
                f"{', '.join(ROPE_SCALINGS)}): positions past the original context will differ "
                "from the reference")
            return
        params = dict(rope, type=kind)
        if kind in ("llama3", "yarn"):  # where transformers looks for the pretraining context
            top = self.cfg.get("original_max_position_embeddings")
            orig = top if top is not None else (
                params.get("original_max_position_embeddings") or maxpos)
            params["original_max_position_embeddings"] = orig
            if kind == "yarn" and params.get("factor") is None and maxpos and orig:
                params["factor"] = int(maxpos) / int(orig)
        try:
            scaling = check_rope_scaling(params, f"config {key}")
        except ConfigError as e:
            self.set("rope_scaling", None, "default", f"{key} unreadable")
            self.r.warnings.append(f"{e}: rope scaling is not applied")
            return
        self.set("rope_scaling", scaling, self.cs, f"from {key}")

    # -- residual wiring and encoder/decoder
    def _residual(self, b: dict) -> None:
        if "attn_post_norm" in b and "attn_norm" not in b:
            self.set("residual", "post_norm", "shapes", "norms after each residual add (BERT)")
            self.set("kind", "encoder", "shapes", "post-norm blocks, bidirectional attention")
            return
        is_decoder = self.cfg.get("is_decoder")
        archs = " ".join(self.cfg.get("architectures") or [])
        encoder = "ForMaskedLM" in archs or (archs.endswith("Model")
                                              and "token_types" in self.r.globals)
        self.set("kind", "encoder" if encoder and not is_decoder else "decoder",
                 self.cs if archs else "default", "causal attention" if not encoder else "")
        if "mlp_norm" not in b and "pre_ffn_norm" not in b:
            self.set("residual", "parallel", "shapes",
                     "one norm per block feeds attention and MLP (x + attn(n(x)) + mlp(n(x)))")
            return
        par = _cfg(self.cfg, "use_parallel_residual", "parallel_attn")
        if par:
            self.set("residual", "parallel", self.cs,
                     "x + attn(n1(x)) + mlp(n2(x))")
        elif "pre_ffn_norm" in b:
            self.set("residual", "sandwich", "shapes", "norms before and after each sublayer")
        else:
            self.set("residual", "pre_norm", "shapes" if par is None else self.cs)

    # -- head
    def _head(self) -> None:
        g = self.r.globals
        tied_cfg = _cfg(self.cfg, "tie_word_embeddings")
        if self.r["kind"] == "encoder" and "head" not in g:
            self.set("tied_head", True, "shapes", "encoder: no LM head in the file")
        elif "head" in g:
            self.set("tied_head", False, "shapes", "separate head matrix in the file")
        else:
            self.set("tied_head", True, "shapes", "no head matrix: logits use the embedding")
            if tied_cfg is False:
                self.r.warnings.append("config says tie_word_embeddings=false but the file has "
                                       "no head matrix; the embedding is used")
        self.set("head_bias", "head.bias" in g, "shapes")

    def _tokens(self) -> None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = _cfg(self.cfg, key)
            if v is not None:
                self.set(key, v, self.cs)
