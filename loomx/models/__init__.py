"""loomx.models: the shape-sniffing loader, generic transformer assembly and generation.

- :func:`sniff` reads a checkpoint's tensor names and shapes (plus ``config.json`` or GGUF
  metadata) and reports the architecture with the source of every hyperparameter;
- :func:`load_model` turns that report into a runnable :class:`TransformerModel` made of generic
  loomx layers;
- :func:`generate` / :func:`stream` produce tokens from it (greedy or sampled, KV cache).

The functions are bound here after their modules load, so ``loomx.models.sniff`` is the
function (the module stays reachable as ``sys.modules["loomx.models.sniff"]``).
"""

from __future__ import annotations

from .build import TransformerModel, build_model, load_model
from .generate import Generation, generate, load_tokenizer, stream, stream_text
from .sniff import Hyper, SniffReport, sniff

__all__ = ["Generation", "Hyper", "SniffReport", "TransformerModel", "build_model", "generate",
           "load_model", "load_tokenizer", "sniff", "stream", "stream_text"]
