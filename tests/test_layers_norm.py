"""LayerNorm and RMSNorm: PyTorch oracle, finite differences, Loom fixture, errors, configs."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loomx.backends import get_backend

from loomx.errors import ConfigError, ShapeError
from loomx.layers import LayerNorm, RMSNorm, layer_from_config
from tests.conftest import LOOM_FIXTURES, assert_close
from tests.gradcheck import finite_difference_check, run_layer, torch_params

FIXTURES = LOOM_FIXTURES

LN_CASES = [dict(), dict(eps=1e-3), dict(bias=False), dict(affine=False)]
RMS_CASES = [dict(), dict(eps=1e-5), dict(unit_offset=True)]


def _randomise(layer, backend, seed=0):
    """Give every parameter random values so that their gradients matter."""
    rng = np.random.default_rng(seed)
    for ref in layer.parameters():
        ref.value = backend.from_host(rng.standard_normal(tuple(ref.value.shape)) * 0.5 + 1.0)


def torch_layer_norm(x, p, opts):
    d = x.shape[-1]
    w = p.get("weight") if opts.get("affine", True) else None
    b = p.get("bias") if opts.get("affine", True) and opts.get("bias", True) else None
    return torch.nn.functional.layer_norm(x, (d,), w, b, opts.get("eps", 1e-5))


def torch_rms_norm(x, p, opts):
    scale = 1 + p["weight"] if opts.get("unit_offset") else p["weight"]
    r = torch.rsqrt((x * x).mean(-1, keepdim=True) + opts.get("eps", 1e-6))
    return x * r * scale


@pytest.mark.parametrize("cls, opts, ref", [
    *[(LayerNorm, o, torch_layer_norm) for o in LN_CASES],
    *[(RMSNorm, o, torch_rms_norm) for o in RMS_CASES]])
def test_norm_matches_torch(backend, cls, opts, ref):
    rng = np.random.default_rng(1)
    layer = cls(**opts)
    layer.build((3, 8), backend)
    _randomise(layer, backend)
    x = (rng.standard_normal((2, 3, 8)) * 2 + 0.5).astype(np.float32)
    dy = rng.standard_normal((2, 3, 8)).astype(np.float32)
    layer.zero_grad()
    y, ctx = layer.forward(backend.from_host(x))
    dx = layer.backward(backend.from_host(dy), ctx)

    p = torch_params(layer)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = ref(xt, p, opts)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    tol = dict(rtol=1e-4, atol=2e-5)
    assert_close(y, yt.detach(), backend, **tol)
    assert_close(dx, xt.grad, backend, **tol)
    assert set(layer.grads) == set(p)
    for name, t in p.items():
        assert_close(layer.grads[name], t.grad, backend, **tol)


@settings(max_examples=15, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), d=st.integers(1, 9),
       unit_offset=st.booleans(), seed=st.integers(0, 999))
def test_norms_on_drawn_shapes_match_torch(lead, d, unit_offset, seed):
    b = get_backend("numpy", "float64")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *lead, d)) * 3
    dy = rng.standard_normal(x.shape)
    for layer, ref, opts in ((LayerNorm(), torch_layer_norm, {}),
                             (RMSNorm(unit_offset=unit_offset), torch_rms_norm,
                              {"unit_offset": unit_offset})):
        layer.build(x.shape[1:], b)
        _randomise(layer, b, seed)
        y, dx, grads = run_layer(layer, x, dy)
        p = torch_params(layer)
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt, p, opts)
        yt.backward(torch.tensor(dy))
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-7, atol=1e-9)
        for name, t in p.items():
            np.testing.assert_allclose(grads[name], t.grad.numpy(), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("cls, opts", [*[(LayerNorm, o) for o in LN_CASES],
                                       *[(RMSNorm, o) for o in RMS_CASES]])
def test_norm_finite_differences(numpy64, cls, opts):
    layer = cls(**opts)
    layer.build((2, 5), numpy64)
    _randomise(layer, numpy64, 3)
    x = np.random.default_rng(2).standard_normal((3, 2, 5))
    finite_difference_check(layer, x)


def test_initial_parameters_make_the_identity_scale(backend):
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    plain = RMSNorm()
    gemma = RMSNorm(unit_offset=True)
    for layer in (plain, gemma):
        layer.build((6,), backend)
    assert_close(gemma.params["weight"], np.zeros(6), backend)
    assert_close(plain.params["weight"], np.ones(6), backend)
    assert_close(gemma(backend.from_host(x)), backend.to_host(plain(backend.from_host(x))),
                 backend)
    ln = LayerNorm()
    ln.build((6,), backend)
    y = backend.to_host(ln(backend.from_host(x)))
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-6)
    np.testing.assert_allclose(y.var(-1), 1, rtol=1e-3)


def test_norms_reproduce_loom_fixture(backend):
    fx = json.loads((FIXTURES / "norms.json").read_text())
    bundle = json.loads(fx["bundle"])["models"][0]
    weights = json.loads(base64.b64decode(bundle["weights"]["data"]))["layers"]
    acts = [np.asarray(a, np.float32).reshape(3, 10) for a in fx["activations_first_input"][:5]]
    ln = LayerNorm(eps=bundle["cfg"]["layers"][1]["epsilon"])
    ln.build((10,), backend)
    ln.params["weight"] = backend.from_host(np.asarray(weights[1]["gamma"], np.float32))
    ln.params["bias"] = backend.from_host(np.asarray(weights[1]["beta"], np.float32))
    assert_close(ln(backend.from_host(acts[1])), acts[2], backend, rtol=1e-5, atol=1e-6)
    rms = RMSNorm()  # Loom computes with 1e-6 when the file stores no epsilon
    rms.build((10,), backend)
    rms.params["weight"] = backend.from_host(np.asarray(weights[3]["gamma"], np.float32))
    assert_close(rms(backend.from_host(acts[3])), acts[4], backend, rtol=1e-5, atol=1e-6)


def test_gradients_accumulate_across_backward_calls(backend):
    layer = LayerNorm()
    layer.build((4,), backend)
    x = backend.from_host(np.arange(8, dtype=np.float32).reshape(2, 4) ** 1.5)
    y, ctx = layer.forward(x)
    layer.backward(backend.ones((2, 4)), ctx)
    once = backend.to_host(layer.grads["weight"])
    layer.backward(backend.ones((2, 4)), ctx)
    assert_close(layer.grads["weight"], 2 * once, backend)


def test_float64_on_request(backend64):
    for layer in (LayerNorm(), RMSNorm()):
        layer.build((3,), backend64)
        y, ctx = layer.forward(backend64.from_host(np.array([[1.0, 2.0, 4.0]])))
        dx = layer.backward(backend64.ones((1, 3)), ctx)
        assert y.dtype == dx.dtype == layer.params["weight"].dtype == backend64.xp.float64


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
def test_wrong_width_names_layer_and_shapes(backend, cls):
    layer = cls(name="norm1")
    layer.build((4,), backend)
    with pytest.raises(ShapeError, match=r"'norm1'.*\[B, \.\.\., 4\].*\[2, 5\]"):
        layer(backend.zeros((2, 5)))


def test_bad_config_and_unbuilt_use():
    with pytest.raises(ConfigError, match="eps"):
        LayerNorm(eps=0)
    with pytest.raises(ConfigError, match="eps"):
        RMSNorm(eps=-1.0)
    with pytest.raises(ShapeError, match="RMSNorm"):
        RMSNorm().build((), "numpy")


@pytest.mark.parametrize("layer", [LayerNorm(eps=1e-3, bias=False, name="ln"),
                                   LayerNorm(affine=False), RMSNorm(unit_offset=True)])
def test_config_round_trip(layer):
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    again = layer_from_config(cfg)
    assert again.get_config() == cfg
    again.build((5,), "numpy")
    layer.build((5,), "numpy")
    assert sorted(again.params) == sorted(layer.params)
