"""Training checkpoints: one safetensors file holding host arrays plus JSON metadata.

Layout: every tensor under its name (``weights/<param>``, ``optim/<param>/<buffer>``, ...);
the metadata entry ``loomx_checkpoint`` holds a JSON document (step, epoch, optimizer
hyperparameters, schedule config, random-generator state, history...).

Writes are atomic (:func:`loomx.io.loomx_format.atomic_write`): the file is streamed next to
its destination under a temporary name, flushed to disk, then moved into place with
``os.replace``; a crash mid-write leaves the previous checkpoint intact. Reads go through the
validating reader of :mod:`loomx.io.safetensors`, so every dtype it knows (bfloat16 included)
round-trips, and any unreadable file raises :class:`~loomx.errors.FormatError` naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError
from .safetensors import SafetensorsFile, save_safetensors

META_KEY = "loomx_checkpoint"
FORMAT_VERSION = 1
#: keys of the metadata document that belong to the format, not to the caller
RESERVED_KEYS = ("version",)


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Any], meta: dict) -> Path:
    """Atomically write host arrays ``tensors`` and JSON-serialisable ``meta`` to ``path``.

    Arrays keep their shapes (0-d included) and dtypes. ``meta`` may not use the reserved key
    ``"version"`` (:class:`ConfigError`): the format records its own version there.
    """
    path = Path(path)
    if not isinstance(meta, dict):
        raise ConfigError(f"checkpoint metadata must be a dict, got {type(meta).__name__}")
    clash = [k for k in RESERVED_KEYS if k in meta]
    if clash:
        raise ConfigError(f"checkpoint metadata key(s) {clash} are reserved by the checkpoint "
                          "format; rename them")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    document = json.dumps({"version": FORMAT_VERSION, **meta})
    save_safetensors(arrays, path, metadata={META_KEY: document})
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(tensors, meta)``.

    Tensors come back as writable host arrays in their stored dtypes and shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"no checkpoint at {path}")
    try:
        f = SafetensorsFile(path)
    except FormatError as exc:
        raise FormatError(f"{path} is not a readable checkpoint: {exc}") from None
    with f:  # closed on every path below, errors included
        return _read_checkpoint(f, path)


def _read_checkpoint(f: SafetensorsFile, path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors and metadata of the open checkpoint ``f`` (see :func:`load_checkpoint`)."""
    raw = f.metadata.get(META_KEY)
    if raw is None:
        raise FormatError(f"{path} is a safetensors file but not a loomx checkpoint "
                          f"(no {META_KEY!r} metadata)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: the checkpoint metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: the checkpoint metadata must be a JSON object, got "
                          f"{type(meta).__name__}")
    if meta.get("version") != FORMAT_VERSION:
        raise FormatError(f"{path}: checkpoint format version {meta.get('version')!r} "
                          f"is not supported (expected {FORMAT_VERSION})")
    try:
        tensors = {name: np.array(f.host(name)) for name in f.names()}
    except FormatError as exc:
        raise FormatError(f"{path} is not a readable checkpoint: {exc}") from None
    return tensors, meta
