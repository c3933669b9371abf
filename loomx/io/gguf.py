"""GGUF reader: llama.cpp checkpoints as named host tensors in PyTorch layout.

Built on the ``gguf`` package (the file is memory-mapped by ``gguf.GGUFReader``). What this module
adds:

- **names**: llama.cpp tensor names (``blk.3.attn_q.weight``) are translated into the Hugging
  Face scheme (``model.layers.3.self_attn.q_proj.weight``) so one sniffer handles both formats;
  a name without a translation is kept as it is (and the sniffer lists it as unrecognised);
- **layout**: GGUF stores dimensions innermost-first; tensors come back as ``[out, in]``;
- **dequantisation**: quantised tensors (Q4_0, Q4_1, Q8_0, K-quants, ...) are expanded to
  float32 with ``gguf.quants.dequantize`` when read, one tensor at a time;
- **RoPE row order**: for llama-family files, llama.cpp's converter permutes the rows of Q and
  K into interleaved-pair RoPE order; reading undoes it (reshape ``(heads, hd/2, 2, in)``, swap
  axes 1 and 2) so the weights match the original checkpoint and the half-split RoPE;
- **metadata**: :meth:`GGUFFile.config` maps GGUF keys onto ``config.json`` names.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any

import numpy as np

from ..errors import FormatError
from .safetensors import ClosesOnExit

#: ``tokenizer.ggml.pre`` values split by the GPT-2 pattern of byte-level BPE (SmolLM's
#: tokenizer also splits digits one by one, which its vocabulary, without multi-digit
#: tokens, makes the same)
_GPT2_PRE = {"default", "gpt2", "smollm"}
#: the split patterns of tokenizers whose pre-splitting is not GPT-2's (as in their
#: tokenizer.json files): Llama 3 groups up to three digits, Qwen2 splits every digit
_PRE_PATTERNS = {
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}

#: Architectures whose Q/K rows llama.cpp permutes on conversion.
PERMUTED_ARCHS = ("llama", "mistral", "granite", "granitemoe")

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")

#: GGUF metadata key (after ``{arch}.``) → config.json key
_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.layer_norm_epsilon": "layer_norm_eps",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}

#: (architecture prefix, activation): GGUF has no activation key; others get the sniffer's default
_ARCH_ACTIVATIONS = (("gemma", "gelu_pytorch_tanh"),)


def hf_name(name: str) -> str:
    """The Hugging Face name of a llama.cpp tensor name (unchanged when unknown)."""
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL_RE.match(name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return name


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: ``[heads·hd, in]`` (or ``[heads·hd]``) rows."""
    rows = w.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise FormatError(f"cannot undo the RoPE row order of a tensor with {rows} rows for "
                          f"{n_heads} heads (rows must split into heads of even size)")
    hd = rows // n_heads
    rest = w.shape[1:]
    out = w.reshape(n_heads, hd // 2, 2, *rest).swapaxes(1, 2)
    return np.ascontiguousarray(out.reshape(rows, *rest))


def _field_value(field: Any) -> Any:
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - exotic field types are reported as missing
        return None


class GGUFFile(ClosesOnExit):
    """A GGUF checkpoint: tensors by Hugging Face name, dequantised to float32 on read."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise FormatError(f"{self.path}: no such file")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # noqa: BLE001 - the gguf package raises many kinds
            raise FormatError(f"{self.path}: not a readable GGUF file ({exc})") from None
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                       "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
                continue
            self.metadata[key] = _field_value(field)
        self.architecture = str(self.metadata.get("general.architecture", ""))
        #: things in the file that loomx cannot honour (filled by :meth:`config`)
        self.warnings: list[str] = []
        self._tensors = {}
        for t in self._reader.tensors:
            self._tensors[hf_name(t.name)] = t

    # ------------------------------------------------------------------ inspection
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _get(self, name: str):
        if name not in self._tensors:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape in PyTorch order (``[out, in]`` for matrices)."""
        return tuple(int(d) for d in reversed(self._get(name).shape.tolist()))

    def dtype(self, name: str) -> str:
        """The GGUF tensor type name (``"F32"``, ``"Q4_1"``, ``"Q8_0"`` ...)."""
        return self._get(name).tensor_type.name

    def source_name(self, name: str) -> str:
        """The tensor's name inside the GGUF file."""
        return self._get(name).name

    def config(self) -> dict[str, Any]:
        """GGUF metadata translated to ``config.json`` keys (only keys that are present).

        GGUF has no activation key: ``hidden_act`` follows the architecture (``gemma*``:
        ``gelu_pytorch_tanh``, as Gemma's own config says; others are left to the sniffer's
        default). ``{arch}.rope.scaling.*`` becomes ``rope_scaling`` (``linear`` and ``yarn``
        with their parameters; other types are passed on by name and reported as unsupported).
        What cannot be honoured is listed in :attr:`warnings`.
        """
        arch = self.architecture
        md = self.metadata
        self.warnings = []
        cfg: dict[str, Any] = {"model_type": arch}
        for key, hf in _CONFIG_KEYS.items():
            v = md.get(f"{arch}.{key}")
            if v is not None:
                cfg[hf] = v
        if "vocab_size" not in cfg and "tokenizer.ggml.tokens" in self._reader.fields:
            cfg["vocab_size"] = len(self._reader.fields["tokenizer.ggml.tokens"].data)
        for key, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
            v = md.get(f"tokenizer.ggml.{key}")
            if v is not None:
                cfg[hf] = int(v)
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        act = next((a for prefix, a in _ARCH_ACTIVATIONS if arch.startswith(prefix)), None)
        if act is not None:
            cfg["hidden_act"] = act
        rot = md.get(f"{arch}.rope.dimension_count")
        heads = cfg.get("num_attention_heads")
        # head counts may be per-layer arrays in some files: no inference from those
        hd = cfg.get("head_dim") or (
            cfg["hidden_size"] // heads if isinstance(heads, int) and heads > 0
            and isinstance(cfg.get("hidden_size"), int) else None)
        if isinstance(rot, (int, np.integer)) and hd and 0 < int(rot) < int(hd):
            cfg["partial_rotary_factor"] = int(rot) / int(hd)
        scaling = self._rope_scaling()
        if scaling is not None:
            cfg["rope_scaling"] = scaling
        if "rope_freqs.weight" in self._tensors:
            self.warnings.append(
                "GGUF tensor 'rope_freqs.weight' (per-dimension RoPE frequency factors, which "
                "llama.cpp writes for Llama 3.1-style rope scaling) is not applied: positions "
                "past the original context length differ from llama.cpp; load the original "
                "checkpoint with its config.json for exact long-context results")
        return cfg

    def _rope_scaling(self) -> dict[str, Any] | None:
        """``{arch}.rope.scaling.*`` (or the older ``rope.scale_linear``) as ``rope_scaling``."""
        md, pre = self.metadata, f"{self.architecture}.rope."
        kind = md.get(pre + "scaling.type")
        factor = md.get(pre + "scaling.factor")
        if kind is None and md.get(pre + "scale_linear") not in (None, 1.0):
            kind, factor = "linear", md.get(pre + "scale_linear")
        if kind is None or str(kind) == "none":
            return None
        kind = str(kind)
        out: dict[str, Any] = {"type": kind}
        if factor is not None:
            out["factor"] = float(factor)
        if kind == "yarn":
            orig = md.get(pre + "scaling.original_context_length")
            if orig is not None:
                out["original_max_position_embeddings"] = int(orig)
            for key, hf in (("scaling.yarn_beta_fast", "beta_fast"),
                            ("scaling.yarn_beta_slow", "beta_slow")):
                if md.get(pre + key) is not None:
                    out[hf] = float(md[pre + key])
            extra = [k for k in ("scaling.attn_factor", "scaling.yarn_attn_factor",
                                 "scaling.yarn_ext_factor", "scaling.yarn_log_multiplier")
                     if md.get(pre + k) is not None]
            if extra:
                self.warnings.append(
                    f"yarn parameters {', '.join(pre + k for k in extra)} are not applied (the "
                    "attention factor is the default 0.1·ln(factor) + 1)")
        return out

    def _heads(self, key: str = "attention.head_count") -> int:
        """``{arch}.attention.head_count`` (or another key) as an int; FormatError if absent."""
        full = f"{self.architecture}.{key}"
        v = self.metadata.get(full)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or int(v) <= 0:
            raise FormatError(f"{self.path}: GGUF metadata key {full!r} is "
                              f"{'missing' if v is None else f'not a positive integer ({v!r})'}"
                              "; it is needed to read this file's attention weights")
        return int(v)

    # ------------------------------------------------------------------ data
    def host(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float32 (or stored-dtype for F16/F32) host array."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self._get(name)
        shape = self.shape(name)
        try:
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                                 GGMLQuantizationType.F64, GGMLQuantizationType.I32,
                                 GGMLQuantizationType.I64, GGMLQuantizationType.I8,
                                 GGMLQuantizationType.I16):
                arr = np.asarray(t.data).reshape(shape)
            else:
                arr = dequantize(t.data, t.tensor_type).reshape(shape)
        except (ValueError, NotImplementedError) as exc:
            raise FormatError(f"{self.path}: cannot decode tensor {t.name!r} of type "
                              f"{t.tensor_type.name} ({exc})") from None
        return self._unpermute(name, arr)

    def _unpermute(self, name: str, arr: np.ndarray) -> np.ndarray:
        if self.architecture not in PERMUTED_ARCHS:
            return arr
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            heads = self._heads()
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            full = f"{self.architecture}.attention.head_count_kv"
            heads = self._heads("attention.head_count_kv" if self.metadata.get(full) is not None
                                else "attention.head_count")
        else:
            return arr
        try:
            return unpermute_rope_rows(arr, heads)
        except FormatError as exc:
            raise FormatError(f"{self.path}: tensor {self.source_name(name)!r} "
                              f"({name}, shape {list(arr.shape)}): {exc}") from None

    def load(self, name: str, backend: Any = None, dtype: Any = None):
        """Tensor ``name`` placed on ``backend`` in ``dtype`` (default: its float dtype)."""
        from ..backends import get_backend
        from .safetensors import place

        return place(self.host(name), get_backend(backend), dtype)

    # ------------------------------------------------------------------ tokenizer
    def _pre_tokenizer(self, pre_tokenizers):
        """How text is split before BPE, from ``tokenizer.ggml.pre`` (llama.cpp's names): the
        GPT-2 pattern, or the pattern of the Llama 3 or Qwen2 tokenizers; an unknown name
        warns and falls back to GPT-2's (token ids may then differ from the original's)."""
        from tokenizers import Regex

        pre = self.metadata.get("tokenizer.ggml.pre") or "default"
        pattern = _PRE_PATTERNS.get(pre)
        if pattern is None:
            if pre not in _GPT2_PRE:
                warnings.warn(f"{self.path}: tokenizer pre-splitting {pre!r} is not known here; "
                              "splitting as GPT-2 does, so token ids may differ from the "
                              "original tokenizer's (pass its tokenizer.json to be exact)",
                              stacklevel=3)
            return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    def tokenizer(self):
        """A ``tokenizers.Tokenizer`` built from the GGUF vocabulary (byte-level BPE only)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        fields = self._reader.fields
        kind = self.metadata.get("tokenizer.ggml.model")
        if kind != "gpt2" or "tokenizer.ggml.tokens" not in fields:
            raise FormatError(f"{self.path}: building a tokenizer from GGUF supports the "
                              f"byte-level BPE ('gpt2') vocabulary only, found {kind!r}; "
                              "pass a tokenizer.json instead")
        tokens = [str(s) for s in fields["tokenizer.ggml.tokens"].contents()]
        merges = ([tuple(str(m).split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
                  if "tokenizer.ggml.merges" in fields else [])
        types = (fields["tokenizer.ggml.token_type"].contents()
                 if "tokenizer.ggml.token_type" in fields else [1] * len(tokens))
        vocab = {tok: i for i, tok in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = self._pre_tokenizer(pre_tokenizers)
        tok.decoder = decoders.ByteLevel()
        special = [AddedToken(t, special=True, normalized=False)
                   for t, kind in zip(tokens, types) if int(kind) == 3]
        tok.add_special_tokens(special)
        return tok

    def to_safetensors(self, out_dir: str | os.PathLike) -> str:
        """Write the dequantised weights as a Hugging Face folder; returns its path.

        Creates ``model.safetensors`` (float32, streamed one tensor at a time, so memory stays
        at one tensor), ``config.json`` (from the GGUF metadata) and, for byte-level BPE
        vocabularies, ``tokenizer.json``. Gemma norm weights are stored as ``γ`` again
        (llama.cpp stores ``1 + γ``), so the folder loads like the original checkpoint.
        Every file is written to a temporary name and moved into place when complete: a
        failure (for example a tensor that cannot be decoded) leaves existing files intact.
        """
        import json

        from .loomx_format import atomic_write, atomic_write_bytes
        from .safetensors import write_array

        out = os.fspath(out_dir)
        cfg = self.config()
        arch = cfg.get("model_type") or "llama"
        if "head_dim" not in cfg:
            if "hidden_size" not in cfg:
                raise FormatError(f"{self.path}: GGUF metadata key "
                                  f"'{self.architecture}.embedding_length' is missing")
            cfg["head_dim"] = cfg["hidden_size"] // self._heads()
        cfg["architectures"] = [f"{arch.capitalize()}ForCausalLM"]
        cfg.setdefault("hidden_act", "silu")
        names = self.names()
        header, offset = {}, 0
        for name in names:
            shape = self.shape(name)
            nbytes = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        gemma = self.architecture.startswith("gemma")

        def write(fh) -> None:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for name in names:
                arr = np.asarray(self.host(name), dtype="<f4")
                if gemma and name.endswith("norm.weight"):
                    arr = arr - np.float32(1.0)
                write_array(fh, arr)

        os.makedirs(out, exist_ok=True)
        atomic_write(os.path.join(out, "model.safetensors"), write)
        atomic_write_bytes(os.path.join(out, "config.json"),
                           json.dumps(cfg, indent=2).encode("utf-8"))
        try:
            tok = self.tokenizer()
        except FormatError:
            tok = None
        if tok is not None:
            atomic_write_bytes(os.path.join(out, "tokenizer.json"),
                               tok.to_str().encode("utf-8"))
        return out

    def close(self) -> None:
        """Drop the reader and its memory map (views taken earlier keep it alive); names,
        shapes and the config stay readable only until then."""
        self._reader = None
        self._tensors = {}

    def __repr__(self) -> str:
        state = f"{len(self._tensors)} tensors" if self._reader is not None else "closed"
        return f"GGUFFile({self.path!r}, {self.architecture}, {state})"
