"""Embedding: gather forward, scatter-add backward, id validation, errors, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loomx.backends import get_backend

from loomx.errors import ConfigError, LoomxError, ShapeError
from loomx.layers import Embedding, layer_from_config
from loomx.layers.embedding import validate_ids
from tests.conftest import assert_close
from tests.gradcheck import finite_difference_check


def _ids(backend, host):
    return backend.from_host(np.asarray(host, np.int64), dtype=backend.xp.int64)


@pytest.mark.parametrize("ids_shape", [(5,), (3, 4)])
def test_embedding_matches_torch_with_repeated_ids(backend, ids_shape):
    rng = np.random.default_rng(0)
    layer = Embedding(7, 4)
    layer.build(ids_shape[1:], backend, rng=1)
    ids = rng.integers(0, 7, size=ids_shape)
    ids.flat[:3] = 2  # repeated ids must add up in the gradient
    dy = rng.standard_normal((*ids_shape, 4)).astype(np.float32)
    layer.zero_grad()
    y, ctx = layer.forward(_ids(backend, ids))
    dx = layer.backward(backend.from_host(dy), ctx)
    assert dx is None

    w = torch.tensor(backend.to_host(layer.params["weight"]).astype(np.float64),
                     requires_grad=True)
    yt = torch.nn.functional.embedding(torch.tensor(ids), w)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    assert_close(y, yt.detach(), backend, rtol=0, atol=0)
    assert_close(layer.grads["weight"], w.grad, backend, rtol=1e-6, atol=1e-6)
    assert tuple(y.shape) == (*ids_shape, 4)


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), vocab=st.integers(1, 6),
       dim=st.integers(1, 5), seed=st.integers(0, 999))
def test_gradient_is_a_scatter_add_on_drawn_shapes(shape, vocab, dim, seed):
    b = get_backend("numpy", "float64")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=shape)
    dy = rng.standard_normal((*shape, dim))
    layer = Embedding(vocab, dim)
    layer.build(tuple(shape[1:]), b, rng=seed)
    y, ctx = layer.forward(_ids(b, ids))
    layer.backward(b.from_host(dy), ctx)
    expected = np.zeros((vocab, dim))
    np.add.at(expected, ids.reshape(-1), dy.reshape(-1, dim))
    np.testing.assert_allclose(b.to_host(layer.grads["weight"]), expected, atol=1e-12)
    np.testing.assert_array_equal(b.to_host(y), b.to_host(layer.params["weight"])[ids])


def test_finite_differences_of_the_table(numpy64):
    layer = Embedding(5, 3)
    layer.build((4,), numpy64, rng=2)
    ids = np.array([[0, 4, 4, 1], [2, 2, 2, 3]], np.int64)
    finite_difference_check(layer, ids)


def test_out_of_range_ids_are_errors_at_the_data_edge(backend):
    layer = Embedding(10, 3, name="tok")
    layer.build((4,), backend)
    layer.validate_ids(np.array([[0, 9, 3, 1]]))
    layer.validate_ids(_ids(backend, [[0, 9, 3, 1]]))  # device ids: one explicit host copy
    with pytest.raises(ShapeError, match=r"'tok'.*id 10 at position \[1, 2\].*\[2, 4\].*"
                                         r"\[0, 10\)"):
        layer.validate_ids(np.array([[0, 1, 2, 3], [4, 5, 10, 11]]))
    with pytest.raises(ShapeError, match=r"id -1 at position \[0, 0\]"):
        layer.validate_ids(_ids(backend, [[-1, 0, 0, 0]]))
    with pytest.raises(ShapeError, match="integer"):
        layer.validate_ids([[1.5, 2.0, 0.0, 0.0]])
    with pytest.raises(LoomxError, match="out of range"):
        validate_ids([3, 7], num_embeddings=5)


def test_forward_never_returns_a_silent_row_for_a_bad_id(backend):
    """Out-of-range ids that reach the device give NaN rows, never zeros or a wrapped row."""
    layer = Embedding(4, 2)
    layer.build((4,), backend, rng=0)
    y, ctx = layer.forward(_ids(backend, [[1, -1, 4, 3]]))
    host = backend.to_host(y)
    w = backend.to_host(layer.params["weight"])
    np.testing.assert_array_equal(host[0, [0, 3]], w[[1, 3]])
    assert np.isnan(host[0, [1, 2]]).all()
    layer.backward(backend.ones((1, 4, 2)), ctx)
    g = backend.to_host(layer.grads["weight"])
    np.testing.assert_array_equal(g, [[0, 0], [1, 1], [0, 0], [1, 1]])


def test_float_ids_are_rejected_with_the_fix(backend):
    layer = Embedding(4, 2, name="emb")
    layer.build((3,), backend)
    with pytest.raises(ShapeError, match=r"'emb'.*integer.*float.*astype"):
        layer(backend.zeros((2, 3)))
    with pytest.raises(ShapeError, match=r"'emb'.*batch axis.*0-d"):
        layer(backend.xp.asarray(1, dtype=backend.xp.int64, device=backend.device))


@pytest.mark.parametrize("ids_shape", [(2, 1), (2, 9), (3,), (2, 3, 2)])
def test_any_id_shape_after_build_shares_one_table(backend, ids_shape):
    rng = np.random.default_rng(3)
    layer = Embedding(11, 4)
    layer.build((5,), backend, rng=2)  # built for T=5; prompts and decoding steps differ
    ids = rng.integers(0, 11, size=ids_shape)
    dy = rng.standard_normal((*ids_shape, 4)).astype(np.float32)
    layer.zero_grad()
    y, ctx = layer.forward(_ids(backend, ids))
    layer.backward(backend.from_host(dy), ctx)

    w = torch.tensor(backend.to_host(layer.params["weight"]).astype(np.float64),
                     requires_grad=True)
    yt = torch.nn.functional.embedding(torch.tensor(ids), w)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    assert tuple(y.shape) == (*ids_shape, 4)
    assert y.dtype == backend.xp.float32
    assert_close(y, yt.detach(), backend, rtol=0, atol=0)
    assert_close(layer.grads["weight"], w.grad, backend, rtol=1e-6, atol=1e-6)
    assert layer.input_shape == (5,) and layer.output_shape == (5, 4)


def test_unbuilt_embedding_names_the_fix(backend):
    with pytest.raises(LoomxError, match="not built"):
        Embedding(3, 2)(_ids(backend, [[1]]))


def test_float64_table_on_request(backend64):
    layer = Embedding(3, 2)
    layer.build((), backend64)
    y = layer(_ids(backend64, [2, 0]))
    assert y.dtype == backend64.xp.float64 and tuple(y.shape) == (2, 2)


def test_initialisation_schemes():
    layer = Embedding(2000, 8)
    layer.build((1,), "numpy", rng=0)
    w = layer.backend.to_host(layer.params["weight"])
    assert abs(w.std() - 0.02) < 0.002  # "normal": N(0, 0.02)
    zeros = Embedding(3, 2, init="zeros")
    zeros.build((1,), "numpy")
    assert not zeros.backend.to_host(zeros.params["weight"]).any()


def test_bad_config_and_round_trip():
    with pytest.raises(ConfigError, match="num_embeddings"):
        Embedding(0, 4)
    with pytest.raises(ConfigError, match="init"):
        Embedding(3, 4, init="nope").build((1,), "numpy")
    layer = Embedding(30, 8, init="xavier", name="wte")
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert layer_from_config(cfg).get_config() == cfg
