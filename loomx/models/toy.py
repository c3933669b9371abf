"""A tiny random Llama-style checkpoint, written offline, for tours and examples.

The folder holds ``model.safetensors`` with Hugging Face tensor names and a ``config.json``,
exactly what the sniffer meets in real checkpoints, so the whole loader path (sniff, build,
generate) can be shown without downloading anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..backends import get_backend


def write_toy_llama(folder: str | os.PathLike, vocab: int = 128, hidden: int = 64,
                    layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 128,
                    seed: int = 0) -> Path:
    """Write a random Llama-shaped checkpoint (GQA, RoPE, RMSNorm, SwiGLU, untied head).

    Returns the folder. Weights are N(0, 0.02²) with unit norms, in float32.
    """
    from ..io.safetensors import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    host = get_backend("numpy")
    rng = host.random(seed)
    hd = hidden // heads

    def w(*shape):
        return host.to_host(rng.normal(shape, std=0.02))

    def ones(n):
        return host.to_host(host.ones((n,)))

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": ones(hidden),
               "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": ones(hidden),
            p + "self_attn.q_proj.weight": w(heads * hd, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * hd, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * hd),
            p + "post_attention_layernorm.weight": ones(hidden),
            p + "mlp.gate_proj.weight": w(ffn, hidden),
            p + "mlp.up_proj.weight": w(ffn, hidden),
            p + "mlp.down_proj.weight": w(hidden, ffn),
        })
    save_safetensors(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "intermediate_size": ffn, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 256, "tie_word_embeddings": False,
              "hidden_act": "silu", "eos_token_id": vocab - 1, "bos_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
