"""Max/average pooling and global average pooling against PyTorch, on every backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from loomx.backends import get_backend

from loomx.errors import ConfigError, ShapeError
from loomx.layers import (
    AvgPool1D,
    AvgPool2D,
    Conv2D,
    GlobalAvgPool,
    MaxPool1D,
    MaxPool2D,
    layer_from_config,
)
from tests.conftest import assert_close
from tests.gradcheck import finite_difference_check

POOL = {("max", 1): (MaxPool1D, F.max_pool1d), ("max", 2): (MaxPool2D, F.max_pool2d),
        ("avg", 1): (AvgPool1D, F.avg_pool1d), ("avg", 2): (AvgPool2D, F.avg_pool2d)}

# (kind, spatial, kernel_size, stride, padding)
CASES = [
    ("max", (10,), 2, None, 0),
    ("max", (11,), 3, 2, 1),
    ("max", (9, 8), 2, None, 0),
    ("max", (9, 9), 3, 2, 1),
    ("max", (7, 10), (2, 3), (1, 2), (1, 1)),
    ("avg", (10,), 3, 1, 1),
    ("avg", (9,), 4, 3, 2),
    ("avg", (8, 8), 2, None, 0),
    ("avg", (9, 7), 3, 2, 1),
    ("avg", (6, 9), (3, 2), (1, 2), (1, 0)),
]


def _case_id(case):
    kind, spatial, k, s, p = case
    return f"{kind}{len(spatial)}d-k{k}-s{s}-p{p}"


def _torch_pool(kind, ndim, x, k, s, p, dy):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = POOL[(kind, ndim)][1](xt, k, s, p)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    return yt, xt.grad


def _check(backend, kind, spatial, k, s, p, x):
    ndim = len(spatial)
    layer = POOL[(kind, ndim)][0](k, s, p)
    out_shape = layer.build(x.shape[1:], backend)
    y, ctx = layer.forward(backend.from_host(x))
    dy = np.random.default_rng(1).standard_normal((x.shape[0], *out_shape))
    dx = layer.backward(backend.from_host(dy), ctx)
    yt, dxt = _torch_pool(kind, ndim, x, k, s, p, dy)
    assert_close(y, yt, backend)
    assert_close(dx, dxt, backend, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_pool_matches_torch(backend, case):
    kind, spatial, k, s, p = case
    x = np.random.default_rng(0).standard_normal((2, 3, *spatial))
    _check(backend, kind, spatial, k, s, p, x)


def test_max_pool_ties_go_to_the_first_maximum(backend):
    """Constant windows: the whole gradient lands on the first element, as in PyTorch."""
    x = np.zeros((1, 2, 4, 6))
    x[0, 1, 1:3, 2:5] = 5.0
    _check(backend, "max", (4, 6), 2, 2, 0, x)
    _check(backend, "max", (4, 6), 3, 1, 1, x)
    layer = MaxPool2D(2)
    layer.build((2, 4, 6), backend)
    y, ctx = layer.forward(backend.from_host(x))
    dx = backend.to_host(layer.backward(backend.ones(tuple(y.shape)), ctx))
    assert dx[0, 0].sum() == 6 and dx[0, 0, 0, 0] == 1 and dx[0, 0, 1, 1] == 0


def test_max_pool_padding_is_never_selected(backend):
    x = -np.ones((1, 1, 5, 5)) * 7.0  # all negative: zero padding would win, -inf must not
    layer = MaxPool2D(3, stride=2, padding=1)
    layer.build((1, 5, 5), backend)
    assert_close(layer(backend.from_host(x)), np.full((1, 1, 3, 3), -7.0), backend)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["max", "avg"]), ndim=st.integers(1, 2),
       k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2), size=st.integers(4, 9))
def test_pool_random_configurations(kind, ndim, k, s, p, size):
    p = min(p, k // 2)
    backend = get_backend("numpy", "float64")
    spatial = (size,) * ndim
    x = np.random.default_rng(size).standard_normal((2, 2, *spatial))
    _check(backend, kind, spatial, k, s, p, x)


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 4, 6, 9)], ids=_case_id)
def test_pool_finite_differences(numpy64, case):
    kind, spatial, k, s, p = case
    layer = POOL[(kind, len(spatial))][0](k, s, p)
    layer.build((2, *spatial), numpy64)
    x = np.random.default_rng(2).permutation(2 * 2 * int(np.prod(spatial))) * 0.01  # no ties
    finite_difference_check(layer, x.reshape(2, 2, *spatial), max_entries=30)


@pytest.mark.parametrize("spatial", [(7,), (5, 6), (3, 4, 5)])
def test_global_avg_pool_matches_adaptive_avg_pool(backend, spatial):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, *spatial))
    layer = GlobalAvgPool()
    assert layer.build((4, *spatial), backend) == (4,)
    y, ctx = layer.forward(backend.from_host(x))
    dy = rng.standard_normal((2, 4))
    dx = layer.backward(backend.from_host(dy), ctx)
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
    xt = torch.tensor(x, requires_grad=True)
    yt = pool[len(spatial)](xt, 1).reshape(2, 4)
    yt.backward(torch.tensor(dy))
    assert_close(y, yt, backend)
    assert_close(dx, xt.grad, backend)


def test_conv_pool_chain_matches_torch(backend):
    """Conv2D → MaxPool2D → Conv2D → AvgPool2D → GlobalAvgPool, forward and backward."""
    rng = np.random.default_rng(6)
    layers = [Conv2D(6, 3, padding=1, activation="relu"), MaxPool2D(2),
              Conv2D(4, 3, stride=2, padding="valid", groups=2, activation="tanh"),
              AvgPool2D(2, stride=1, padding=1), GlobalAvgPool()]
    shape = (3, 12, 12)
    for i, layer in enumerate(layers):
        shape = layer.build(shape, backend, rng=i)
    x = rng.standard_normal((2, 3, 12, 12))
    dy = rng.standard_normal((2, 4))
    h, ctxs = backend.from_host(x), []
    for layer in layers:
        h, ctx = layer.forward(h)
        ctxs.append(ctx)
    g = backend.from_host(dy)
    for layer, ctx in zip(reversed(layers), reversed(ctxs)):
        g = layer.backward(g, ctx)

    w = [torch.tensor(backend.to_host(layers[i].params["weight"]), dtype=torch.float64,
                      requires_grad=True) for i in (0, 2)]
    b = [torch.tensor(backend.to_host(layers[i].params["bias"]), dtype=torch.float64)
         for i in (0, 2)]
    xt = torch.tensor(x, requires_grad=True)
    t = F.max_pool2d(torch.relu(F.conv2d(xt, w[0], b[0], padding=1)), 2)
    t = torch.tanh(F.conv2d(t, w[1], b[1], stride=2, groups=2))
    t = F.adaptive_avg_pool2d(F.avg_pool2d(t, 2, 1, 1), 1).reshape(2, 4)
    t.backward(torch.tensor(dy))
    tol = dict(rtol=1e-4, atol=1e-5)
    assert_close(h, t, backend, **tol)
    assert_close(g, xt.grad, backend, **tol)
    assert_close(layers[0].grads["weight"], w[0].grad, backend, **tol)
    assert_close(layers[2].grads["weight"], w[1].grad, backend, **tol)


def test_float64_device_and_dtype_preserved(backend64):
    edge = np.array([2 / 3, 1, 1, 1, 1, 2 / 3])
    first = np.zeros((6, 6))
    first[::2, ::2] = 1.0
    cases = [  # layer, per-sample shape, expected y, expected dx (for dy = 1)
        (MaxPool2D(2), (3, 6, 6), np.ones((2, 3, 3, 3)), np.broadcast_to(first, (2, 3, 6, 6))),
        (AvgPool1D(3, 1, 1), (3, 6), np.broadcast_to(edge, (2, 3, 6)),
         np.broadcast_to(edge, (2, 3, 6))),
        (GlobalAvgPool(), (3, 6, 6), np.ones((2, 3)), np.full((2, 3, 6, 6), 1 / 36)),
    ]
    for layer, shape, want_y, want_dx in cases:
        layer.build(shape, backend64)
        y, ctx = layer.forward(backend64.from_host(np.ones((2, *shape))))
        dx = layer.backward(backend64.ones(tuple(y.shape)), ctx)
        assert_close(y, want_y, backend64, rtol=1e-12, atol=1e-12)
        assert_close(dx, want_dx, backend64, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", [MaxPool1D(3, 2, 1, name="p"), MaxPool2D([2, 3]),
                                   AvgPool1D(4), AvgPool2D(3, stride=(1, 2), padding=[1, 0]),
                                   GlobalAvgPool(name="gap")], ids=lambda layer: layer.type_name)
def test_config_round_trip(layer):
    config = layer.get_config()
    again = layer_from_config(json.loads(json.dumps(config)))
    assert type(again) is type(layer) and again.get_config() == config
    shape = (2, 9) if getattr(layer, "ndim", 2) == 1 else (2, 9, 9)
    backend = get_backend("numpy")
    assert again.build(shape, backend) == layer.build(shape, backend)


def test_wrong_input_shape_names_layer_and_shapes(backend):
    layer = MaxPool2D(2, name="pool")
    layer.build((3, 8, 8), backend)
    with pytest.raises(ShapeError, match=r"'pool'.*\[B, 3, 8, 8\].*\[2, 3, 8, 7\]"):
        layer.forward(backend.from_host(np.zeros((2, 3, 8, 7), np.float32)))


@pytest.mark.parametrize("make, shape, message", [
    (lambda: MaxPool2D(2, name="p"), (3, 8), r"'p'.*\[C, H, W\].*\[3, 8\]"),
    (lambda: AvgPool1D(5, name="p"), (3, 4), r"'p'.*\[3, 4\].*smaller"),
    (lambda: GlobalAvgPool(name="g"), (3,), r"'g'.*\[3\]"),
])
def test_bad_input_shape_at_build(make, shape, message):
    with pytest.raises(ShapeError, match=message):
        make().build(shape, get_backend("numpy"))


@pytest.mark.parametrize("make, message", [
    (lambda: MaxPool2D(2, padding=2), r"MaxPool2D padding 2.*half"),
    (lambda: AvgPool1D((2, 2)), r"AvgPool1D kernel_size"),
    (lambda: MaxPool1D(2, stride=0), r"MaxPool1D stride"),
])
def test_bad_config_raises(make, message):
    with pytest.raises(ConfigError, match=message):
        make()
