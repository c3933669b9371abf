"""Dropout, Flatten and Reshape: values, gradients, seeding, errors, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loomx.backends import get_backend

from loomx.errors import ConfigError, ShapeError
from loomx.layers import Dropout, Flatten, Reshape, layer_from_config
from tests.conftest import assert_close
from tests.gradcheck import finite_difference_check


def test_dropout_is_identity_in_evaluation(backend):
    layer = Dropout(0.7)
    layer.build((3, 4), backend)
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    y, ctx = layer.forward(backend.from_host(x))
    assert_close(y, x, backend, rtol=0, atol=0)
    assert_close(layer.backward(backend.from_host(x * 2), ctx), x * 2, backend, rtol=0, atol=0)


def test_dropout_training_is_inverted_and_backward_uses_the_same_mask(backend):
    rate = 0.25
    layer = Dropout(rate)
    layer.build((50, 40), backend, rng=3)
    x = np.random.default_rng(1).standard_normal((4, 50, 40)).astype(np.float32) + 3.0
    y, ctx = layer.forward(backend.from_host(x), train=True)
    y_host = backend.to_host(y)
    kept = y_host != 0
    assert abs(kept.mean() - (1 - rate)) < 0.01
    np.testing.assert_allclose(y_host[kept], x[kept] / (1 - rate), rtol=1e-6)
    dy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    dx = layer.backward(backend.from_host(dy), ctx)
    assert_close(dx, np.where(kept, dy / (1 - rate), 0.0), backend, rtol=1e-6)
    # the same mask through torch autograd of y = x * m
    m = torch.tensor(np.where(kept, 1 / (1 - rate), 0.0))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (xt * m).backward(torch.tensor(dy, dtype=torch.float64))
    assert_close(dx, xt.grad, backend, rtol=1e-6)


def test_dropout_masks_are_seeded_at_build_and_fresh_each_step(backend):
    x = backend.ones((2, 64))
    a, b = Dropout(0.5), Dropout(0.5)
    a.build((64,), backend, rng=7)
    b.build((64,), backend, rng=7)
    first = backend.to_host(a(x, train=True))
    assert_close(b(x, train=True), first, backend, rtol=0, atol=0)
    assert not np.array_equal(backend.to_host(a(x, train=True)), first)
    ref = Dropout(0.5)
    ref.build((64,), "numpy", rng=7)  # same seed, same masks on every backend
    np.testing.assert_array_equal(ref.backend.to_host(ref(ref.backend.ones((2, 64)),
                                                          train=True)), first)


def test_dropout_rate_zero_and_finite_differences(numpy64):
    layer = Dropout(0.0)
    layer.build((3,), numpy64)
    x = np.random.default_rng(0).standard_normal((2, 3))
    assert_close(layer(numpy64.from_host(x), train=True), x, numpy64, rtol=0, atol=0,
                 dtype=numpy64.xp.float64)
    finite_difference_check(layer, x, train=True)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_dropout_rejects_bad_rates(rate):
    with pytest.raises(ConfigError, match=r"Dropout rate.*\[0, 1\)"):
        Dropout(rate)


def test_flatten_and_reshape_round_trip_values_and_gradients(backend):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    flat = Flatten()
    assert flat.build((3, 4, 5), backend) == (60,)
    y, ctx = flat.forward(backend.from_host(x))
    assert_close(y, x.reshape(2, 60), backend, rtol=0, atol=0)
    assert_close(flat.backward(y, ctx), x, backend, rtol=0, atol=0)

    rs = Reshape((5, -1))
    assert rs.build((3, 4, 5), backend) == (5, 12)
    y, ctx = rs.forward(backend.from_host(x))
    assert_close(y, x.reshape(2, 5, 12), backend, rtol=0, atol=0)
    dy = np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32)
    assert_close(rs.backward(backend.from_host(dy), ctx), dy.reshape(x.shape), backend,
                 rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_reshape_matches_torch_on_drawn_shapes(shape, data):
    b = get_backend("numpy", "float64")
    n = int(np.prod(shape))
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    first = data.draw(st.sampled_from(divisors))
    target = (first, -1)
    layer = Reshape(target)
    layer.build(tuple(shape), b)
    x = np.random.default_rng(n).standard_normal((2, *shape))
    xt = torch.tensor(x, requires_grad=True)
    yt = xt.reshape(2, *target)
    y, ctx = layer.forward(b.from_host(x))
    np.testing.assert_array_equal(b.to_host(y), yt.detach().numpy())
    dy = np.random.default_rng(1).standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    np.testing.assert_array_equal(b.to_host(layer.backward(b.from_host(dy), ctx)),
                                  xt.grad.numpy())


def test_wrong_inputs_name_layer_and_shapes(backend):
    rs = Reshape((6,), name="r")
    rs.build((2, 3), backend)
    with pytest.raises(ShapeError, match=r"'r'.*\[B, 2, 3\].*\[4, 3, 2\]"):
        rs(backend.zeros((4, 3, 2)))
    flat = Flatten(name="f")
    flat.build((2, 3), backend)
    with pytest.raises(ShapeError, match=r"'f'.*\[B, 2, 3\].*\[4, 6\]"):
        flat(backend.zeros((4, 6)))
    drop = Dropout(name="d")
    drop.build((3,), backend)
    with pytest.raises(ShapeError, match=r"'d'.*\[B, 3\].*\[4, 2\]"):
        drop(backend.zeros((4, 2)), train=True)


def test_reshape_rejects_impossible_shapes():
    with pytest.raises(ShapeError, match=r"Reshape.*\[4, -1\].*\[2, 3\]"):
        Reshape((4, -1)).build((2, 3), "numpy")
    with pytest.raises(ShapeError, match=r"Reshape.*\[7\].*\[2, 3\].*6"):
        Reshape((7,)).build((2, 3), "numpy")
    with pytest.raises(ConfigError, match="at most one -1"):
        Reshape((-1, -1))


@pytest.mark.parametrize("layer", [Dropout(0.1, name="drop"), Flatten(), Reshape([2, -1])])
def test_config_round_trip(layer):
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    again = layer_from_config(cfg)
    assert again.get_config() == cfg
    assert again.build((4, 3), "numpy") == layer.build((4, 3), "numpy")
