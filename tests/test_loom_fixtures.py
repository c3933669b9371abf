"""Loom's own fixtures: bundles read into loomx reproduce Loom's forward outputs, are written
back byte for byte, and Loom's documented bugs are handled as docs/grid.md states."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loomx.errors import ConfigError, FormatError
from loomx.grid import Network, Parallel
from loomx.grid.loom_format import (
    load_loom_architecture,
    load_loom_bundle,
    load_loom_bundle_all,
    loom_architecture,
    loom_input,
    loom_output,
    save_loom_bundle,
)
from loomx.io.loom_bundle import go_float32
from tests.conftest import LOOM_FIXTURES, assert_close

FIXTURES = LOOM_FIXTURES
FORWARD = ["dense_mlp_b1", "dense_mlp_b4", "conv2d", "norms", "softmax_standard",
           "softmax_grid", "softmax_masked", "parallel_add"]
TOL = dict(rtol=1e-5, atol=1e-6)


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text())


def flat(y, backend):
    return backend.xp.reshape(y, (-1,))


@pytest.mark.parametrize("name", FORWARD)
def test_forward_fixtures_reproduce_loom(backend, name):
    fx = fixture(name)
    net = load_loom_bundle(fx["bundle"], backend=backend)
    assert net.loom_batch_size == fx["batch_size"]
    for x, want in zip(fx["inputs"], fx["outputs"], strict=True):
        y = net(loom_input(x, net))
        assert_close(flat(y, backend), np.asarray(want, np.float32), backend, **TOL)
    # every layer's output matches Loom's Network.Activations()
    net(loom_input(fx["inputs"][0], net))
    acts = fx["activations_first_input"]
    assert len(acts) == len(net.activations)
    for got, want in zip(net.activations, acts, strict=True):
        assert_close(flat(got, backend), np.asarray(want, np.float32), backend, **TOL)


@pytest.mark.parametrize("name", FORWARD + ["parallel_concat", "stepping"])
def test_bundles_are_rewritten_byte_for_byte(name):
    fx = fixture(name)
    net = load_loom_bundle(fx["bundle"], backend="numpy")
    assert save_loom_bundle(net, model_id=fx["model_id"]) == fx["bundle"]


def test_parallel_concat_is_per_sample_in_loomx(backend):
    """Loom concatenates whole batches (a documented bug); loomx joins each sample's branch
    outputs. Same numbers, per-sample order; ``loom_compat=True`` gives Loom's order."""
    fx = fixture("parallel_concat")
    net = load_loom_bundle(fx["bundle"], backend=backend)
    compat = load_loom_bundle(fx["bundle"], backend=backend, loom_compat=True)
    widths = [4, 3, 4]
    batch = fx["batch_size"]
    for x, want in zip(fx["inputs"], fx["outputs"], strict=True):
        want = np.asarray(want, np.float32)
        parts, off = [], 0
        for w in widths:  # Loom: [branch0: all samples | branch1: all samples | ...]
            parts.append(want[off:off + batch * w].reshape(batch, w))
            off += batch * w
        per_sample = np.concatenate(parts, axis=1)
        assert_close(net(loom_input(x, net)), per_sample, backend, **TOL)
        assert_close(flat(compat(loom_input(x, compat)), backend), want, backend, **TOL)
    assert isinstance(net[0], Parallel) and not net[0].loom_compat


def test_multi_model_bundle_and_ids(backend, tmp_path):
    a = load_loom_bundle(fixture("dense_mlp_b1")["bundle"], backend=backend)
    b = load_loom_bundle(fixture("norms")["bundle"], backend=backend)
    path = tmp_path / "bundle.json"
    text = save_loom_bundle({"mlp": a, "norms": b}, path)
    assert path.read_text() == text
    assert [m["id"] for m in json.loads(text)["models"]] == ["mlp", "norms"]
    nets = load_loom_bundle_all(path, backend=backend)
    assert list(nets) == ["mlp", "norms"]
    fx = fixture("norms")
    y = load_loom_bundle(path, "norms", backend=backend)(loom_input(fx["inputs"][1], b))
    assert_close(flat(y, backend), np.asarray(fx["outputs"][1], np.float32), backend, **TOL)
    with pytest.raises(FormatError, match="pass model_id"):
        load_loom_bundle(text, backend=backend)
    with pytest.raises(FormatError, match="no model 'x'"):
        load_loom_bundle(text, "x", backend=backend)


def test_architecture_json(backend):
    cfg = json.loads(fixture("conv2d")["bundle"])["models"][0]["cfg"]
    net = load_loom_architecture(cfg, backend=backend, seed=3)
    assert net.input_shape == (1, 8, 8) and net.output_shape == (5,)
    assert [la.type_name for _, la in net.layers()] == ["conv2d", "conv2d", "network"]
    # Loom's saved Dense has width = height = 1; loomx reads the real sizes (Loom's builder
    # would make a 1x1 Dense here)
    assert net[2].output_shape == (5,)
    arch = loom_architecture(net)
    assert arch["layers"][2]["input_height"] == 96 and "id" not in arch
    hand = {"grid_rows": 1, "grid_cols": 3, "layers_per_cell": 1, "batch_size": 1, "layers": [
        {"type": "dense", "width": 4, "height": 8, "activation": "tanh"},
        {"type": "layernorm", "norm_size": 8},
        {"type": "parallel", "combine_mode": "grid_scatter", "grid_output_rows": 1,
         "grid_output_cols": 2, "grid_output_layers": 1,
         "grid_positions": [{"branch_index": 0, "target_row": 0, "target_col": 1,
                             "target_layer": 0},
                            {"branch_index": 1, "target_row": 0, "target_col": 0,
                             "target_layer": 0}],
         "branches": [{"type": "dense", "input_size": 8, "output_size": 2},
                      {"type": "rms_norm", "norm_size": 8}]}]}
    net = load_loom_architecture(json.dumps(hand), backend=backend)
    assert net.output_shape == (10,) and net[0].activation == "tanh"
    assert net[1].eps == 1e-5 and net[2].branches[0].activation == "scaled_relu"


def test_loom_activation_names_and_numbers():
    fx = fixture("dense_mlp_b1")
    net = load_loom_bundle(fx["bundle"], backend="numpy")
    assert [la.activation for _, la in net.layers()] == [
        "scaled_relu", "tanh", "sigmoid", "loom_leaky_relu", "softplus"]
    assert [go_float32(v) for v in (1e-5, 0.1, 1.0, -0.0, 1e-7, 3e21, 123456.79)] == [
        "0.00001", "0.1", "1", "-0", "1e-7", "3e+21", "123456.79"]


def test_flat_edge_helpers(backend):
    fx = fixture("dense_mlp_b4")
    net = load_loom_bundle(fx["bundle"], backend=backend)
    x = loom_input(fx["inputs"][0], net)
    assert tuple(x.shape) == (4, 8)
    out = loom_output(net(x), net)
    np.testing.assert_allclose(out, np.asarray(fx["outputs"][0], np.float32), **TOL)
    with pytest.raises(ConfigError, match="not batch_size=4"):
        loom_input(fx["inputs"][0][:-1], net)
    assert isinstance(net, Network)


def test_implicit_residual_register_as_explicit_residuals(backend):
    """Loom's ForwardCPU turns [RMSNorm, MHA, RMSNorm, SwiGLU] into a pre-norm block through
    a hidden register; ``implicit_residuals=True`` makes it explicit (and writes it back)."""
    from loomx.grid import Residual
    from loomx.layers import MultiHeadAttention, RMSNorm, SwiGLU

    t, d = 4, 8
    mha = dict(causal=True, rope_theta=1e6, q_bias=True, k_bias=True, v_bias=True, o_bias=True)
    loom_net = Network.chain([RMSNorm(), MultiHeadAttention(2, **mha), RMSNorm(), SwiGLU(12)],
                             input_shape=(t, d), backend=backend, seed=1)
    text = save_loom_bundle(loom_net, model_id="llama")
    assert [la["type"] for la in json.loads(text)["models"][0]["cfg"]["layers"]] == [
        "rms_norm", "multi_head_attention", "rms_norm", "swiglu"]
    net = load_loom_bundle(text, backend=backend, input_shape=(t, d), implicit_residuals=True)
    kinds = [la.type_name for _, la in net.layers()]
    assert kinds == ["rms_norm", "mha", "residual", "rms_norm", "swiglu", "residual"]
    assert (net[2].source, net[5].source) == (0, 3)
    explicit = Network.chain([RMSNorm(), MultiHeadAttention(2, **mha), Residual(0), RMSNorm(),
                              SwiGLU(12, bias=True), Residual(3)], input_shape=(t, d),
                             backend=backend)
    for p, q in zip(net.parameters(), explicit.parameters(), strict=True):
        q.value = p.value
    x = backend.from_host(np.random.default_rng(0).standard_normal((1, t, d)).astype(np.float32))
    assert_close(net(x), backend.to_host(explicit(x)), backend, rtol=1e-6, atol=1e-6)
    plain = load_loom_bundle(text, backend=backend, input_shape=(t, d))
    assert not np.allclose(backend.to_host(plain(x)), backend.to_host(net(x)))
    assert save_loom_bundle(net, model_id="llama") == text
