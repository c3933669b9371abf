"""``loomx generate MODEL --prompt "..."``: stream generated text to the terminal."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder, .safetensors file, shard index or .gguf")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--backend", default=None, help="numpy (default), torch, cupy, ...")
    parser.add_argument("--dtype", default=None, help="float32 (default), float64, ...")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (default: next to the weights, or the GGUF vocab)")
    parser.add_argument("--no-cache", action="store_true", help="decode without a KV cache")


def run(args: argparse.Namespace) -> int:
    from ..models import load_model, load_tokenizer, stream_text

    model = load_model(args.model, backend=args.backend, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or model)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in stream_text(model, args.prompt, args.max_new_tokens, tokenizer=tokenizer,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, use_cache=not args.no_cache):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
