"""Grid network: addressing, order, activations, disable, config, moves, errors, introspection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from loomx.backends import get_backend

from loomx.errors import ConfigError, LoomxError, ShapeError
from loomx.grid import Network, Parallel
from loomx.layers import Activation, Dense
from loomx.layers.base import accepts_need_input_grad
from tests.conftest import assert_close
from tests.gradcheck import torch_params


def _mlp(backend, **kw):
    layers = [Dense(6, activation="tanh"), None, Dense(5, activation="sigmoid"),
              Activation("relu"), Dense(3)]
    return Network(1, 3, 2, layers=layers, input_shape=(4,), backend=backend, seed=1, **kw)


def _torch_chain(net, x, skip_disabled=True):
    h = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    params = {}
    out = h
    for i, layer in net.layers():
        if layer.disabled and skip_disabled:
            continue
        if isinstance(layer, Dense):
            p = torch_params(layer)
            params[i] = p
            out = out @ p["weight"].T + p["bias"]
            out = {"tanh": torch.tanh, "sigmoid": torch.sigmoid,
                   "identity": lambda z: z}[layer.activation](out)
        else:
            out = torch.relu(out)
    return h, out, params


def test_addressing_and_flat_order():
    net = Network(2, 3, 4)
    assert net.size == 24
    for r in range(2):
        for c in range(3):
            for li in range(4):
                i = net.flat_index(r, c, li)
                assert i == r * 3 * 4 + c * 4 + li
                assert net.position(i) == (r, c, li)
    dense = Dense(2)
    net[(1, 2, 3)] = dense
    assert net[23] is dense and net.get_layer(1, 2, 3) is dense
    assert [i for i, _ in net.layers()] == [23]
    with pytest.raises(LoomxError, match="col 3 out of range"):
        net[(0, 3, 0)]  # Loom silently aliases another row here
    with pytest.raises(LoomxError, match="flat index 24"):
        net[24]


def test_forward_backward_match_torch_and_activations(backend):
    net = _mlp(backend)
    assert net.output_shape == (3,) and net.depth == 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    dy = rng.standard_normal((5, 3)).astype(np.float32)
    y, ctx = net.forward(backend.from_host(x))
    dx = net.backward(backend.from_host(dy), ctx)
    h, yt, params = _torch_chain(net, x)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    assert_close(y, yt, backend, rtol=1e-5, atol=1e-5)
    assert_close(dx, h.grad, backend, rtol=1e-5, atol=1e-5)
    for i, p in params.items():
        assert_close(net[i].grads["weight"], p["weight"].grad, backend, rtol=1e-4, atol=1e-5)
    # activations: [input, output of slot 0, ..., output of slot 5]; slot 1 empty = identity
    assert len(net.activations) == net.size + 1
    assert net.activations[2] is net.activations[1]
    assert_close(net.activations[-1], yt, backend, rtol=1e-5, atol=1e-5)
    assert len(net.activation_grads) == net.size + 1
    assert_close(net.activation_grads[0], h.grad, backend, rtol=1e-5, atol=1e-5)


def test_disabled_layer_is_identity_forward_and_backward(backend):
    net = _mlp(backend)
    net[3].disabled = True  # the relu activation
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    y, ctx = net.forward(backend.from_host(x))
    dx = net.backward(backend.ones((2, 3)), ctx)
    h, yt, _ = _torch_chain(net, x)
    yt.backward(torch.ones((2, 3), dtype=torch.float64))
    assert_close(y, yt, backend, rtol=1e-5, atol=1e-5)
    assert_close(dx, h.grad, backend, rtol=1e-5, atol=1e-5)
    assert net.depth == 3


def test_disabling_a_shape_changing_layer_is_rejected(backend):
    net = Network.chain([Dense(3), Dense(2)])
    net[0].disabled = True
    with pytest.raises(ShapeError, match="disabled"):
        net.build((4,), backend)


def test_disabled_layer_gets_no_gradient(backend):
    net = Network.chain([Dense(4), Dense(4), Dense(2)], input_shape=(4,), backend=backend)
    net[1].disabled = True
    y, ctx = net.forward(backend.ones((3, 4)))
    net.backward(backend.ones((3, 2)), ctx)
    assert np.all(backend.to_host(net[1].grads["weight"]) == 0)
    assert np.any(backend.to_host(net[0].grads["weight"]) != 0)


def test_config_dict_round_trip(backend):
    net = _mlp(backend)
    net[3].disabled = True
    cfg = json.loads(json.dumps(net.get_config()))
    again = Network.from_dict(cfg, backend=backend)
    assert again.output_shape == (3,) and again[3].disabled
    assert [type(layer) for _, layer in again.layers()] == [type(la) for _, la in net.layers()]
    # same seed -> same weights
    for p, q in zip(net.parameters(), again.parameters(), strict=True):
        assert_close(q.value, backend.to_host(p.value), backend, rtol=0, atol=0)
    short = Network.from_dict({"grid_rows": 1, "grid_cols": 2, "layers_per_cell": 1,
                               "input_shape": [3],
                               "layers": [{"type": "dense", "out_features": 2}, None]},
                              backend=backend)
    assert short.output_shape == (2,)


def test_move_between_backends_and_dtypes(backend):
    net = _mlp(backend)
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    y0 = backend.to_host(net(backend.from_host(x)))
    net.to("numpy", "float64")
    b64 = get_backend("numpy", "float64")
    for p in net.parameters():
        assert p.value.dtype == np.float64 and p.grad.dtype == np.float64
    y1 = net(b64.from_host(x))
    assert_close(y1, y0, b64, rtol=1e-5, atol=1e-6)
    net.to(backend)
    assert_close(net(backend.from_host(x)), y0, backend, rtol=1e-6, atol=1e-6)


def test_clear_errors(backend):
    with pytest.raises(ConfigError, match="do not fit"):
        Network(1, 1, 2, layers=[Dense(1)] * 3)
    with pytest.raises(ConfigError, match="positive integer"):
        Network(0, 1, 1)
    with pytest.raises(LoomxError, match="not built"):
        Network.chain([Dense(2)])(backend.ones((1, 3)))
    net = _mlp(backend)
    with pytest.raises(ShapeError, match=r"expected input \[B, 4\] but received \[2, 5\]"):
        net(backend.ones((2, 5)))
    with pytest.raises(ShapeError, match=r"layer 1 at \(0, 1, 0\)"):
        Network.chain([Dense(3), Dense(2, in_features=7)], input_shape=(4,), backend=backend)


def test_observers_see_every_layer(backend):
    net = _mlp(backend)
    events = []
    cb = net.add_observer(lambda e: events.append((e["phase"], e["index"],
                                                   tuple(e["output"].shape))))
    y, ctx = net.forward(backend.ones((2, 4)))
    net.backward(backend.ones((2, 3)), ctx)
    assert events == [("forward", 0, (2, 6)), ("forward", 2, (2, 5)), ("forward", 3, (2, 5)),
                      ("forward", 4, (2, 3)), ("backward", 4, (2, 5)),
                      ("backward", 3, (2, 5)), ("backward", 2, (2, 6)),
                      ("backward", 0, (2, 4))]
    net.remove_observer(cb)
    events.clear()
    net.add_observer(lambda e: events.append(e["index"]), layers=[(0, 2, 0)])
    net.forward(backend.ones((2, 4)))
    assert events == [4]


def test_summary_stats_and_blueprint(backend):
    net = Network.chain([Dense(4, name="fc"), Parallel([Dense(2), Dense(3)])],
                        input_shape=(4,), backend=backend)
    text = net.summary()
    assert "Dense 'fc'" in text and "[B, 5]" in text and "total parameters: 45" in text
    assert "branch1: Dense" in text
    assert "<table>" in net._repr_html_()
    x = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    y, ctx = net.forward(backend.from_host(x))
    net.backward(backend.ones((6, 5)), ctx)
    stats = net.activation_stats()
    y_host = backend.to_host(y)
    assert stats[1]["index"] == 1 and stats[1]["max"] == pytest.approx(y_host.max(), rel=1e-5)
    assert stats[1]["std"] == pytest.approx(y_host.std(), rel=1e-4)
    g = net.gradient_stats()
    w_grad = backend.to_host(net[0].grads["weight"])
    b_grad = backend.to_host(net[0].grads["bias"])
    assert g[0]["param_grad"]["max"] == pytest.approx(max(w_grad.max(), b_grad.max()), rel=1e-5)
    assert g[1]["output_grad"]["mean"] == pytest.approx(1.0)
    bp = json.loads(json.dumps(net.blueprint("m")))
    assert bp["total_parameters"] == 45 and bp["layers"][1]["combine_mode"] == "concat"
    assert [b["output_shape"] for b in bp["layers"][1]["branches"]] == [[2], [3]]
    assert bp["layers"][1]["grid_col"] == 1


def _no_input_grad_layers(kind):
    from loomx.grid import Residual
    from loomx.layers import GRU, LSTM, RNN, Conv2D, Flatten, MultiHeadAttention, Reshape

    if kind == "attention_first":
        return [MultiHeadAttention(num_heads=2, d_model=6, causal=True), Flatten(), Dense(4)], \
            (5, 6)
    if kind == "gru_first":
        return [GRU(5), RNN(4), Flatten(), Dense(3)], (5, 6)
    if kind == "conv_first":  # the first layer has parameters and its input is a skip source
        return [Conv2D(1, 3, padding=1, activation="tanh"), Residual("input"), Reshape((6, 6)),
                LSTM(5), Parallel([Dense(3), Dense(2, activation="tanh")]), Flatten(),
                Dense(4)], (1, 6, 6)
    # a parameter-free first slot, then a Parallel holding a nested Network
    return [Activation("tanh"),
            Parallel([Dense(6), Network.chain([Dense(4, activation="tanh"), Dense(6)])],
                     combine_mode="add"),
            Residual("input"), LSTM(5), Flatten(), Dense(4)], (6, 6)


@pytest.mark.parametrize("kind", ["conv_first", "parameter_free_first", "attention_first",
                                  "gru_first"])
def test_backward_without_input_grad_gives_the_same_parameter_grads(backend, kind):
    layers, shape = _no_input_grad_layers(kind)
    net = Network.chain(layers, input_shape=shape, backend=backend, seed=3)
    rng = np.random.default_rng(4)
    x = backend.from_host(rng.standard_normal((3, *shape)).astype(np.float32))
    dy = backend.from_host(rng.standard_normal((3, *net.output_shape)).astype(np.float32))
    _, ctx = net.forward(x, train=True)
    dx = net.backward(dy, ctx)
    assert tuple(dx.shape) == (3, *shape)
    full = {p.name: backend.to_host(p.grad) for p in net.parameters()}
    net.zero_grad()
    events = []
    net.add_observer(lambda e: events.append((e["index"], e["output"])))
    assert net.backward(dy, ctx, need_input_grad=False) is None
    assert net.activation_grads[0] is None and net.activation_grads[-1] is dy
    part = {p.name: backend.to_host(p.grad) for p in net.parameters()}
    assert part.keys() == full.keys() and len(full) >= 6
    for name, g in full.items():
        assert np.any(g != 0), name
        np.testing.assert_array_equal(part[name], g, err_msg=name)
    # the first layer with parameters passes no gradient on; nothing before it runs
    first = 1 if kind == "parameter_free_first" else 0
    assert events[-1][0] == first and events[-1][1] is None
    assert accepts_need_input_grad(net[first])  # the layer skips its dx product itself


def test_a_networks_dtype_is_the_default_of_its_layers(backend):
    """Network(..., dtype=) builds its layers (and a Parallel's branches) in that dtype unless
    a layer has its own; the config round trip and a move keep it."""
    if backend.name == "strict":
        pytest.skip("one float dtype per strict network")
    from loomx.grid import Parallel
    from loomx.layers import LayerNorm

    net = Network(1, 1, 3, layers=[Dense(3), LayerNorm(dtype="float32"),
                                   Parallel([Dense(2), Dense(2)])],
                  input_shape=(4,), backend=backend, dtype="float64", seed=0)
    want = ["float64"] * 2 + ["float32"] * 2 + ["float64"] * 4

    def dtypes(n):
        return [str(p.value.dtype).replace("torch.", "") for p in n.parameters()]

    assert dtypes(net) == want
    assert dtypes(Network.from_dict(net.get_config(), backend=backend)) == want
    net.to(backend)
    assert dtypes(net) == want
