"""Serialisation: every registered layer type round-trips through the loomx format
(bit-exact) and through Loom's bundle format (identical outputs); bad files raise
FormatError and never load partially; writes are atomic."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

import loomx
from loomx.errors import FormatError, LoomxError
from loomx.grid import Network
from loomx.grid.loom_format import load_loom_bundle, save_loom_bundle
from loomx.grid.serialize import load, save
from loomx.layers import LAYER_TYPES, Dense
from tests.conftest import assert_close

DENSE = {"type": "dense", "out_features": 6, "activation": "tanh"}

#: type name -> (layers of a small chain, per-sample input shape, integer input?)
EXAMPLES: dict[str, tuple[list, tuple, bool]] = {
    "activation": ([{"type": "activation", "activation": "gelu"}], (6,), False),
    "avg_pool1d": ([{"type": "avg_pool1d", "kernel_size": 2}], (2, 8), False),
    "avg_pool2d": ([{"type": "avg_pool2d", "kernel_size": 2}], (2, 6, 6), False),
    "conv1d": ([{"type": "conv1d", "out_channels": 3, "kernel_size": 3, "padding": 1}],
               (2, 8), False),
    "conv2d": ([{"type": "conv2d", "out_channels": 3, "kernel_size": 3, "stride": 2,
                 "padding": 1, "activation": "tanh"}], (2, 6, 6), False),
    "conv3d": ([{"type": "conv3d", "out_channels": 2, "kernel_size": 2}], (1, 4, 4, 4), False),
    "conv_transpose1d": ([{"type": "conv_transpose1d", "out_channels": 2, "kernel_size": 3,
                           "stride": 2}], (3, 5), False),
    "conv_transpose2d": ([{"type": "conv_transpose2d", "out_channels": 2, "kernel_size": 3,
                           "stride": 2}], (3, 4, 4), False),
    "dense": ([{"type": "dense", "out_features": 4, "activation": "scaled_relu"}], (6,), False),
    "dropout": ([{"type": "dropout", "rate": 0.3}], (6,), False),
    "embedding": ([{"type": "embedding", "num_embeddings": 10, "embedding_dim": 4}], (5,),
                  True),
    "flatten": ([{"type": "flatten"}], (2, 3), False),
    "global_avg_pool": ([{"type": "global_avg_pool"}], (3, 4, 4), False),
    "gru": ([{"type": "gru", "hidden_size": 4}], (5, 3), False),
    "layer_norm": ([{"type": "layer_norm", "eps": 1e-4}], (6,), False),
    "lstm": ([{"type": "lstm", "hidden_size": 4}], (5, 3), False),
    "max_pool1d": ([{"type": "max_pool1d", "kernel_size": 2}], (2, 8), False),
    "max_pool2d": ([{"type": "max_pool2d", "kernel_size": 2, "stride": 1}], (2, 5, 5), False),
    "mha": ([{"type": "mha", "num_heads": 2, "causal": True, "rope_theta": 10000.0,
              "q_bias": True}], (5, 8), False),
    "mlp": ([{"type": "mlp", "hidden_features": 8}], (6,), False),
    "moe": ([{"type": "moe", "num_experts": 3, "top_k": 2, "hidden_features": 4,
              "shared_hidden_features": 5}], (5, 6), False),
    "network": ([{"type": "network", "grid_rows": 1, "grid_cols": 2, "layers_per_cell": 1,
                  "layers": [DENSE, {"type": "residual", "source": 0}]}], (6,), False),
    "parallel": ([{"type": "parallel", "combine_mode": "grid_scatter",
                   "grid_positions": [[0, 1, 0], [0, 0, 0]], "grid_output_cols": 2,
                   "branches": [DENSE, {"type": "parallel", "combine_mode": "add",
                                        "branches": [DENSE, DENSE]}]}], (6,), False),
    "reshape": ([{"type": "reshape", "shape": [3, 2]}], (6,), False),
    "residual": ([DENSE, {"type": "residual", "source": "input"}], (6,), False),
    "rms_norm": ([{"type": "rms_norm", "unit_offset": True}], (6,), False),
    "rnn": ([{"type": "rnn", "hidden_size": 4, "return_sequences": False}], (5, 3), False),
    "softmax": ([{"type": "softmax", "variant": "mixture"}], (6,), False),
    "swiglu": ([{"type": "swiglu", "hidden_features": 8, "bias": True}], (5, 6), False),
}

ALL_TYPES = sorted({cls.type_name for cls in LAYER_TYPES.values()})


def test_every_registered_type_has_an_example():
    missing = sorted(set(ALL_TYPES) - set(EXAMPLES))
    assert not missing, f"add round-trip examples for {missing}"


def _network(name, backend, seed=0):
    layers, shape, _ = EXAMPLES[name]
    net = Network.chain([dict(la) for la in layers], input_shape=shape, backend=backend,
                        seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in net.parameters():  # non-initial values, so a reload cannot pass by re-seeding
        host = backend.to_host(p.value)
        p.value = backend.from_host(rng.standard_normal(host.shape) * 0.5, dtype=p.value.dtype)
    return net


def _input(name, backend, batch=2):
    _, shape, ints = EXAMPLES[name]
    rng = np.random.default_rng(7)
    if ints:
        return backend.from_host(rng.integers(0, 10, (batch, *shape)))
    return backend.from_host(rng.standard_normal((batch, *shape)).astype(np.float32))


@pytest.mark.parametrize("name", ALL_TYPES)
def test_loomx_format_round_trip_is_bit_exact(backend, tmp_path, name):
    net = _network(name, backend)
    path = tmp_path / f"{name}.safetensors"
    save(net, path)
    again = loomx.load(path, backend=backend)
    assert again.get_config() == net.get_config()
    before = {p.name: p for p in net.parameters()}
    after = {p.name: p for p in again.parameters()}
    assert sorted(before) == sorted(after)
    for k, p in before.items():
        assert after[k].value.dtype == p.value.dtype
        np.testing.assert_array_equal(backend.to_host(after[k].value), backend.to_host(p.value))
    x = _input(name, backend)
    np.testing.assert_array_equal(backend.to_host(again(x)), backend.to_host(net(x)))


@pytest.mark.parametrize("name", ALL_TYPES)
def test_loom_bundle_round_trip_gives_identical_outputs(backend, name):
    net = _network(name, backend)
    text = save_loom_bundle(net, model_id=name)
    again = load_loom_bundle(text, backend=backend, input_shape=net.input_shape)
    x = _input(name, backend)
    assert_close(again(x), backend.to_host(net(x)), backend, rtol=1e-6, atol=1e-7)
    # writing the reloaded network gives the same bundle
    assert save_loom_bundle(again, model_id=name) == text


def test_loom_bundle_of_a_pre_norm_block_keeps_its_token_axis(backend):
    """A first layer that tells only a row width (RMSNorm) takes the token count from the
    attention definition after it, instead of running attention on one token."""
    from loomx.layers import MultiHeadAttention, RMSNorm, SwiGLU

    attention = MultiHeadAttention(2, head_dim=2, d_model=4, q_bias=True, k_bias=True,
                                   v_bias=True, o_bias=True, causal=True, rope_theta=1e6)
    net = Network(1, 1, 4, layers=[RMSNorm(), attention, RMSNorm(), SwiGLU(8, bias=True)],
                  input_shape=(3, 4), backend=backend, seed=0)
    text = save_loom_bundle(net)
    again = load_loom_bundle(text, backend=backend)
    assert again.input_shape == (3, 4)
    x = backend.from_host(np.random.default_rng(0).standard_normal((2, 3, 4))
                          .astype(np.float32))
    assert_close(again(x), backend.to_host(net(x)), backend, rtol=1e-6, atol=1e-7)
    assert save_loom_bundle(again) == text


@pytest.mark.parametrize("native", [True, False])
def test_loom_bundle_round_trip_keeps_disabled_layers(backend, native):
    """A disabled slot is written as a loomx entry (Loom has no disabled layers) and comes
    back disabled, so the reloaded network computes the same outputs."""
    middle = {"type": "dense", "out_features": 4, "activation": "tanh"} if native else \
        {"type": "layer_norm"}
    net = Network(1, 1, 3, layers=[{"type": "dense", "out_features": 4, "activation": "tanh"},
                                   middle, {"type": "dense", "out_features": 2}],
                  input_shape=(4,), disabled=[1], backend=backend, seed=0)
    text = save_loom_bundle(net)
    again = load_loom_bundle(text, backend=backend)
    assert [la.disabled for _, la in again.layers()] == [False, True, False]
    x = backend.from_host(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32))
    assert_close(again(x), backend.to_host(net(x)), backend, rtol=1e-6, atol=1e-7)
    assert save_loom_bundle(again) == text


@pytest.mark.parametrize("layers,shape,loom_type", [
    ([{"type": "dense", "out_features": 3, "activation": "loom_leaky_relu"}], (4,), "dense"),
    ([{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": 1,
       "activation": "scaled_relu"}], (1, 4, 4), "conv2d"),
    ([{"type": "mha", "num_heads": 2, "causal": True, "rope_theta": 1e6, "q_bias": True,
       "k_bias": True, "v_bias": True, "o_bias": True}], (3, 4), "multi_head_attention"),
    ([{"type": "lstm", "hidden_size": 2}], (2, 3), "lstm"),
    ([{"type": "rnn", "hidden_size": 2}], (2, 3), "rnn"),
    ([{"type": "layer_norm"}], (4,), "layer_norm"),
    ([{"type": "rms_norm"}], (4,), "rms_norm"),
    ([{"type": "swiglu", "hidden_features": 3}], (4,), "swiglu"),
    ([{"type": "swiglu", "hidden_features": 3, "activation": "gelu_tanh"}], (4,), "loomx"),
    ([{"type": "softmax", "variant": "grid", "rows": 2, "cols": 2}], (4,), "softmax"),
    ([{"type": "dense", "out_features": 4}, {"type": "residual", "source": -1}], (4,),
     "residual"),
    ([{"type": "parallel", "branches": [DENSE, {"type": "lstm", "hidden_size": 3}]}], (2, 6),
     "loomx"),
    ([{"type": "parallel", "branches": [DENSE, DENSE], "combine_mode": "avg"}], (6,),
     "parallel"),
])
def test_loom_native_types_are_written_in_loom_terms(backend, layers, shape, loom_type):
    net = Network.chain(layers, input_shape=shape, backend=backend, seed=1)
    cfg = json.loads(save_loom_bundle(net))["models"][0]["cfg"]
    assert cfg["layers"][-1]["type"] == loom_type
    again = load_loom_bundle(save_loom_bundle(net), backend=backend, input_shape=shape)
    x = backend.from_host(np.random.default_rng(0).standard_normal((1, *shape)).astype(
        np.float32))
    assert_close(again(x), backend.to_host(net(x)), backend, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- bad files
def _saved(tmp_path, backend):
    net = Network.chain([Dense(3), Dense(2)], input_shape=(4,), backend=backend)
    path = tmp_path / "m.safetensors"
    save(net, path)
    return net, path


def _rewrite(path, tensors, metadata):
    from safetensors.numpy import save as st_save

    path.write_bytes(st_save(tensors, metadata=metadata))


def _meta_and_tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_truncated_and_garbage_files(backend, tmp_path):
    _, path = _saved(tmp_path, backend)
    blob = path.read_bytes()
    for bad, msg in [(blob[:5], "shorter than"), (blob[:-4], "claims bytes"),
                     (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxxxx", "not valid JSON"),
                     (struct.pack("<Q", 10 ** 12) + b"{}", "header length")]:
        path.write_bytes(bad)
        with pytest.raises(FormatError, match=msg):
            load(path, backend=backend)
    with pytest.raises(FormatError, match="cannot open"):
        load(tmp_path / "absent.safetensors")


def test_mismatched_weights_are_named(backend, tmp_path):
    _, path = _saved(tmp_path, backend)
    meta, tensors = _meta_and_tensors(path)
    t = dict(tensors)
    del t["1.bias"]
    t["0.weight"] = np.zeros((5, 4), np.float32)
    t["9.extra"] = np.zeros(2, np.float32)
    _rewrite(path, t, meta)
    with pytest.raises(FormatError) as info:
        load(path, backend=backend)
    text = str(info.value)
    assert "missing tensors ['1.bias']" in text and "unexpected tensors ['9.extra']" in text
    assert "0.weight: shape [5, 4], config implies [3, 4]" in text


def test_config_problems(backend, tmp_path):
    _, path = _saved(tmp_path, backend)
    meta, tensors = _meta_and_tensors(path)
    _rewrite(path, tensors, {})
    with pytest.raises(FormatError, match="without loomx metadata"):
        load(path, backend=backend)
    bad = dict(meta)
    cfg = json.loads(bad["config"])
    cfg["network"]["layers"][0]["type"] = "dense_v9"
    bad["config"] = json.dumps(cfg)
    _rewrite(path, tensors, bad)
    with pytest.raises(FormatError, match="unknown layer type 'dense_v9'"):
        load(path, backend=backend)
    bad["format_version"] = "7"
    _rewrite(path, tensors, bad)
    with pytest.raises(FormatError, match="version '7'"):
        load(path, backend=backend)


def test_save_is_atomic(backend, tmp_path, monkeypatch):
    net, path = _saved(tmp_path, backend)
    good = path.read_bytes()
    net[0].params["weight"] = net[0].params["weight"] + 1.0

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        save(net, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temp file left behind


def test_unbuilt_network_cannot_be_saved(tmp_path):
    with pytest.raises(LoomxError, match="built"):
        save(Network.chain([Dense(2)]), tmp_path / "x.safetensors")


def test_float64_and_backend_moves(tmp_path, backend64, backend):
    net = _network("mha", backend64)
    path = tmp_path / "m.safetensors"
    save(net, path)
    again = load(path)  # default backend, the saved float64 dtype
    for p in again.parameters():
        assert str(p.value.dtype) == "float64"
    moved = load(path, backend=backend)  # an explicit Backend object: its dtype wins
    for p in moved.parameters():
        assert p.value.dtype == backend.float_dtype


# ---------------------------------------------------------------------- Loom bundle errors
def _bundle(backend):
    net = Network.chain([Dense(3), Dense(2)], input_shape=(4,), backend=backend)
    return json.loads(save_loom_bundle(net, model_id="m"))


def test_bad_bundles_raise_format_errors(backend):
    import base64

    with pytest.raises(FormatError, match="not valid JSON"):
        load_loom_bundle("{broken", backend=backend)
    doc = _bundle(backend)
    doc["type"] = "other"
    with pytest.raises(FormatError, match="not a Loom bundle"):
        load_loom_bundle(json.dumps(doc), backend=backend)
    doc = _bundle(backend)
    doc["models"][0]["weights"]["data"] = "@@@"
    with pytest.raises(FormatError, match="base64"):
        load_loom_bundle(json.dumps(doc), backend=backend)
    doc = _bundle(backend)
    w = json.loads(base64.b64decode(doc["models"][0]["weights"]["data"]))
    w["layers"][1]["kernel"] = w["layers"][1]["kernel"][:-1]
    doc["models"][0]["weights"]["data"] = base64.b64encode(json.dumps(w).encode()).decode()
    with pytest.raises(FormatError, match="layer 1: weight 'kernel' has 5 values, expected 6"):
        load_loom_bundle(json.dumps(doc), backend=backend)
    doc = _bundle(backend)
    doc["models"][0]["cfg"]["layers"].append(doc["models"][0]["cfg"]["layers"][0])
    with pytest.raises(FormatError, match="2 weight entries"):
        load_loom_bundle(json.dumps(doc), backend=backend)
    doc = _bundle(backend)
    doc["models"][0]["cfg"]["layers"][1]["input_height"] = 5
    with pytest.raises(FormatError, match="expects 5 values per sample"):
        load_loom_bundle(json.dumps(doc), backend=backend)


@pytest.mark.parametrize("entry, message", [
    (7, "must be an object"),
    ({"shape": [4, 5], "dtype": "float32", "data": [0.0] * 3}, "does not have shape"),
    ({"shape": [4, 5], "dtype": "nonsense", "data": [0.0] * 20}, "unknown dtype"),
])
def test_bad_loomx_extension_params_raise_format_errors(backend, entry, message):
    """A layer Loom cannot express travels as a loomx extension; damaged params are named."""
    import base64

    net = Network.chain([{"type": "embedding", "num_embeddings": 4, "embedding_dim": 5}],
                        input_shape=(3,), backend=backend)
    doc = json.loads(save_loom_bundle(net))
    w = json.loads(base64.b64decode(doc["models"][0]["weights"]["data"]))
    w["layers"][0]["loomx_params"]["weight"] = entry
    doc["models"][0]["weights"]["data"] = base64.b64encode(json.dumps(w).encode()).decode()
    with pytest.raises(FormatError, match=rf"layer 0: loomx parameter 'weight' .*{message}"):
        load_loom_bundle(json.dumps(doc), backend=backend)


def test_loom_bundle_details_survive_the_loomx_format(tmp_path):
    """A network read from a Loom bundle, saved and loaded in loomx's own format, writes the
    same bundle back (its batch size and original grid travel in the config)."""
    import json

    from tests.conftest import LOOM_FIXTURES

    fixture = LOOM_FIXTURES / "dense_mlp_b4.json"
    if not fixture.is_file():
        pytest.skip("Loom fixtures not available")
    net = load_loom_bundle(json.loads(fixture.read_text())["bundle"], backend="numpy")
    save(net, tmp_path / "n.safetensors")
    again = loomx.load(tmp_path / "n.safetensors", backend="numpy")
    assert (again.loom_batch_size, again.loom_grid) == (net.loom_batch_size, net.loom_grid)
    assert save_loom_bundle(again) == save_loom_bundle(net)
