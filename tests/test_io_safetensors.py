"""The safetensors reader: every dtype against the reference library, lazy memory maps, shards,
and corrupt files (always FormatError naming file and tensor; fuzzed with hypothesis)."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loomx.errors import ConfigError, FormatError
from loomx.io.safetensors import (
    SafetensorsFile,
    ShardedSafetensors,
    open_safetensors,
    parse_header,
    save_safetensors,
)
from tests.conftest import assert_close

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _reference_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 10
    return {
        "f64": base.double(), "f32": base, "f16": base.half(), "bf16": base.bfloat16(),
        "f8_e4m3": (base / 10).to(torch.float8_e4m3fn), "f8_e5m2": base.to(torch.float8_e5m2),
        "i64": torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(10, dtype=torch.int32) * -7, "i16": torch.arange(7, dtype=torch.int16),
        "i8": torch.arange(-4, 4, dtype=torch.int8), "u8": torch.arange(250, 256).to(torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


@pytest.fixture(scope="module")
def ref_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "all.safetensors"
    tensors = _reference_tensors()
    safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def test_every_dtype_matches_the_reference_library(ref_file):
    path, tensors = ref_file
    f = SafetensorsFile(path)
    assert sorted(f.names()) == sorted(tensors)
    assert f.metadata == {"format": "pt"}
    tags = {"f64": "F64", "f32": "F32", "f16": "F16", "bf16": "BF16", "f8_e4m3": "F8_E4M3",
            "f8_e5m2": "F8_E5M2", "i64": "I64", "i32": "I32", "i16": "I16", "i8": "I8",
            "u8": "U8", "bool": "BOOL", "scalar": "F32", "empty": "F32"}
    for name, t in tensors.items():
        assert f.dtype(name) == tags[name]
        host = f.host(name)
        assert host.shape == tuple(t.shape)
        if t.is_floating_point():
            np.testing.assert_array_equal(host.astype(np.float64), t.double().numpy())
        else:
            np.testing.assert_array_equal(host, t.numpy())
    assert f.host("bf16").dtype == np.dtype(ml_dtypes.bfloat16)
    assert f.host("f8_e4m3").dtype == np.dtype(ml_dtypes.float8_e4m3fn)


def test_reads_are_zero_copy_views_of_the_map(ref_file):
    path, _ = ref_file
    f = SafetensorsFile(path)
    host = f.host("f32")
    assert not host.flags.owndata
    assert not host.flags.writeable
    host2 = f.host("f32")
    assert np.shares_memory(host, host2)


def test_load_places_on_backend_in_dtype(ref_file, backend):
    path, tensors = ref_file
    f = open_safetensors(path)
    for name in ("f64", "f32", "f16", "bf16", "f8_e5m2"):
        arr = f.load(name, backend)
        assert_close(arr, tensors[name].double().numpy(), backend, rtol=1e-6, atol=1e-6)
    ints = f.load("i64", backend)
    assert_close(ints, tensors["i64"].numpy(), backend, dtype=backend.xp.int64)
    as_float = f.load("i32", backend, dtype="float32")
    assert_close(as_float, tensors["i32"].numpy().astype(np.float32), backend)
    mask = f.load("bool", backend)
    assert mask.dtype == backend.xp.bool


def test_save_roundtrip_is_readable_by_the_reference_library(tmp_path):
    from safetensors.numpy import load_file

    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
              "b": np.array([1, -2], dtype=np.int64), "c": np.array([True, False])}
    path = tmp_path / "x.safetensors"
    save_safetensors(arrays, path, metadata={"k": "v"})
    back = load_file(str(path))
    for k, v in arrays.items():
        np.testing.assert_array_equal(back[k], v)


def test_sharded_checkpoint_matches_the_single_file(tmp_path):
    arrays = {f"layer.{i}.weight": np.full((64, 64), i, dtype=np.float32) for i in range(5)}
    single = tmp_path / "single"
    single.mkdir()
    save_safetensors(arrays, single / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for shard, names in enumerate([list(arrays)[:2], list(arrays)[2:]]):
        fname = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_safetensors({n: arrays[n] for n in names}, sharded / fname)
        weight_map.update({n: fname for n in names})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 5 * 64 * 64 * 4}, "weight_map": weight_map}))
    a, b = open_safetensors(single), open_safetensors(sharded)
    assert isinstance(b, ShardedSafetensors) and len(b.shards) == 2
    assert sorted(a.names()) == sorted(b.names())
    for n in arrays:
        np.testing.assert_array_equal(a.host(n), b.host(n))


# ---------------------------------------------------------------------- corrupt input


def _write(path, header: dict | bytes, data: bytes, declared: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared is None else declared
    path.write_bytes(n.to_bytes(8, "little") + raw + data)
    return path


def _good_header():
    return {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}


@pytest.mark.parametrize("case, match", [
    ("truncated", "'b'.*outside the data section"),
    ("header_past_end", "header length"),
    ("invalid_json", "not valid UTF-8 JSON"),
    ("not_object", "must be a JSON object"),
    ("out_of_bounds", "'w'.*outside"),
    ("overlap", "overlaps"),
    ("unknown_dtype", "'w'.*unknown dtype 'Q4'"),
    ("byte_count", "'w'.*needs 16 bytes but data_offsets span 12"),
    ("negative_shape", "'w'.*non-negative"),
    ("bad_offsets", "'w'.*two integers"),
    ("too_short", "too short"),
    ("missing_field", "'w'.*lacks dtype"),
    ("bad_metadata", "__metadata__"),
])
def test_corrupt_files_raise_format_error_naming_file_and_tensor(tmp_path, case, match):
    p = tmp_path / f"{case}.safetensors"
    h = _good_header()
    data = bytes(24)
    if case == "truncated":
        _write(p, h, data[:20])
    elif case == "header_past_end":
        _write(p, h, data, declared=10_000)
    elif case == "invalid_json":
        _write(p, b"{not json", data)
    elif case == "not_object":
        _write(p, b"[1, 2]", data)
    elif case == "out_of_bounds":
        _write(p, {"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, data)
    elif case == "overlap":
        h["b"]["data_offsets"] = [8, 16]
        _write(p, h, data)
    elif case == "unknown_dtype":
        h["w"]["dtype"] = "Q4"
        _write(p, h, data)
    elif case == "byte_count":
        h["w"]["data_offsets"] = [0, 12]
        h["b"]["data_offsets"] = [16, 24]
        _write(p, h, data)
    elif case == "negative_shape":
        h["w"]["shape"] = [-2, 2]
        _write(p, h, data)
    elif case == "bad_offsets":
        h["w"]["data_offsets"] = [0, "16"]
        _write(p, h, data)
    elif case == "too_short":
        p.write_bytes(b"\x01\x02")
    elif case == "missing_field":
        del h["w"]["dtype"]
        _write(p, h, data)
    elif case == "bad_metadata":
        h["__metadata__"] = {"k": 3}
        _write(p, h, data)
    with pytest.raises(FormatError, match=match) as info:
        SafetensorsFile(p)
    assert str(p) in str(info.value)


def test_missing_shard_names_shard_and_tensor(tmp_path):
    save_safetensors({"a": np.zeros(2, np.float32)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(FormatError, match="shard 's2.safetensors' \\(holding tensor 'b'\\)"):
        open_safetensors(tmp_path)


def test_index_pointing_at_wrong_shard(tmp_path):
    save_safetensors({"a": np.zeros(2, np.float32)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"zzz": "s1.safetensors"}}))
    with pytest.raises(FormatError, match="'zzz'.*no such tensor"):
        open_safetensors(tmp_path)


def test_shard_names_cannot_leave_the_folder(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(FormatError, match="plain file name"):
        open_safetensors(tmp_path)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        open_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(FormatError, match="no model.safetensors"):
        open_safetensors(tmp_path)


def test_file_shrinking_after_open_is_detected(tmp_path):
    p = _write(tmp_path / "x.safetensors", _good_header(), bytes(24))
    f = SafetensorsFile(p)
    with open(p, "r+b") as fh:
        fh.truncate(os.path.getsize(p) - 4)
    with pytest.raises(FormatError, match="'b'.*past the end"):
        f.host("b")


def test_replacing_the_path_after_open_does_not_mix_header_and_data(tmp_path):
    p = tmp_path / "t.safetensors"
    save_safetensors({"w": np.arange(4, dtype=np.float32)}, p)
    f = SafetensorsFile(p)
    save_safetensors({"w": np.arange(4, dtype=np.int32) + 100}, tmp_path / "new.safetensors")
    os.replace(tmp_path / "new.safetensors", p)  # same size, other dtype and values
    np.testing.assert_array_equal(f.host("w"), np.arange(4, dtype=np.float32))
    f.close()  # reading again after close must not map the replacement with the old header
    with pytest.raises(FormatError, match="changed after it was opened"):
        f.host("w")


def test_reading_after_close_maps_the_same_file_again(tmp_path):
    p = tmp_path / "t.safetensors"
    save_safetensors({"w": np.arange(4, dtype=np.float32)}, p)
    f = SafetensorsFile(p)
    f.close()
    np.testing.assert_array_equal(f.host("w"), np.arange(4, dtype=np.float32))


def test_files_close_at_the_end_of_a_with_block(tmp_path):
    p = tmp_path / "t.safetensors"
    save_safetensors({"w": np.arange(4, dtype=np.float32)}, p)
    with SafetensorsFile(p) as f:
        np.testing.assert_array_equal(f.host("w"), np.arange(4, dtype=np.float32))
        assert f._map is not None
    assert f._map is None


def test_save_keeps_zero_d_shapes_and_every_dtype(tmp_path):
    arrays = {"scalar": np.float32(3.5), "zero_d_int": np.array(7, np.int64),
              "bf16": np.arange(3).astype(ml_dtypes.bfloat16),
              "big_endian": np.arange(3, dtype=">f4"),
              "strided": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],
              "empty": np.zeros((0, 3), np.float16)}
    save_safetensors(arrays, tmp_path / "rt.safetensors")
    f = SafetensorsFile(tmp_path / "rt.safetensors")
    for name, a in arrays.items():
        a = np.asarray(a)
        assert f.host(name).shape == a.shape, name
        np.testing.assert_array_equal(f.host(name).astype(np.float64), a.astype(np.float64))
    assert f.host("scalar").shape == ()


def test_failed_save_leaves_the_existing_file_intact(tmp_path):
    p = tmp_path / "keep.safetensors"
    save_safetensors({"w": np.arange(4, dtype=np.float32)}, p)
    before = p.read_bytes()

    class Boom:  # an array-like whose data cannot be produced
        shape, dtype = (2,), np.dtype(np.float32)

        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_safetensors({"a": np.ones(3, np.float32), "b": Boom()}, p)
    with pytest.raises(FormatError, match="'c'"):
        save_safetensors({"c": np.array(["x"])}, p)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_failure_while_streaming_removes_the_temporary_file(tmp_path, monkeypatch):
    import loomx.io.safetensors as sf

    p = tmp_path / "keep.safetensors"
    save_safetensors({"w": np.arange(4, dtype=np.float32)}, p)
    before = p.read_bytes()
    calls = []

    def failing(fh, arr):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("no space left on device")
        fh.write(np.ascontiguousarray(arr).tobytes())

    monkeypatch.setattr(sf, "write_array", failing)
    with pytest.raises(OSError, match="no space"):
        save_safetensors({"a": np.ones(3, np.float32), "b": np.ones(5, np.float32)}, p)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_saved_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        p = tmp_path / "m.safetensors"
        save_safetensors({"w": np.ones(2, np.float32)}, p)
        assert os.stat(p).st_mode & 0o777 == 0o644
        os.chmod(p, 0o640)
        save_safetensors({"w": np.zeros(2, np.float32)}, p)
        assert os.stat(p).st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("metadata", [{"n": 1}, {"a": None}, {1: "x"}, ["x"]])
def test_save_rejects_metadata_the_reader_would_reject(tmp_path, metadata):
    with pytest.raises(ConfigError, match="metadata"):
        save_safetensors({"w": np.ones(2, np.float32)}, tmp_path / "m.safetensors", metadata)
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------------- fuzzing

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)

_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", 3]),
    "shape": st.lists(st.integers(-1, 5), max_size=3) | _json,
    "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | _json,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=200))
def test_fuzz_random_header_bytes(raw):
    try:
        tensors, meta = parse_header(raw, 64, "fuzz")
    except FormatError:
        return
    assert isinstance(tensors, dict) and isinstance(meta, dict)


@settings(max_examples=300, deadline=None)
@given(header=st.dictionaries(st.text(max_size=5), _entry | _json, max_size=5),
       size=st.integers(0, 80))
def test_fuzz_structured_headers(header, size):
    raw = json.dumps(header).encode()
    try:
        tensors, _ = parse_header(raw, size, "fuzz")
    except FormatError as exc:
        assert "fuzz" in str(exc)
        return
    spans = sorted((t.begin, t.end) for t in tensors.values() if t.end > t.begin)
    for t in tensors.values():
        assert 0 <= t.begin <= t.end <= size
    for (_, e1), (b2, _) in zip(spans, spans[1:]):
        assert b2 >= e1


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=120), declared=st.integers(0, 2**64 - 1))
def test_fuzz_whole_files(tmp_path, data, declared):
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(declared.to_bytes(8, "little") + data)
    try:
        f = SafetensorsFile(p)
    except FormatError:
        return
    for name in f.names():
        f.host(name)


def test_saving_through_a_symlink_replaces_the_file_it_points_at(tmp_path):
    """A Hugging Face cache links snapshots to blobs: the link must stay a link."""
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(b"old")
    link = tmp_path / "model.safetensors"
    link.symlink_to(blob)
    save_safetensors({"w": np.arange(3, dtype=np.float32)}, link)
    assert link.is_symlink()
    np.testing.assert_array_equal(SafetensorsFile(blob).host("w"), np.arange(3, dtype=np.float32))


def test_saving_into_a_missing_folder_names_the_destination(tmp_path):
    with pytest.raises(OSError, match=r"cannot write .*no_such_dir/x\.safetensors"):
        save_safetensors({"w": np.zeros(2, np.float32)}, tmp_path / "no_such_dir" / "x.safetensors")
