"""Training checkpoints: one safetensors file holding host arrays plus JSON metadata.

Layout: every tensor under its name (``weights/<param>``, ``optim/<param>/<buffer>``, ...);
the metadata entry ``loomx_checkpoint`` holds a JSON document (step, epoch, optimizer
hyperparameters, schedule config, random-generator state, history...).

Writes are atomic (:func:`loomx.io.loomx_format.atomic_write_bytes`): the file is written next
to its destination under a temporary name, flushed to disk, then moved into place with
``os.replace``; a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from .loomx_format import atomic_write_bytes

META_KEY = "loomx_checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Any], meta: dict) -> Path:
    """Atomically write host arrays ``tensors`` and JSON-serialisable ``meta`` to ``path``."""
    from safetensors.numpy import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    document = json.dumps({"version": FORMAT_VERSION, **meta})
    blob = save(arrays, metadata={META_KEY: document})
    atomic_write_bytes(path, blob)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, meta)``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"no checkpoint at {path}")
    data = path.read_bytes()
    try:
        tensors = load(data)
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
    except (SafetensorError, ValueError, OSError) as exc:
        raise FormatError(f"{path} is not a readable checkpoint: {exc}") from exc
    raw = (header.get("__metadata__") or {}).get(META_KEY)
    if raw is None:
        raise FormatError(f"{path} is a safetensors file but not a loomx checkpoint "
                          f"(no {META_KEY!r} metadata)")
    meta = json.loads(raw)
    if meta.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: checkpoint format version {meta.get('version')} "
                          f"is not supported (expected {FORMAT_VERSION})")
    return tensors, meta
