"""Dense and Activation layers against PyTorch and finite differences, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loomx.errors import ShapeError
from loomx.layers import ACTIVATIONS, Activation, Dense, layer_from_config
from tests.conftest import assert_close
from tests.gradcheck import finite_difference_check, run_layer, torch_params

TORCH_ACT = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "scaled_relu": lambda z: torch.relu(1.1 * z),
    "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.01),
    "loom_leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.1),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softplus": torch.nn.functional.softplus,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "mish": torch.nn.functional.mish,
}


@pytest.mark.parametrize("activation", sorted(TORCH_ACT))
def test_dense_matches_torch(backend, activation):
    rng = np.random.default_rng(1)
    layer = Dense(5, activation=activation)
    layer.build((7,), backend, rng=3)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    dy = rng.standard_normal((4, 5)).astype(np.float32)
    y, dx, grads = run_layer(layer, x, dy)

    p = torch_params(layer)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = TORCH_ACT[activation](xt @ p["weight"].T + p["bias"])
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(y, yt.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(grads["weight"], p["weight"].grad.numpy(), **tol)
    np.testing.assert_allclose(grads["bias"], p["bias"].grad.numpy(), **tol)


def test_dense_device_dtype_and_sequence_input(backend):
    layer = Dense(3, bias=False)
    layer.build((6, 4), backend)
    assert layer.output_shape == (6, 3)
    x = backend.from_host(np.ones((2, 6, 4), np.float32))
    y, ctx = layer.forward(x)
    dx = layer.backward(backend.ones((2, 6, 3)), ctx)
    w = backend.to_host(layer.params["weight"])
    assert_close(y, np.ones((2, 6, 4)) @ w.T, backend)
    assert_close(dx, np.ones((2, 6, 3)) @ w, backend)


@pytest.mark.parametrize("activation", sorted(TORCH_ACT))
def test_dense_finite_differences(numpy64, activation):
    layer = Dense(4, activation=activation)
    layer.build((3,), numpy64, rng=0)
    x = np.random.default_rng(2).standard_normal((2, 3)) + 0.05  # keep off kinks
    finite_difference_check(layer, x)


def test_dense_rejects_wrong_width(backend):
    layer = Dense(3, name="fc")
    layer.build((4,), backend)
    with pytest.raises(ShapeError, match=r"'fc'.*\[B, \.\.\., 4\].*\[2, 5\]"):
        layer.forward(backend.from_host(np.zeros((2, 5), np.float32)))


def test_dense_config_round_trip():
    layer = Dense(3, in_features=4, bias=False, activation="tanh", init="xavier", name="a")
    again = layer_from_config(layer.get_config())
    assert again.get_config() == layer.get_config()


def test_activation_layer_all_names(backend):
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(2, 6)
    for name in sorted(set(a.name for a in ACTIVATIONS.values())):
        layer = Activation(name)
        layer.build((6,), backend)
        y, dx, _ = run_layer(layer, x, np.ones((2, 6), np.float32))
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        yt = TORCH_ACT[name](xt)
        yt.sum().backward()
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_float64_on_request(backend64):
    layer = Dense(2)
    layer.build((3,), backend64)
    y = layer(backend64.from_host(np.ones((1, 3))))
    assert y.dtype == backend64.xp.float64


@pytest.mark.parametrize("activation", sorted(TORCH_ACT))
def test_activation_extreme_inputs_match_torch(backend, activation):
    """Large |z| neither overflows nor loses the value: forward and derivative match torch."""
    z = np.array([[-200.0, -60.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 60.0, 200.0]], np.float32)
    layer = Activation(activation)
    layer.build((z.shape[1],), backend)
    y, ctx = layer.forward(backend.from_host(z))
    dz = layer.backward(backend.ones(z.shape), ctx)
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    yt = TORCH_ACT[activation](zt)
    yt.backward(torch.ones_like(zt))
    # relative tolerance for large outputs, absolute below one float32 ulp of 1 for tiny ones
    assert_close(y, yt.detach().numpy(), backend, rtol=1e-6, atol=1e-7)
    assert_close(dz, zt.grad.numpy(), backend, rtol=1e-6, atol=1e-7)


def test_linear_flattens_leading_axes_and_takes_empty_inputs(backend):
    from loomx.layers.dense import linear, rows_matmul

    xp = backend.xp
    x = backend.from_host(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    w = backend.from_host(np.arange(20, dtype=np.float32).reshape(5, 4) / 10)
    expected = np.arange(24, dtype=np.float32).reshape(2, 3, 4) @ (
        np.arange(20, dtype=np.float32).reshape(5, 4).T / 10)
    assert_close(linear(xp, x, w), expected, backend)
    assert tuple(linear(xp, x[:0, ...], w).shape) == (0, 3, 5)
    empty_k = rows_matmul(xp, backend.zeros((2, 3, 0)), backend.zeros((0, 5)))
    assert_close(empty_k, np.zeros((2, 3, 5), np.float32), backend)
