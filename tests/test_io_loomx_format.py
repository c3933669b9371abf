"""The loomx file format: corrupt headers are FormatErrors, shapes round-trip, saves are safe."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from loomx.errors import FormatError
from loomx.io.loomx_format import read_loomx, write_loomx

META = {"format": "loomx", "format_version": "1", "config": "{}"}


def _file(path, header, data=b"\0" * 4):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, match", [
    ({"__metadata__": META, "w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}},
     "unknown dtype"),
    ({"__metadata__": ["x"]}, "__metadata__"),
    ({"__metadata__": {**META, "config": 5}}, "__metadata__"),
    ({"__metadata__": {**META, "config": "[1, 2]"}}, "JSON object"),
    ({"__metadata__": {**META, "config": "{oops"}}, "not JSON"),
    ({"__metadata__": {k: v for k, v in META.items() if k != "config"}}, "missing"),
    ({"__metadata__": META, "w": {"dtype": "F32", "shape": [2**32, 2**32],
                                  "data_offsets": [0, 0]}}, "needs"),
    ({"__metadata__": META, "w": {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 0]}},
     "needs"),
    ({"__metadata__": META, "w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
     "bad shape"),
])
def test_corrupt_headers_are_format_errors(tmp_path, header, match):
    p = _file(tmp_path / "x.loomx", header)
    with pytest.raises(FormatError, match=match):
        read_loomx(p)


def test_deeply_nested_header_is_a_format_error(tmp_path):
    raw = b"[" * 100000 + b"]" * 100000
    p = tmp_path / "deep.loomx"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(FormatError, match="not valid JSON"):
        read_loomx(p)


def test_zero_d_and_bfloat16_tensors_round_trip(tmp_path):
    p = tmp_path / "s.loomx"
    write_loomx(p, {"s": np.float32(2.0), "b": np.ones(3, ml_dtypes.bfloat16)}, {"a": 1})
    tensors, config = read_loomx(p)
    assert tensors["s"].shape == () and float(tensors["s"]) == 2.0
    assert tensors["b"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert config == {"a": 1}


def test_saves_keep_or_give_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        p = tmp_path / "m.loomx"
        write_loomx(p, {"w": np.ones(2, np.float32)}, {})
        assert os.stat(p).st_mode & 0o777 == 0o644
        os.chmod(p, 0o664)
        write_loomx(p, {"w": np.ones(2, np.float32)}, {})
        assert os.stat(p).st_mode & 0o777 == 0o664
    finally:
        os.umask(old)
    assert os.listdir(tmp_path) == ["m.loomx"]
