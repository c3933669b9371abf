"""Training checkpoints: every dtype and shape round-trips, and damaged files are FormatErrors."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from loomx.errors import ConfigError, FormatError
from loomx.io.checkpoint import load_checkpoint, save_checkpoint
from loomx.io.safetensors import save_safetensors


def test_bfloat16_and_zero_d_tensors_round_trip(tmp_path):
    p = tmp_path / "c.ckpt"
    tensors = {"w": np.arange(6).reshape(2, 3).astype(ml_dtypes.bfloat16),
               "s": np.float32(2.0), "n": np.array(5, np.int64)}
    save_checkpoint(p, tensors, {"step": 3})
    back, meta = load_checkpoint(p)
    assert meta == {"version": 1, "step": 3}
    assert back["w"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(back["w"], tensors["w"])
    assert back["s"].shape == () and float(back["s"]) == 2.0
    assert back["n"].shape == () and int(back["n"]) == 5
    back["w"][0, 0] = 9  # writable, independent of the file
    assert load_checkpoint(p)[0]["w"][0, 0] == 0


def test_bfloat16_training_resumes(tmp_path):
    torch = pytest.importorskip("torch")  # noqa: F841
    import loomx
    from loomx.layers import Dense

    def net():
        return loomx.Network(1, 1, 2, layers=[Dense(4, activation="relu"), Dense(3)],
                             input_shape=(5,), backend=loomx.get_backend("torch:cpu", "bfloat16"),
                             seed=0)

    x = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    y = np.arange(16) % 3
    ck = tmp_path / "bf16.ckpt"
    loomx.fit(net(), x, y, epochs=2, batch_size=8, checkpoint=ck, progress=False)
    loomx.fit(net(), x, y, epochs=2, batch_size=8, checkpoint=ck, resume=True, progress=False)


def test_version_is_reserved(tmp_path):
    with pytest.raises(ConfigError, match="version"):
        save_checkpoint(tmp_path / "c.ckpt", {"w": np.ones(2, np.float32)}, {"version": "mine"})
    assert not (tmp_path / "c.ckpt").exists()


@pytest.mark.parametrize("document, match", [("{not json", "not valid JSON"),
                                             ("[1]", "JSON object"),
                                             ('{"version": 7}', "version 7")])
def test_bad_metadata_is_a_format_error(tmp_path, document, match):
    p = tmp_path / "c.ckpt"
    save_safetensors({"w": np.ones(1, np.float32)}, p, metadata={"loomx_checkpoint": document})
    with pytest.raises(FormatError, match=match):
        load_checkpoint(p)


def test_truncated_and_foreign_files_are_format_errors_naming_the_file(tmp_path):
    p = tmp_path / "c.ckpt"
    save_checkpoint(p, {"w": np.ones(1000, np.float32)}, {"step": 1})
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(FormatError, match="c.ckpt"):
        load_checkpoint(p)
    save_safetensors({"w": np.ones(1, np.float32)}, p)
    with pytest.raises(FormatError, match="not a loomx checkpoint"):
        load_checkpoint(p)
    p.write_bytes(b"\x08" + bytes(7) + json.dumps({"w": 1}).encode()[:8])
    with pytest.raises(FormatError, match="c.ckpt"):
        load_checkpoint(p)


def test_a_refused_checkpoint_is_not_left_mapped(tmp_path):
    """Every error path of load_checkpoint closes the file first."""
    import gc
    import os

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps here")
    path = tmp_path / "plain.safetensors"
    save_safetensors({"w": np.zeros(4, np.float32)}, path)
    with pytest.raises(FormatError, match="not a loomx checkpoint") as caught:
        load_checkpoint(path)
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert not any(str(path) in line for line in maps), caught
