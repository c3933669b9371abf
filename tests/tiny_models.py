"""Tiny random checkpoints written by ``transformers`` (offline, from config objects).

``tiny_model(family)`` builds the model once per process in a temporary folder with
``save_pretrained`` and returns ``(folder, torch_model)``. Weights are drawn with a larger
initialiser range than the default so that logits differ visibly between positions and tokens
(a wrong RoPE, norm or layout then shows up far above the tolerance).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 160
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: families loomx is checked on, plus two built from the same parts (phi, starcoder2)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_neox", "bert",
            "phi", "starcoder2")

#: mixture-of-experts decoders (4 experts, top-2; Qwen2-MoE with a gated shared expert)
MOE_FAMILIES = ("mixtral", "qwen2_moe")

#: Llama variants with RoPE scaling (``tiny_model("llama_yarn")`` etc.): head_dim 16 so that
#: llama3's three frequency bands and yarn's ramp are all exercised, and a short original
#: context (32) so that test sequences run past it
ROPE_SCALED = {
    "llama_linear": {"rope_type": "linear", "factor": 4.0},
    "llama_llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "llama_yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                   "beta_fast": 32.0, "beta_slow": 1.0},
}


def _config(family: str):
    import transformers as T

    c = dict(COMMON)
    if family in ROPE_SCALED:
        c.update(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 max_position_embeddings=128)
        return T.LlamaConfig(**c, head_dim=16, rope_parameters={
            "rope_theta": 10000.0, **ROPE_SCALED[family]})
    if family == "llama":
        return T.LlamaConfig(**c, rope_theta=500000.0)
    if family == "mistral":
        return T.MistralConfig(**c, sliding_window=None)
    if family == "qwen2":
        return T.Qwen2Config(**c, tie_word_embeddings=True)
    if family == "qwen3":
        return T.Qwen3Config(**c, head_dim=16)
    if family == "gemma":
        return T.GemmaConfig(**c, head_dim=16)
    if family == "phi3":
        return T.Phi3Config(**c)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        c.pop("num_key_value_heads")
        return T.GPTNeoXConfig(**c, rotary_pct=0.5)
    if family == "bert":
        c.pop("num_key_value_heads")
        return T.BertConfig(**c)
    if family == "phi":
        c.pop("num_key_value_heads")
        return T.PhiConfig(**c, partial_rotary_factor=0.5)
    if family == "mixtral":
        return T.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2,
                               sliding_window=None)
    if family == "qwen2_moe":
        return T.Qwen2MoeConfig(**c, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=48, shared_expert_intermediate_size=40,
                                norm_topk_prob=False)
    if family == "starcoder2":
        return T.Starcoder2Config(**c, sliding_window=None)
    raise KeyError(family)


@functools.cache
def _root() -> Path:
    return Path(tempfile.mkdtemp(prefix="loomx-tiny-"))


@functools.cache
def tiny_model(family: str, variant: str = "f32"):
    """``(folder, torch_model)`` for ``family``; ``variant`` is f32, f16, bf16 or sharded."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = _config(family)
    if family == "bert":
        model = T.BertModel(cfg, add_pooling_layer=True)
    else:
        model = T.AutoModelForCausalLM.from_config(cfg)
    model.eval()
    folder = _root() / f"{family}-{variant}"
    if variant == "f32":
        model.save_pretrained(folder)
    elif variant == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
    else:
        base, _ = tiny_model(family, "f32")
        dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[variant]
        kind = T.AutoModel if family == "bert" else T.AutoModelForCausalLM
        kind.from_pretrained(base, dtype=dtype).save_pretrained(folder)
        model = kind.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model


def reference_logits(family: str, ids: np.ndarray, variant: str = "f32") -> np.ndarray:
    """transformers' output for ``ids`` ``[B, T]``: logits, or hidden states for encoders."""
    import torch

    _, model = tiny_model(family, variant)
    with torch.no_grad():
        out = model(torch.tensor(ids))
    return (out.last_hidden_state if family == "bert" else out.logits).numpy()


def reference_greedy(family: str, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of ``prompt`` (no stop token)."""
    import torch

    _, model = tiny_model(family)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def cached_logits(model, ids: np.ndarray, prefix: int, max_len: int) -> np.ndarray:
    """loomx logits for ``ids`` computed with a KV cache: the first ``prefix`` tokens at once,
    then one token at a time."""
    cache = model.new_cache(ids.shape[0], max_len)
    parts = [model.backend.to_host(model(model.ids(ids[:, :prefix]), cache))]
    for t in range(prefix, ids.shape[1]):
        parts.append(model.backend.to_host(model(model.ids(ids[:, t:t + 1]), cache)))
    assert cache[0].length == ids.shape[1]
    return np.concatenate(parts, axis=1)


def check_cached_logits_on(backend, family: str, ids: np.ndarray) -> None:
    """``family`` loaded on ``backend``: a 6-token prompt into the KV cache, then the 7th token,
    against transformers' logits (values, dtype and device checked by ``assert_close``)."""
    import loomx
    from tests.conftest import assert_close

    model = loomx.load_model(tiny_model(family)[0], backend=backend)
    cache = model.new_cache(ids.shape[0], 12)
    first = model(model.ids(ids[:, :6]), cache)
    nxt = model(model.ids(ids[:, 6:7]), cache)
    ref = reference_logits(family, ids)
    assert_close(first, ref[:, :6], backend, rtol=0, atol=1e-4)
    assert_close(nxt, ref[:, 6:7], backend, rtol=0, atol=1e-4)


class LoadedModels:
    """loomx models loaded once per (family, variant, backend)."""

    def __init__(self):
        self._cache: dict = {}

    def __call__(self, family: str, variant: str = "f32", backend: str = "numpy"):
        import loomx

        key = (family, variant, backend)
        if key not in self._cache:
            self._cache[key] = loomx.load_model(tiny_model(family, variant)[0], backend=backend)
        return self._cache[key]
