"""SwiGLU and MLPBlock: PyTorch oracle, finite differences, parameters, errors, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loomx.backends import get_backend

from loomx.errors import ConfigError, ShapeError
from loomx.layers import MLPBlock, SwiGLU, layer_from_config
from tests.conftest import assert_close
from tests.gradcheck import finite_difference_check, run_layer, torch_params

F = torch.nn.functional
TORCH_ACT = {"gelu": F.gelu, "relu": torch.relu, "tanh": torch.tanh, "silu": F.silu,
             "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}


def _linear(x, p, prefix):
    return F.linear(x, p[f"{prefix}_weight"], p.get(f"{prefix}_bias"))


def torch_swiglu(x, p):
    return _linear(F.silu(_linear(x, p, "gate")) * _linear(x, p, "up"), p, "down")


def torch_gated(activation):
    def ref(x, p):
        return _linear(TORCH_ACT[activation](_linear(x, p, "gate")) * _linear(x, p, "up"), p,
                       "down")
    return ref


def torch_mlp(x, p, activation):
    return _linear(TORCH_ACT[activation](_linear(x, p, "up")), p, "down")


def _randomise_biases(layer, backend, seed=0):
    rng = np.random.default_rng(seed)
    for ref in layer.parameters():
        if ref.name.endswith("bias"):
            ref.value = backend.from_host(rng.standard_normal(tuple(ref.value.shape)) * 0.3)


def _check_against_torch(backend, layer, ref, x, dy, tol):
    layer.zero_grad()
    y, ctx = layer.forward(backend.from_host(x))
    dx = layer.backward(backend.from_host(dy), ctx)
    p = torch_params(layer)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = ref(xt, p)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    assert_close(y, yt.detach(), backend, **tol)
    assert_close(dx, xt.grad, backend, **tol)
    assert set(layer.grads) == set(p)
    for name, t in p.items():
        assert_close(layer.grads[name], t.grad, backend, **tol)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_matches_torch(backend, bias):
    rng = np.random.default_rng(0)
    layer = SwiGLU(12, bias=bias)
    layer.build((3, 8), backend, rng=1)
    _randomise_biases(layer, backend)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    dy = rng.standard_normal((2, 3, 8)).astype(np.float32)
    _check_against_torch(backend, layer, torch_swiglu, x, dy, dict(rtol=1e-4, atol=2e-5))


@pytest.mark.parametrize("activation, bias", [("gelu_tanh", False), ("gelu_tanh", True),
                                              ("gelu", True), ("relu", False)])
def test_gated_activation_matches_torch(backend, activation, bias):
    rng = np.random.default_rng(4)
    layer = SwiGLU(10, bias=bias, activation=activation)
    layer.build((3, 6), backend, rng=2)
    _randomise_biases(layer, backend, seed=5)
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    dy = rng.standard_normal((2, 3, 6)).astype(np.float32)
    _check_against_torch(backend, layer, torch_gated(activation), x, dy,
                         dict(rtol=1e-4, atol=2e-5))


def test_default_activation_is_silu_and_old_configs_load():
    assert SwiGLU(4).get_config()["activation"] == "silu"
    old = layer_from_config({"type": "swiglu", "hidden_features": 4, "bias": False})
    assert old.activation == "silu"
    b = get_backend("numpy", "float64")
    x = np.random.default_rng(0).standard_normal((2, 3))
    silu, named = SwiGLU(4), SwiGLU(4, activation="swish")
    for layer in (silu, named):
        layer.build((3,), b, rng=7)
    np.testing.assert_array_equal(silu(b.from_host(x)), named(b.from_host(x)))


@pytest.mark.parametrize("activation, bias", [("gelu", True), ("relu", False), ("tanh", True),
                                              ("silu", True), ("gelu_tanh", False)])
def test_mlp_matches_torch(backend, activation, bias):
    rng = np.random.default_rng(2)
    layer = MLPBlock(10, activation=activation, bias=bias)
    layer.build((6,), backend, rng=3)
    _randomise_biases(layer, backend)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    dy = rng.standard_normal((4, 6)).astype(np.float32)
    _check_against_torch(backend, layer, lambda xt, p: torch_mlp(xt, p, activation), x, dy,
                         dict(rtol=1e-4, atol=2e-5))


@settings(max_examples=15, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=2), d=st.integers(1, 7), m=st.integers(1, 9),
       bias=st.booleans(), seed=st.integers(0, 999))
def test_blocks_on_drawn_shapes_match_torch(lead, d, m, bias, seed):
    b = get_backend("numpy", "float64")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *lead, d))
    dy = rng.standard_normal(x.shape)
    for layer, ref in ((SwiGLU(m, bias=bias), torch_swiglu),
                       (MLPBlock(m, activation="silu", bias=bias),
                        lambda xt, p: torch_mlp(xt, p, "silu"))):
        layer.build(x.shape[1:], b, rng=seed)
        y, dx, grads = run_layer(layer, x, dy)
        p = torch_params(layer)
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt, p)
        yt.backward(torch.tensor(dy))
        assert y.shape == x.shape
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
        for name, t in p.items():
            np.testing.assert_allclose(grads[name], t.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_float64_gelu_block_is_accurate_to_float64_on_numpy(numpy64):
    layer = MLPBlock(16)  # exact GELU through backend.erf
    layer.build((8,), numpy64, rng=4)
    x = np.random.default_rng(5).standard_normal((64, 8)) * 3
    dy = np.random.default_rng(6).standard_normal((64, 8))
    y, dx, grads = run_layer(layer, x, dy)
    p = torch_params(layer)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch_mlp(xt, p, "gelu")
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("layer", [SwiGLU(5), SwiGLU(5, bias=True),
                                   SwiGLU(5, bias=True, activation="gelu_tanh"), MLPBlock(5),
                                   MLPBlock(5, activation="mish", bias=False)])
def test_finite_differences(numpy64, layer):
    layer.build((2, 4), numpy64, rng=0)
    _randomise_biases(layer, numpy64)
    finite_difference_check(layer, np.random.default_rng(1).standard_normal((3, 2, 4)))


def test_parameter_layouts_follow_the_catalogue(backend):
    sw = SwiGLU(7, bias=True)
    sw.build((3,), backend)
    shapes = {k: tuple(v.shape) for k, v in sw.params.items()}
    assert shapes == {"gate_weight": (7, 3), "up_weight": (7, 3), "down_weight": (3, 7),
                      "gate_bias": (7,), "up_bias": (7,), "down_bias": (3,)}
    mlp = MLPBlock(7)
    mlp.build((3,), backend)
    shapes = {k: tuple(v.shape) for k, v in mlp.params.items()}
    assert shapes == {"up_weight": (7, 3), "up_bias": (7,), "down_weight": (3, 7),
                      "down_bias": (3,)}
    assert mlp.param_count() == 7 * 3 * 2 + 7 + 3
    w = backend.to_host(sw.params["gate_weight"])
    assert np.abs(w).max() <= 1 / np.sqrt(3)  # the "torch" uniform scheme


def test_same_seed_same_weights_on_every_backend(backend):
    layer = SwiGLU(4)
    layer.build((3,), backend, rng=11)
    ref = SwiGLU(4)
    ref.build((3,), "numpy", rng=11)
    for k in layer.params:
        assert_close(layer.params[k], ref.backend.to_host(ref.params[k]), backend, rtol=0,
                     atol=0)


def test_float64_on_request(backend64):
    for layer in (SwiGLU(3), MLPBlock(3)):
        layer.build((2,), backend64)
        y, ctx = layer.forward(backend64.ones((1, 2)))
        dx = layer.backward(backend64.ones((1, 2)), ctx)
        assert y.dtype == dx.dtype == backend64.xp.float64


@pytest.mark.parametrize("cls", [SwiGLU, MLPBlock])
def test_wrong_width_names_layer_and_shapes(backend, cls):
    layer = cls(8, name="ffn")
    layer.build((4,), backend)
    with pytest.raises(ShapeError, match=r"'ffn'.*\[B, \.\.\., 4\].*\[2, 3, 6\]"):
        layer(backend.zeros((2, 3, 6)))


def test_bad_configs():
    with pytest.raises(ConfigError, match="hidden_features"):
        SwiGLU(0)
    with pytest.raises(ConfigError, match="unknown activation 'nope'"):
        SwiGLU(4, activation="nope")
    with pytest.raises(ConfigError, match="activation"):
        MLPBlock(4, activation="nope")
    with pytest.raises(ConfigError, match="mlp"):
        layer_from_config({"type": "mlp", "hidden_features": 3, "gate": True})


@pytest.mark.parametrize("layer", [SwiGLU(6, bias=True, name="s"),
                                   SwiGLU(6, activation="gelu_tanh"),
                                   MLPBlock(6, activation="relu", bias=False)])
def test_config_round_trip(layer):
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert layer_from_config(cfg).get_config() == cfg
