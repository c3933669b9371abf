"""A validating, memory-mapped safetensors reader (host side, numpy).

File layout: an 8-byte little-endian ``u64`` header length ``N``, ``N`` bytes of UTF-8 JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the
data section; offsets are relative to the start of the data section.

Every check that protects against a corrupt or hostile file happens when the header is parsed:
header length inside the file, valid JSON object, known dtype, non-negative integer shape,
offsets inside the data section, ``end - begin == numel * itemsize``, no two tensors overlapping.
Any violation raises :class:`~loomx.errors.FormatError` naming the file and the tensor.

Tensors are never copied while reading: :meth:`SafetensorsFile.host` returns a read-only numpy
view of a memory map, and :meth:`SafetensorsFile.load` places it on a backend (on the numpy
backend in the file's own dtype the placed array can still be that view). Sharded checkpoints
(``model.safetensors.index.json`` + shards) open through :func:`open_safetensors`.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError

#: Largest header accepted (the reference implementation uses the same cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"


def _ml(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


#: safetensors dtype tag → (numpy dtype factory, itemsize)
_DTYPES: dict[str, Any] = {
    "F64": lambda: np.dtype("<f8"),
    "F32": lambda: np.dtype("<f4"),
    "F16": lambda: np.dtype("<f2"),
    "BF16": lambda: _ml("bfloat16"),
    "F8_E4M3": lambda: _ml("float8_e4m3fn"),
    "F8_E5M2": lambda: _ml("float8_e5m2"),
    "I64": lambda: np.dtype("<i8"),
    "I32": lambda: np.dtype("<i4"),
    "I16": lambda: np.dtype("<i2"),
    "I8": lambda: np.dtype("i1"),
    "U64": lambda: np.dtype("<u8"),
    "U32": lambda: np.dtype("<u4"),
    "U16": lambda: np.dtype("<u2"),
    "U8": lambda: np.dtype("u1"),
    "BOOL": lambda: np.dtype("?"),
}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8,
             "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
SUPPORTED_DTYPES = tuple(_DTYPES)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``dtype`` tag, ``shape``, byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def parse_header(raw: bytes, data_size: int, path: str = "<bytes>"
                 ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a JSON header against a data section of ``data_size`` bytes.

    Returns ``(tensors, metadata)``. Raises :class:`FormatError` naming ``path`` and the
    offending tensor for anything a well-formed file cannot contain.
    """
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: the safetensors header is not valid UTF-8 JSON ({exc}); "
                          "the file is corrupt or not a safetensors file") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the safetensors header must be a JSON object, "
                          f"got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError(f"{path}: '__metadata__' must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(name, entry, data_size, path)
    _check_overlaps(tensors, path)
    return tensors, dict(metadata)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(name: str, entry: Any, data_size: int, path: str) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: entry must be an object with dtype, shape and "
                          f"data_offsets, got {type(entry).__name__}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise FormatError(f"{where}: entry lacks {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise FormatError(f"{where}: unknown dtype {dtype!r}; supported: "
                          f"{', '.join(SUPPORTED_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must be a list of non-negative integers, "
                          f"got {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)):
        raise FormatError(f"{where}: data_offsets must be two integers, got {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise FormatError(f"{where}: data_offsets [{begin}, {end}] lie outside the data "
                          f"section of {data_size} bytes (truncated or corrupt file)")
    info = TensorInfo(name, dtype, tuple(shape), begin, end)
    want = info.numel * _ITEMSIZE[dtype]
    if end - begin != want:
        raise FormatError(f"{where}: shape {list(shape)} of {dtype} needs {want} bytes but "
                          f"data_offsets span {end - begin}")
    return info


def _check_overlaps(tensors: dict[str, TensorInfo], path: str) -> None:
    spans = sorted((t for t in tensors.values() if t.end > t.begin), key=lambda t: t.begin)
    for prev, cur in zip(spans, spans[1:]):
        if cur.begin < prev.end:
            raise FormatError(
                f"{path}: tensor {cur.name!r} (bytes {cur.begin}-{cur.end}) overlaps tensor "
                f"{prev.name!r} (bytes {prev.begin}-{prev.end}); the file is corrupt")


class ClosesOnExit:
    """``with``-statement support for the tensor files: ``close()`` when the block ends."""

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class SafetensorsFile(ClosesOnExit):
    """One ``.safetensors`` file, header validated on open, data memory-mapped.

    Example::

        f = SafetensorsFile("model.safetensors")
        f.names()                 # tensor names in file order
        f.shape("lm_head.weight") # (V, D)
        w = f.load("lm_head.weight", backend="numpy", dtype="float32")
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                size = st.st_size
                head = fh.read(8)
                if len(head) < 8:
                    raise FormatError(f"{self.path}: file is {size} bytes, too short for a "
                                      "safetensors header (needs at least 8)")
                n = int.from_bytes(head, "little")
                if n > size - 8 or n > MAX_HEADER_BYTES:
                    raise FormatError(f"{self.path}: header length {n} runs past the end of "
                                      f"the {size}-byte file (truncated or not safetensors)")
                raw = fh.read(n)
                if len(raw) != n:
                    raise FormatError(f"{self.path}: the file shrank while its header was read")
                # The map comes from the same open file as the header, so replacing the path
                # afterwards cannot pair this header with another file's bytes.
                self._map: mmap.mmap | None = mmap.mmap(fh.fileno(), 0,
                                                        access=mmap.ACCESS_READ)
        except OSError as exc:
            raise FormatError(f"{self.path}: cannot read file ({exc})") from None
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self._data_start = 8 + n
        self.data_size = size - self._data_start
        self.tensors, self.metadata = parse_header(raw, self.data_size, self.path)

    # ------------------------------------------------------------------ inspection
    def names(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        return self.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype tag (``"F32"``, ``"BF16"``, ``"I64"`` ...)."""
        return self.info(name).dtype

    # ------------------------------------------------------------------ data
    def _buffer(self) -> mmap.mmap:
        if self._map is None:  # closed: map again, but only the very file that was opened
            try:
                with open(self.path, "rb") as fh:
                    st = os.fstat(fh.fileno())
                    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
                        raise FormatError(f"{self.path}: the file changed after it was opened "
                                          "(replaced or rewritten); open it again")
                    self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise FormatError(f"{self.path}: cannot read file ({exc})") from None
        return self._map

    def host(self, name: str) -> np.ndarray:
        """A read-only numpy view of tensor ``name`` in its stored dtype (no copy)."""
        t = self.info(name)
        buf = self._buffer()
        if buf.size() < self._data_start + t.end:
            raise FormatError(f"{self.path}: tensor {name!r} lies past the end of the file, "
                              "which shrank after it was opened")
        dt = _DTYPES[t.dtype]()
        arr = np.frombuffer(buf, dtype=dt, count=t.numel, offset=self._data_start + t.begin)
        return arr.reshape(t.shape)

    def load(self, name: str, backend: Any = None, dtype: Any = None):
        """Tensor ``name`` placed on ``backend`` (default: current) in ``dtype``.

        ``dtype`` defaults to the backend's float dtype for floating tensors and keeps integer
        and bool tensors in their own kind.
        """
        from ..backends import get_backend

        be = get_backend(backend)
        return place(self.host(name), be, dtype)

    def close(self) -> None:
        """Drop the memory map (views taken earlier keep it alive until they are freed).

        Reading after ``close`` maps the file again if it is still the file that was opened,
        and raises :class:`FormatError` if the path now holds another file.
        """
        self._map = None

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self.tensors)} tensors)"


def place(host: np.ndarray, backend: Any, dtype: Any = None):
    """Move a host array to ``backend`` in ``dtype`` (a name or an ``xp`` dtype).

    On the numpy backend a tensor already in ``dtype`` stays a read-only view of the file map
    (in-place writes raise; parameters are replaced, not mutated). Other libraries get their own
    writable copy, because some (PyTorch) would alias the read-only map without protection.
    """
    if not host.flags.writeable and getattr(backend, "library", "") != "numpy":
        host = np.array(host)
    if isinstance(dtype, str):
        dtype = getattr(backend.xp, dtype)
    if dtype is None and host.dtype.kind in "fV":
        dtype = backend.float_dtype
    if dtype is None:
        return backend.from_host(host)
    if host.dtype.kind == "V" or host.dtype.itemsize == 1 and host.dtype.kind == "f":
        host = host.astype(np.float32)
    return backend.from_host(host, dtype=dtype)


class ShardedSafetensors(ClosesOnExit):
    """A checkpoint split over several files, described by ``model.safetensors.index.json``.

    The index's ``weight_map`` maps tensor names to shard file names (relative to the index).
    Every shard is opened (and its header validated) on construction, and every mapped tensor
    must exist in its shard.
    """

    def __init__(self, index_path: str | os.PathLike):
        self.path = str(index_path)
        try:
            with open(self.path, encoding="utf-8") as fh:
                index = json.load(fh)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"{self.path}: cannot read the shard index ({exc})") from None
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise FormatError(f"{self.path}: the index needs a 'weight_map' object mapping "
                              "tensor names to shard file names")
        folder = Path(self.path).parent
        self.metadata = index.get("metadata") or {}
        self.shards: dict[str, SafetensorsFile] = {}
        for name, shard in wmap.items():
            if shard not in self.shards:
                if Path(shard).name != shard or shard in ("", ".", ".."):
                    raise FormatError(f"{self.path}: shard name {shard!r} (tensor {name!r}) must "
                                      "be a plain file name in the index's folder")
                shard_path = folder / shard
                if not shard_path.is_file():
                    raise FormatError(f"{self.path}: shard {shard!r} (holding tensor {name!r}) "
                                      f"is missing; expected at {shard_path}")
                self.shards[shard] = SafetensorsFile(shard_path)
            if name not in self.shards[shard]:
                raise FormatError(f"{self.path}: the index places tensor {name!r} in {shard!r} "
                                  "but that shard has no such tensor")
        self._where = {name: self.shards[shard] for name, shard in wmap.items()}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        return self._where[name]

    def info(self, name: str) -> TensorInfo:
        return self._file(name).info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        return self.info(name).dtype

    def host(self, name: str) -> np.ndarray:
        return self._file(name).host(name)

    def load(self, name: str, backend: Any = None, dtype: Any = None):
        return self._file(name).load(name, backend, dtype)

    def close(self) -> None:
        for f in self.shards.values():
            f.close()

    def __repr__(self) -> str:
        return (f"ShardedSafetensors({self.path!r}, {len(self._where)} tensors in "
                f"{len(self.shards)} shards)")


def open_safetensors(path: str | os.PathLike) -> SafetensorsFile | ShardedSafetensors:
    """Open a ``.safetensors`` file, a shard index, or a folder holding either."""
    p = Path(path)
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return ShardedSafetensors(p / INDEX_NAME)
        if (p / "model.safetensors").is_file():
            return SafetensorsFile(p / "model.safetensors")
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return SafetensorsFile(found[0])
        raise FormatError(f"{p}: no model.safetensors or {INDEX_NAME} in this folder"
                          + (f" (found {len(found)} .safetensors files)" if found else ""))
    if not p.exists():
        raise FormatError(f"{p}: no such file")
    if p.name.endswith(".index.json"):
        return ShardedSafetensors(p)
    return SafetensorsFile(p)


def _check_metadata(metadata: Any, path: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ConfigError(f"{path}: metadata must be a dict of strings, got "
                          f"{type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(f"{path}: metadata must map strings to strings (safetensors "
                              f"allows nothing else), got {k!r}: {type(v).__name__}; "
                              "encode other values, e.g. with json.dumps")
    return dict(metadata)


def save_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write host arrays as a safetensors file, atomically.

    Arrays keep their shapes (0-d included) and dtypes (any of :data:`SUPPORTED_DTYPES`; stored
    little-endian). ``metadata`` must map strings to strings (:class:`ConfigError` otherwise).
    The data is streamed, one tensor at a time, to a temporary file in the destination folder
    that replaces ``path`` only once complete: a failure leaves an existing file intact.
    """
    from .loomx_format import atomic_write

    meta = _check_metadata(metadata, path)
    tags = {_DTYPES[k]().name: k for k in _DTYPES}
    header: dict[str, Any] = {}
    if meta:
        header["__metadata__"] = meta
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ConfigError(f"{path}: tensor names must be strings other than "
                              f"'__metadata__', got {name!r}")
        arr = np.asarray(arr, order="C")  # keeps 0-d arrays 0-d
        tag = tags.get(arr.dtype.name)
        if tag is None:
            raise FormatError(f"{path}: cannot store tensor {name!r} of dtype {arr.dtype}")
        header[name] = {"dtype": tag, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)

    def write(fh) -> None:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for arr in arrays:
            write_array(fh, arr)

    atomic_write(path, write)


def write_array(fh: Any, arr: np.ndarray) -> None:
    """Write ``arr``'s elements little-endian in C order (no copy when it already is)."""
    arr = np.asarray(arr, order="C")
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    if arr.size:
        fh.write(arr.reshape(-1).view(np.uint8).data)
