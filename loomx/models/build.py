"""Generic transformer assembly: a :class:`SniffReport` becomes a runnable model.

There is no model class per family. One :class:`TransformerModel` is assembled from generic
loomx layers (``Embedding``, ``MultiHeadAttention``, ``RMSNorm``/``LayerNorm``, ``SwiGLU``/
``MLPBlock``/``MoE``/``Dense``) and driven by the sniffed hyperparameters:

- embedding: ``x = E[ids]·embed_scale (+ P[positions]) (+ T[token_types])``, then an optional
  embedding LayerNorm;
- block, by ``residual``:
  ``pre_norm``  ``h = x + attn(n1(x));  y = h + mlp(n2(h))``;
  ``parallel``  ``y = x + attn(n1(x)) + mlp(n2(x))`` (``n2 = n1`` with a single norm);
  ``sandwich``  ``h = x + p1(attn(n1(x)));  y = h + p2(mlp(n2(h)))``;
  ``post_norm`` ``h = n1(x + attn(x));  y = n2(h + mlp(h))`` (BERT);
- final norm and head ``logits = n(x) Wᵀ (+ b)`` with ``W`` the embedding when tied.

Checkpoint layouts are converted while loading, on the device (array-API slicing only): fused
``[q|k|v]`` and ``[gate|up]`` matrices are split, GPT-NeoX's per-head interleaved QKV is
regrouped, GPT-2's Conv1D ``[in, out]`` matrices are transposed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backends import Backend, RandomSource, get_backend
from ..errors import ConfigError, FormatError, ShapeError
from ..layers.attention import KVCache, MultiHeadAttention
from ..layers.base import Layer
from ..layers.dense import Dense
from ..layers.embedding import Embedding, validate_ids
from ..layers.ffn import MLPBlock, SwiGLU
from ..layers.moe import MoE
from ..layers.norm import LayerNorm, RMSNorm
from .sniff import SniffReport, sniff

Array = Any


class _NoInit(RandomSource):
    """A random source that returns zeros (weights are overwritten from the file anyway)."""

    def normal(self, shape, std=1.0, mean=0.0, dtype=None):
        return self.backend.zeros(shape, dtype=dtype)

    def uniform(self, shape, low=0.0, high=1.0, dtype=None):
        return self.backend.zeros(shape, dtype=dtype)


class Block:
    """The layers of one transformer block (``None`` where the architecture has none)."""

    def __init__(self, attn_norm, attn, mlp_norm, mlp, attn_post=None, mlp_post=None):
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
        self.attn_post, self.mlp_post = attn_post, mlp_post

    def layers(self) -> list[tuple[str, Layer]]:
        names = ("attn_norm", "attn", "mlp_norm", "mlp", "attn_post", "mlp_post")
        return [(n, getattr(self, n)) for n in names if getattr(self, n) is not None]


class TransformerModel:
    """A decoder or encoder assembled from generic layers (see the module docstring).

    Use :func:`load_model` to make one. ``forward(ids)`` gives logits ``[B, T, V]`` for decoders
    and hidden states ``[B, T, D]`` for encoders; ``new_cache(batch, max_len)`` gives one
    :class:`KVCache` per block for incremental decoding.
    """

    def __init__(self, report: SniffReport, backend: Backend):
        self.report = report
        self.backend = backend
        self.kind = report["kind"]
        self.residual = report["residual"]
        self.embed_scale = float(report["embed_scale"])
        self.blocks: list[Block] = []
        self.embed: Embedding | None = None
        self.positions: Embedding | None = None
        self.token_types: Embedding | None = None
        self.embed_norm: Layer | None = None
        self.final_norm: Layer | None = None
        self.head: Dense | None = None

    # ------------------------------------------------------------------ running
    @property
    def xp(self):
        return self.backend.xp

    @property
    def vocab_size(self) -> int:
        return int(self.report["vocab_size"])

    @property
    def max_positions(self) -> int:
        return int(self.report["max_positions"])

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """One empty :class:`KVCache` per block for ``batch`` sequences of ``max_len`` tokens."""
        if self.report["positions"] == "learned" and max_len > self.max_positions:
            raise ConfigError(f"max_len={max_len} exceeds the {self.max_positions} learned "
                              "positions of this model")
        return [blk.attn.new_cache(batch, max_len) for blk in self.blocks]

    def embed_tokens(self, ids: Array, offset: int = 0, token_types: Array | None = None):
        """``ids [B, T]`` (int, device) → ``x [B, T, D]``; positions start at ``offset``."""
        xp = self.xp
        x = self.embed(ids)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        b, t = ids.shape
        if self.positions is not None:
            if offset + t > self.max_positions:
                raise ShapeError(f"positions {offset}..{offset + t - 1} exceed the "
                                 f"{self.max_positions} learned positions of this model")
            pos = xp.arange(offset, offset + t, dtype=xp.int64, device=self.backend.device)
            x = x + self.positions(xp.reshape(pos, (1, t)))
        if self.token_types is not None:
            tt = token_types if token_types is not None else xp.zeros(
                (b, t), dtype=xp.int64, device=self.backend.device)
            x = x + self.token_types(tt)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def _block(self, blk: Block, x: Array, cache: KVCache | None, pad_mask: Array | None):
        def attn(h):
            return blk.attn.forward(h, False, cache, pad_mask)[0]

        if self.residual == "post_norm":
            h = blk.attn_norm(x + attn(x))
            return blk.mlp_norm(h + blk.mlp(h))
        if self.residual == "parallel":
            n2 = blk.mlp_norm or blk.attn_norm
            return x + attn(blk.attn_norm(x)) + blk.mlp(n2(x))
        a = attn(blk.attn_norm(x))
        if blk.attn_post is not None:
            a = blk.attn_post(a)
        h = x + a
        m = blk.mlp(blk.mlp_norm(h))
        if blk.mlp_post is not None:
            m = blk.mlp_post(m)
        return h + m

    def hidden_states(self, ids: Array, cache: list[KVCache] | None = None,
                      attention_mask: Array | None = None,
                      token_types: Array | None = None) -> Array:
        """``ids [B, T]`` → final hidden states ``[B, T, D]`` (after the final norm).

        ``attention_mask [B, T_total]`` (1/True = real token) masks padding keys.
        """
        xp = self.xp
        offset = cache[0].length if cache else 0
        x = self.embed_tokens(ids, offset, token_types)
        pad = None
        if attention_mask is not None:
            pad = xp.logical_not(xp.astype(attention_mask, xp.bool))
        for i, blk in enumerate(self.blocks):
            x = self._block(blk, x, cache[i] if cache else None, pad)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def logits(self, hidden: Array) -> Array:
        """``[B, T, D]`` → ``[B, T, V]`` through the head (tied or not)."""
        if self.head is None:
            raise ConfigError("this model has no language-model head (an encoder); use "
                              "hidden_states() or embed_sentences()")
        return self.head(hidden)

    def forward(self, ids: Array, cache: list[KVCache] | None = None,
                attention_mask: Array | None = None, token_types: Array | None = None) -> Array:
        """Decoder: logits ``[B, T, V]``; encoder: hidden states ``[B, T, D]``."""
        h = self.hidden_states(ids, cache, attention_mask, token_types)
        return self.logits(h) if self.kind == "decoder" else h

    __call__ = forward

    def ids(self, host_ids: Any) -> Array:
        """Host token ids (list or array, ``[T]`` or ``[B, T]``) → validated int64 device ids."""
        validate_ids(host_ids, self.vocab_size, "TransformerModel")
        arr = self.backend.from_host(host_ids, dtype=self.xp.int64)
        return arr if arr.ndim == 2 else self.xp.reshape(arr, (1, -1))

    def embed_sentences(self, ids: Array, attention_mask: Array,
                        normalize: bool = True) -> Array:
        """Mean-pooled sentence embeddings ``[B, D]`` (the sentence-transformers recipe)."""
        xp = self.xp
        h = self.hidden_states(ids, attention_mask=attention_mask)
        m = xp.astype(attention_mask, h.dtype)[..., None]
        pooled = xp.sum(h * m, axis=1) / xp.maximum(xp.sum(m, axis=1), 1e-9)
        if normalize:
            norm = xp.sqrt(xp.sum(pooled * pooled, axis=-1, keepdims=True))
            pooled = pooled / xp.maximum(norm, 1e-12)
        return pooled

    # ------------------------------------------------------------------ structure
    def layers(self) -> list[tuple[str, Layer]]:
        """Every layer with a dotted name, in execution order."""
        out: list[tuple[str, Layer]] = []
        for name in ("embed", "positions", "token_types", "embed_norm"):
            if getattr(self, name) is not None:
                out.append((name, getattr(self, name)))
        for i, blk in enumerate(self.blocks):
            out += [(f"blocks.{i}.{n}", layer) for n, layer in blk.layers()]
        for name in ("final_norm", "head"):
            if getattr(self, name) is not None:
                out.append((name, getattr(self, name)))
        return out

    def param_count(self) -> int:
        """Distinct parameters (a tied head is counted once)."""
        seen, total = set(), 0
        for _, layer in self.layers():
            for p in layer.parameters():
                if id(p.value) not in seen:
                    seen.add(id(p.value))
                    n = 1
                    for d in p.value.shape:
                        n *= int(d)
                    total += n
        return total

    def to_network(self, seq_len: int):
        """The same weights as a loomx grid :class:`~loomx.grid.Network` for ``[seq_len]`` ids.

        Supported for pre-norm decoders with RoPE, no embedding scale and a gated or plain MLP
        (Llama, Mistral, Qwen2/3, Phi-3 ...): the chain is ``Embedding, [norm, attention,
        Residual, norm, MLP, Residual] × L, norm, Dense``. The network runs without a KV cache.
        """
        from ..grid import Network
        from ..grid.residual import Residual
        from ..layers.base import layer_from_config

        r = self.report
        if (self.kind != "decoder" or self.residual != "pre_norm" or self.embed_scale != 1.0
                or self.positions is not None):
            raise ConfigError(
                f"to_network supports pre-norm RoPE decoders with a gated or plain MLP "
                f"and no embedding scale; this model is a {self.kind} with {self.residual} "
                f"residuals, {r['positions']} positions and embedding scale {self.embed_scale}; "
                "use the TransformerModel directly")
        chain: list[Layer] = [self.embed]
        for blk in self.blocks:
            chain += [blk.attn_norm, blk.attn, Residual(-2), blk.mlp_norm, blk.mlp, Residual(-2)]
        if self.final_norm is not None:
            chain.append(self.final_norm)
        chain.append(self.head)
        fresh = [layer_from_config(layer.get_config()) for layer in chain]
        net = Network.chain(fresh)
        net.build((int(seq_len),), self.backend, _NoInit(self.backend))
        for new, old in zip(fresh, chain):
            new.params = dict(old.params)
        net.zero_grad()
        return net


# ---------------------------------------------------------------------- building


def _built(layer: Layer, input_shape: tuple[int, ...], backend: Backend) -> Layer:
    layer.build(input_shape, backend, _NoInit(backend))
    layer.grads = {}
    return layer


class _Loader:
    """Places checkpoint tensors on the backend, converting layouts on the device."""

    def __init__(self, report: SniffReport, backend: Backend):
        self.r, self.src, self.be = report, report.source, backend
        self.xp = backend.xp
        self.conv1d = bool(report["conv1d_weights"])

    def get(self, stem: str, kind: str = "weight") -> Array:
        return self.src.load(f"{stem}.{kind}", self.be, self.be.float_dtype)

    def put(self, layer: Layer, pname: str, value: Array, tensor: str) -> None:
        """``layer.params[pname] = value`` once ``value`` has the shape the layer was built with.

        ``tensor`` names the checkpoint tensor ``value`` came from (for the error message).
        """
        want = layer.params.get(pname)
        if want is not None and tuple(value.shape) != tuple(want.shape):
            raise FormatError(
                f"{self.r.path}: tensor {tensor!r} has shape {list(value.shape)}, but the "
                f"architecture sniffed from the checkpoint needs {list(want.shape)} for "
                f"{type(layer).__name__} parameter {pname!r}; the file is inconsistent "
                "(or its config.json does not describe it)")
        layer.params[pname] = value

    def linear(self, stem: str, kind: str = "weight") -> Array:
        w = self.get(stem, kind)
        if kind == "weight" and self.conv1d and w.ndim == 2:
            w = self.xp.matrix_transpose(w)
        return w

    def qkv(self, blk: dict, kind: str) -> dict[str, tuple[Array, str]]:
        """``{"q"|"k"|"v": (array, name of the checkpoint tensor it came from)}``."""
        r, xp = self.r, self.xp
        qw, kvw = r["q_width"], r["kv_width"]
        layout = r["qkv_layout"]
        if layout == "separate":
            return {p: (self.get(blk[p], kind), f"{blk[p]}.{kind}") for p in "qkv"}
        stem = blk["qkv"] if "qkv" in blk else blk["qkv_interleaved"]
        name = f"{stem}.{kind}"
        w = self.linear(stem, kind)
        if layout == "interleaved":
            h, hd = r["num_heads"], r["head_dim"]
            rest = tuple(w.shape[1:])
            if w.ndim < 1 or w.shape[0] != 3 * h * hd:
                raise FormatError(f"{r.path}: tensor {name!r} has shape {list(w.shape)}, but "
                                  f"{h} heads x 3 x head_dim {hd} need {3 * h * hd} rows")
            g = xp.reshape(w, (h, 3, hd, *rest))
            return {p: (xp.reshape(g[:, i, ...], (h * hd, *rest)), name)
                    for i, p in enumerate("qkv")}
        return {"q": (w[:qw, ...], name), "k": (w[qw:qw + kvw, ...], name),
                "v": (w[qw + kvw:, ...], name)}


def _norm_from(ld: _Loader, stem: str | None) -> Layer | None:
    """The norm stored under ``stem`` (over the hidden size ``d``), or None without one."""
    if stem is None:
        return None
    report, backend = ld.r, ld.be
    d = (int(report["hidden_size"]),)
    has_bias = f"{stem}.bias" in ld.src
    if report["norm"] == "layer":
        layer = _built(LayerNorm(eps=float(report["norm_eps"]), bias=has_bias), d, backend)
    else:
        layer = _built(RMSNorm(eps=float(report["norm_eps"]),
                               unit_offset=bool(report["norm_unit_offset"])), d, backend)
    ld.put(layer, "weight", ld.get(stem), f"{stem}.weight")
    if has_bias and report["norm"] == "layer":
        ld.put(layer, "bias", ld.get(stem, "bias"), f"{stem}.bias")
    return layer


def _attention(ld: _Loader, blk: dict, bias_roles: set) -> MultiHeadAttention:
    r = ld.r
    d = int(r["hidden_size"])
    rope = r["positions"] == "rope"
    attn = MultiHeadAttention(
        num_heads=r["num_heads"], head_dim=r["head_dim"], num_kv_heads=r["num_kv_heads"],
        d_model=d, q_bias=r["q_bias"], k_bias=r["k_bias"], v_bias=r["v_bias"],
        o_bias=r["o_bias"], causal=r["kind"] == "decoder",
        rope_theta=float(r["rope_theta"]) if rope else None, rope_style="half",
        rope_fraction=float(r["rope_fraction"]) if rope else 1.0,
        rope_scaling=r.get("rope_scaling") if rope else None, qk_norm=r["qk_norm"],
        qk_norm_eps=float(r.get("qk_norm_eps", 1e-6)))
    _built(attn, (1, d), ld.be)
    for p, (w, name) in ld.qkv(blk, "weight").items():
        ld.put(attn, f"{p}_weight", w, name)
    if r["q_bias"]:
        for p, (b, name) in ld.qkv(blk, "bias").items():
            ld.put(attn, f"{p}_bias", b, name)
    ld.put(attn, "o_weight", ld.linear(blk["o"]), f"{blk['o']}.weight")
    if r["o_bias"]:
        ld.put(attn, "o_bias", ld.get(blk["o"], "bias"), f"{blk['o']}.bias")
    if r["qk_norm"]:
        ld.put(attn, "q_norm", ld.get(blk["q_norm"]), f"{blk['q_norm']}.weight")
        ld.put(attn, "k_norm", ld.get(blk["k_norm"]), f"{blk['k_norm']}.weight")
    return attn


def _moe(ld: _Loader, blk: dict, experts: dict[int, dict[str, str]]) -> MoE:
    """A :class:`MoE` block from ``experts.{i}.(gate|up|down)``, the router and the optional
    shared expert; the per-expert matrices are stacked to ``[E, ...]`` on the device."""
    r, xp = ld.r, ld.xp
    d, m, e = int(r["hidden_size"]), int(r["intermediate_size"]), int(r["num_experts"])
    if sorted(experts) != list(range(e)) or not r["gated_mlp"]:
        raise ConfigError(f"{r.path}: a mixture-of-experts block needs gated experts "
                          f"0..{e - 1} (as in block 0); found experts {sorted(experts)} with "
                          f"roles {sorted(experts[min(experts)]) if experts else []}")
    shared = int(r.get("shared_expert_size") or 0)
    layer = _built(MoE(e, int(r["experts_per_token"]), m, activation=str(r["activation"]),
                       normalize_topk=bool(r["normalize_topk"]),
                       shared_hidden_features=shared or None), (d,), ld.be)
    for role in ("gate", "up", "down"):
        want = tuple(layer.params[f"{role}_weight"].shape[1:])
        mats = []
        for i in range(e):
            w = ld.linear(experts[i][role])
            if tuple(w.shape) != want:
                raise FormatError(f"{r.path}: tensor {experts[i][role] + '.weight'!r} has shape "
                                  f"{list(w.shape)}, but every expert's {role} matrix needs "
                                  f"{list(want)}")
            mats.append(w)
        layer.params[f"{role}_weight"] = xp.stack(mats, axis=0)
    ld.put(layer, "router_weight", ld.linear(blk["router"]), f"{blk['router']}.weight")
    if shared:
        for role in ("gate", "up", "down"):
            stem = blk[f"shared_{role}"]
            ld.put(layer, f"shared_expert_{role}_weight", ld.linear(stem), f"{stem}.weight")
        stem = blk["shared_router"]
        ld.put(layer, "shared_gate_weight", ld.linear(stem), f"{stem}.weight")
    return layer


def _mlp(ld: _Loader, blk: dict, bias: bool, experts: dict[int, dict[str, str]]) -> Layer:
    r = ld.r
    d, m = int(r["hidden_size"]), int(r["intermediate_size"])
    act = str(r["activation"])
    if r.get("num_experts"):
        return _moe(ld, blk, experts)
    if not r["gated_mlp"]:
        layer = _built(MLPBlock(m, activation=act, bias=bias), (d,), ld.be)
        for role in ("up", "down"):
            ld.put(layer, f"{role}_weight", ld.linear(blk[role]), f"{blk[role]}.weight")
            if bias:
                ld.put(layer, f"{role}_bias", ld.get(blk[role], "bias"), f"{blk[role]}.bias")
        return layer
    layer = _built(SwiGLU(m, bias=bias, activation=act), (d,), ld.be)
    if "gate_up" in blk:
        stem = blk["gate_up"]
        w = ld.get(stem)
        if w.shape[0] != 2 * m:
            raise FormatError(f"{ld.r.path}: tensor {stem + '.weight'!r} has shape "
                              f"{list(w.shape)}, but [gate|up] needs {2 * m} rows")
        ld.put(layer, "gate_weight", w[:m, ...], f"{stem}.weight")
        ld.put(layer, "up_weight", w[m:, ...], f"{stem}.weight")
        if bias:
            bb = ld.get(stem, "bias")
            ld.put(layer, "gate_bias", bb[:m], f"{stem}.bias")
            ld.put(layer, "up_bias", bb[m:], f"{stem}.bias")
    else:
        for role in ("gate", "up"):
            ld.put(layer, f"{role}_weight", ld.linear(blk[role]), f"{blk[role]}.weight")
            if bias:
                ld.put(layer, f"{role}_bias", ld.get(blk[role], "bias"), f"{blk[role]}.bias")
    ld.put(layer, "down_weight", ld.linear(blk["down"]), f"{blk['down']}.weight")
    if bias:
        ld.put(layer, "down_bias", ld.get(blk["down"], "bias"), f"{blk['down']}.bias")
    return layer


def build_model(report: SniffReport, backend: Backend | str | None = None,
                dtype: str | None = None) -> TransformerModel:
    """Assemble a :class:`TransformerModel` from a sniff report, placing weights on ``backend``."""
    be = get_backend(backend, dtype)
    r, g = report, report.globals
    for w in r.warnings:
        if "not built" in w:
            raise ConfigError(w)
    model = TransformerModel(r, be)
    ld = _Loader(r, be)
    d = int(r["hidden_size"])
    model.embed = _built(Embedding(r["vocab_size"], d), (1,), be)
    ld.put(model.embed, "weight", ld.get(g["embed"]), f"{g['embed']}.weight")
    if "positions" in g:
        model.positions = _built(Embedding(r["max_positions"], d), (1,), be)
        ld.put(model.positions, "weight", ld.get(g["positions"]), f"{g['positions']}.weight")
    if "token_types" in g:
        model.token_types = _built(Embedding(r["token_types"], d), (1,), be)
        ld.put(model.token_types, "weight", ld.get(g["token_types"]),
               f"{g['token_types']}.weight")
    model.embed_norm = _norm_from(ld, g.get("embed_norm"))
    for i, blk in enumerate(r.blocks):
        biases = r.biases[i]
        if r["residual"] == "post_norm":
            n1, n2 = _norm_from(ld, blk["attn_post_norm"]), _norm_from(ld, blk["mlp_post_norm"])
            post1 = post2 = None
        elif r["residual"] == "sandwich":
            n1, n2 = _norm_from(ld, blk["attn_norm"]), _norm_from(ld, blk["pre_ffn_norm"])
            post1, post2 = _norm_from(ld, blk["mlp_norm"]), _norm_from(ld, blk["mlp_post_norm"])
        else:
            n1, n2 = _norm_from(ld, blk["attn_norm"]), _norm_from(ld, blk.get("mlp_norm"))
            post1 = post2 = None
        model.blocks.append(Block(n1, _attention(ld, blk, biases), n2,
                                  _mlp(ld, blk, bool(r["mlp_bias"]), r.experts[i]),
                                  post1, post2))
    model.final_norm = _norm_from(ld, g.get("final_norm"))
    if r["kind"] == "decoder":
        head = _built(Dense(r["vocab_size"], bias=bool(r["head_bias"])), (d,), be)
        if r["tied_head"]:
            head.params["weight"] = model.embed.params["weight"]
        else:
            ld.put(head, "weight", ld.get(g["head"]), f"{g['head']}.weight")
        if r["head_bias"]:
            ld.put(head, "bias", ld.get(g["head"], "bias"), f"{g['head']}.bias")
        model.head = head
    return model


def load_model(path: str | Path | SniffReport, backend: Backend | str | None = None,
               dtype: str | None = None, config: dict | str | Path | None = None
               ) -> TransformerModel:
    """Sniff ``path`` (safetensors file, shard index, GGUF or folder) and build the model.

    Args:
        path: the weights, or a :class:`SniffReport` from :func:`~loomx.models.sniff`.
        backend: where the weights go (default: the current backend).
        dtype: float dtype of weights and activations (default: the backend's, float32).
        config: a ``config.json`` dict or path overriding the one next to the weights.

    Example::

        model = loomx.load_model("SmolLM2/", backend="numpy")
        print(model.report)
    """
    report = path if isinstance(path, SniffReport) else sniff(path, config=config)
    return build_model(report, backend, dtype)
