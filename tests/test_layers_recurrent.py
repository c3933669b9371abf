"""RNN, LSTM and GRU against torch.nn.RNN/LSTM/GRU and finite differences, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loomx.errors import ConfigError, ShapeError
from loomx.layers import GRU, LSTM, RNN, layer_from_config
from tests.conftest import assert_close, cudnn_tolerance
from tests.gradcheck import finite_difference_check

KINDS = {"rnn": (RNN, torch.nn.RNN), "lstm": (LSTM, torch.nn.LSTM), "gru": (GRU, torch.nn.GRU)}
B, T, I, H = 3, 5, 4, 6
TOL = dict(rtol=1e-4, atol=1e-5)


def _build(kind, backend, return_sequences=True, bias=True, seed=0):
    """A built layer with random (non-initial) parameters and host copies of them."""
    cls, _ = KINDS[kind]
    layer = cls(H, return_sequences=return_sequences, bias=bias, name=f"my_{kind}")
    layer.build((T, I), backend, rng=seed)
    rng = np.random.default_rng(seed + 10)
    host = {k: rng.standard_normal(tuple(v.shape)) * 0.5 for k, v in layer.params.items()}
    for k, v in host.items():
        layer.params[k] = backend.from_host(v)
    layer.zero_grad()
    return layer, {k: backend.to_host(layer.params[k]).astype(np.float64) for k in host}


def _torch_module(kind, host, bias=True):
    """The PyTorch module with the same weights (single bias → bias_ih, bias_hh = 0)."""
    _, tcls = KINDS[kind]
    m = tcls(I, H, batch_first=True, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.tensor(host["weight_ih"]))
        m.weight_hh_l0.copy_(torch.tensor(host["weight_hh"]))
        if bias and kind == "gru":
            m.bias_ih_l0.copy_(torch.tensor(host["bias_ih"]))
            m.bias_hh_l0.copy_(torch.tensor(host["bias_hh"]))
        elif bias:
            m.bias_ih_l0.copy_(torch.tensor(host["bias"]))
            m.bias_hh_l0.zero_()
    return m


def _torch_grads(kind, m, bias=True):
    g = {"weight_ih": m.weight_ih_l0.grad, "weight_hh": m.weight_hh_l0.grad}
    if bias and kind == "gru":
        g.update(bias_ih=m.bias_ih_l0.grad, bias_hh=m.bias_hh_l0.grad)
    elif bias:
        g["bias"] = m.bias_ih_l0.grad
    return {k: v.numpy() for k, v in g.items()}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("return_sequences", [True, False], ids=["seq", "last"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_recurrent_matches_torch(backend, kind, return_sequences, with_state):
    layer, host = _build(kind, backend, return_sequences)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    h0 = rng.standard_normal((B, H)).astype(np.float32)
    c0 = rng.standard_normal((B, H)).astype(np.float32)

    m = _torch_module(kind, host)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    h0t = torch.tensor(h0[None], dtype=torch.float64, requires_grad=True)
    c0t = torch.tensor(c0[None], dtype=torch.float64, requires_grad=True)
    if with_state:
        out, state = m(xt, (h0t, c0t) if kind == "lstm" else h0t)
    else:
        out, state = m(xt)
    yt = out if return_sequences else out[:, -1]
    dy = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.tensor(dy, dtype=torch.float64))

    init = None
    if with_state:
        h0d, c0d = backend.from_host(h0), backend.from_host(c0)
        init = (h0d, c0d) if kind == "lstm" else h0d
    y, ctx = layer.forward(backend.from_host(x), initial_state=init)
    dx = layer.backward(backend.from_host(dy), ctx)

    assert_close(y, yt, backend, **cudnn_tolerance(backend, TOL))
    assert_close(dx, xt.grad, backend, **cudnn_tolerance(backend, TOL))
    for k, g in _torch_grads(kind, m).items():
        assert_close(layer.grads[k], g, backend, **cudnn_tolerance(backend, TOL))
    final = layer.final_state(ctx)
    if kind == "lstm":
        assert_close(final[0], state[0][0], backend, **cudnn_tolerance(backend, TOL))
        assert_close(final[1], state[1][0], backend, **cudnn_tolerance(backend, TOL))
    else:
        assert_close(final, state[0], backend, **cudnn_tolerance(backend, TOL))
    if with_state:
        d_init = layer.initial_state_grad(ctx)
        if kind == "lstm":
            assert_close(d_init[0], h0t.grad[0], backend, **cudnn_tolerance(backend, TOL))
            assert_close(d_init[1], c0t.grad[0], backend, **cudnn_tolerance(backend, TOL))
        else:
            assert_close(d_init, h0t.grad[0], backend, **cudnn_tolerance(backend, TOL))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_recurrent_without_bias_matches_torch(backend, kind):
    layer, host = _build(kind, backend, bias=False)
    assert set(layer.params) == {"weight_ih", "weight_hh"}
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    m = _torch_module(kind, host, bias=False)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out, _ = m(xt)
    out.sum().backward()
    y, ctx = layer.forward(backend.from_host(x))
    dx = layer.backward(backend.ones(tuple(y.shape)), ctx)
    assert_close(y, out, backend, **cudnn_tolerance(backend, TOL))
    assert_close(dx, xt.grad, backend, **cudnn_tolerance(backend, TOL))
    for k, g in _torch_grads(kind, m, bias=False).items():
        assert_close(layer.grads[k], g, backend, **cudnn_tolerance(backend, TOL))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("return_sequences", [True, False], ids=["seq", "last"])
def test_recurrent_finite_differences(numpy64, kind, return_sequences):
    cls, _ = KINDS[kind]
    layer = cls(3, return_sequences=return_sequences)
    layer.build((4, 2), numpy64, rng=5)
    rng = np.random.default_rng(3)
    for k, v in list(layer.params.items()):
        layer.params[k] = numpy64.from_host(rng.standard_normal(tuple(v.shape)) * 0.5)
    finite_difference_check(layer, rng.standard_normal((2, 4, 2)))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_chunks_with_carried_state_equal_one_pass(backend, kind):
    """Feeding final_state back as initial_state (as the stepping executor does) is exact."""
    layer, _ = _build(kind, backend)
    x = np.random.default_rng(4).standard_normal((B, T, I)).astype(np.float32)
    full, _ = layer.forward(backend.from_host(x))
    state, parts = None, []
    for s in range(T):
        y, ctx = layer.forward(backend.from_host(x[:, s:s + 1]), initial_state=state)
        state = layer.final_state(ctx)
        parts.append(backend.to_host(y))
    assert_close(full, np.concatenate(parts, axis=1), backend, rtol=1e-5, atol=1e-6)


def _loom_rnn_bias_grad(x, w_ih, w_hh, b, dy):
    """Loom's RNN bias gradient (nn/rnn.go): an abandoned first loop adds un-propagated terms."""
    bsz, steps, _ = x.shape
    h = np.zeros((bsz, steps + 1, w_hh.shape[0]))
    for t in range(steps):
        h[:, t + 1] = np.tanh(x[:, t] @ w_ih.T + h[:, t] @ w_hh.T + b)
    db = np.zeros_like(b)
    for t in range(steps):  # the buggy first loop
        db += (dy[:, t] * (1 - h[:, t + 1] ** 2)).sum(0)
    dh_next = np.zeros((bsz, w_hh.shape[0]))
    for t in reversed(range(steps)):  # the correct BPTT loop, added on top
        da = (dy[:, t] + dh_next) * (1 - h[:, t + 1] ** 2)
        db += da.sum(0)
        dh_next = da @ w_hh
    return db


def test_rnn_bias_gradient_is_exact_unlike_loom(backend):
    layer, host = _build("rnn", backend)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    dy = np.ones((B, T, H), np.float32)
    m = _torch_module("rnn", host)
    out, _ = m(torch.tensor(x, dtype=torch.float64))
    out.backward(torch.tensor(dy, dtype=torch.float64))
    truth = m.bias_ih_l0.grad.numpy()
    _, ctx = layer.forward(backend.from_host(x))
    layer.backward(backend.from_host(dy), ctx)
    assert_close(layer.grads["bias"], truth, backend, **cudnn_tolerance(backend, TOL))
    loom = _loom_rnn_bias_grad(x.astype(np.float64), host["weight_ih"], host["weight_hh"],
                               host["bias"], dy)
    assert np.abs(loom - truth).max() > 0.1, "Loom's double-counted bias gradient differs"


def test_lstm_initialisation_like_loom(numpy64):
    layer = LSTM(8)
    layer.build((10, 5), numpy64, rng=0)
    bias = numpy64.to_host(layer.params["bias"])
    np.testing.assert_array_equal(bias, np.r_[np.zeros(8), np.ones(8), np.zeros(16)])
    w_ih = numpy64.to_host(layer.params["weight_ih"])
    assert w_ih.shape == (32, 5) and layer.params["weight_hh"].shape == (32, 8)
    assert abs(w_ih.std() - np.sqrt(2 / 13)) < 0.1
    assert layer.output_shape == (10, 8)


def test_gru_and_rnn_parameter_layouts(numpy64):
    gru = GRU(4, return_sequences=False)
    assert gru.build((7, 3), numpy64) == (4,)
    assert {k: tuple(v.shape) for k, v in gru.params.items()} == {
        "weight_ih": (12, 3), "weight_hh": (12, 4), "bias_ih": (12,), "bias_hh": (12,)}
    rnn = RNN(4)
    rnn.build((7, 3), numpy64)
    assert {k: tuple(v.shape) for k, v in rnn.params.items()} == {
        "weight_ih": (4, 3), "weight_hh": (4, 4), "bias": (4,)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_float64_and_device_preserved(backend64, kind):
    """float64 in, float64 out on the same device, equal to torch's float64 to 1e-10."""
    layer, host = _build(kind, backend64, return_sequences=False)
    x = np.random.default_rng(9).standard_normal((B, T, I))
    m = _torch_module(kind, host)
    xt = torch.tensor(x, requires_grad=True)
    out, _ = m(xt)
    out[:, -1].sum().backward()
    y, ctx = layer.forward(backend64.from_host(x))
    dx = layer.backward(backend64.ones((B, H)), ctx)
    tight = dict(rtol=1e-10, atol=1e-12)
    assert_close(y, out[:, -1], backend64, **tight)
    assert_close(dx, xt.grad, backend64, **tight)
    for k, g in _torch_grads(kind, m).items():
        assert_close(layer.grads[k], g, backend64, **tight)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_config_round_trip(kind):
    cls, _ = KINDS[kind]
    layer = cls(5, input_size=3, return_sequences=False, bias=False, name="r")
    cfg = layer.get_config()
    assert cfg["type"] == kind
    assert layer_from_config(cfg).get_config() == cfg


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_inputs_raise(backend, kind):
    cls, _ = KINDS[kind]
    layer = cls(4, name="enc")
    layer.build((5, 3), backend)
    with pytest.raises(ShapeError, match=r"'enc'.*\[B, T, 3\].*\[2, 5, 2\]"):
        layer.forward(backend.zeros((2, 5, 2)))
    with pytest.raises(ShapeError, match=r"'enc'.*\[B, T, 3\].*\[2, 3\]"):
        layer.forward(backend.zeros((2, 3)))
    bad = backend.zeros((2, 5))
    with pytest.raises(ShapeError, match=r"'enc'.*\[2, 4\].*\[2, 5\]"):
        layer.forward(backend.zeros((2, 5, 3)), initial_state=(bad, bad) if kind == "lstm"
                      else bad)
    with pytest.raises(ConfigError, match="hidden_size"):
        cls(0)
    with pytest.raises(ShapeError, match=r"\[T, I\]"):
        cls(2).build((3,), backend)
