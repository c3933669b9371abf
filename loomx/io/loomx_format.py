"""Host-side file code of the loomx format: one ``.safetensors`` file, config in the metadata.

Layout: a standard safetensors file (8-byte little-endian header length, JSON header, raw
little-endian tensor data). The header's ``__metadata__`` holds string values:

- ``"format"``: ``"loomx"``; ``"format_version"``: ``"1"``;
- ``"config"``: the network config JSON (``Network.get_config()``).

Writes are atomic: the bytes go to a temporary file in the destination folder, are flushed
and fsynced, then ``os.replace`` puts them in place, so a crash never leaves a half-written
model under the final name. Reads validate the whole header (size, JSON, dtypes, shapes,
offsets inside the file, no overlaps) before any tensor is returned, and map the file into
memory instead of reading it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import struct
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from ..errors import FormatError

FORMAT_NAME = "loomx"
FORMAT_VERSION = "1"
MAX_HEADER = 100 * 1024 * 1024

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def np_dtype(name: str) -> np.dtype:
    """The numpy dtype called ``name`` (``"bfloat16"`` through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _new_file_mode(path: str) -> int:
    """Permission bits for ``path``: the existing file's, else what ``open()`` would give."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return -1


def _open_temp(folder: str) -> tuple[int, str]:
    """Create a fresh temporary file in ``folder`` with mode ``0o666`` less the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}.part")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file in {folder}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write(fh)`` on a temporary file next to ``path``, fsync it, then rename it.

    The temporary file gets the permission bits of the file it replaces (a new file gets
    ``0o666`` less the umask, as ``open()`` would give). If ``write`` raises, the temporary
    file is removed and an existing file at ``path`` is left untouched. A symlink at ``path``
    stays a link: the file it points at is the one replaced.
    """
    # through a symlink (a Hugging Face cache's snapshot -> blob) to the file it points at
    path = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(path)
    mode = _new_file_mode(path)
    try:
        fd, tmp = _open_temp(folder)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if mode >= 0 and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def write_loomx(path: str | os.PathLike, tensors: dict[str, np.ndarray], config: dict) -> None:
    """Save host arrays and the network ``config`` as one safetensors file, atomically.

    Arrays keep their shapes (0-d included); data is streamed to a temporary file and moved
    into place, so a failure leaves an existing file at ``path`` intact.
    """
    from .safetensors import save_safetensors

    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "config": json.dumps(config, sort_keys=True)}
    save_safetensors(tensors, path, metadata=metadata)


def _fail(path: str, what: str) -> FormatError:
    return FormatError(f"{path}: {what}; the file is not a valid loomx model (re-save it with "
                       "loomx.save, or check that the download/copy is complete)")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(path: str, blob: bytes | mmap.mmap) -> tuple[dict, dict, int]:
    """Parse and validate a safetensors header; returns ``(entries, metadata, data_start)``."""
    size = len(blob)
    if size < 8:
        raise _fail(path, f"only {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER or 8 + n > size:
        raise _fail(path, f"header length {n} does not fit a file of {size} bytes")
    try:
        header = json.loads(bytes(blob[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(path, f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(path, "'__metadata__' must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"tensor {name!r} has a malformed entry {str(e)[:200]}")
        if not isinstance(e["dtype"], str) or e["dtype"] not in _DTYPES:
            raise _fail(path, f"tensor {name!r} has unknown dtype {str(e['dtype'])[:50]}")
        shape, offs = e["shape"], e["data_offsets"]
        if (not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(_is_int(o) for o in offs)):
            raise _fail(path, f"tensor {name!r} has a bad shape or offsets")
        begin, end = offs
        want = math.prod(shape) * np_dtype(_DTYPES[e["dtype"]]).itemsize
        if not 0 <= begin <= end <= data_len or end - begin != want:
            raise _fail(path, f"tensor {name!r} ({e['dtype']} {shape}) claims bytes "
                              f"[{begin}, {end}) but needs {want} bytes within {data_len}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, e1, a), (b2, _, b) in zip(spans, spans[1:]):
        if b2 < e1:
            raise _fail(path, f"tensors {a!r} and {b!r} overlap")
    return header, metadata, data_start


def read_loomx(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a loomx file: ``(tensors, config)``; every check passes before anything returns.

    Raises:
        FormatError: missing file, bad header, not a loomx file, bad config JSON.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise FormatError(f"cannot open {path}: {exc.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    header, metadata, start = read_header(path, blob)
    if metadata.get("format") != FORMAT_NAME:
        raise _fail(path, "it is a safetensors file without loomx metadata (a raw checkpoint "
                          "goes through loomx.sniff / loomx.load_model instead)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise _fail(path, f"format version {metadata.get('format_version')!r} is not "
                          f"supported (this loomx reads version {FORMAT_VERSION})")
    raw = metadata.get("config")
    if not isinstance(raw, str):
        raise _fail(path, "the config metadata is missing")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _fail(path, f"the config metadata is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _fail(path, f"the config metadata must be a JSON object, got "
                          f"{type(config).__name__}")
    tensors = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        dt = np_dtype(_DTYPES[e["dtype"]]).newbyteorder("<")
        arr = np.frombuffer(blob, dtype=dt, count=(end - begin) // dt.itemsize,
                            offset=start + begin) if end > begin else np.zeros(0, dt)
        tensors[name] = arr.reshape(e["shape"])
    return tensors, config
