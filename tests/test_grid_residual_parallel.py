"""Residual and Parallel layers in composite networks: values and gradients against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loomx.errors import ConfigError, LoomxError, ShapeError
from loomx.grid import Network, Parallel, Residual
from loomx.layers import Activation, Dense
from tests.conftest import assert_close
from tests.gradcheck import finite_difference_check

ACT = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda z: z,
       "relu": torch.relu}


def torch_eval(layer, h, params, prefix=""):
    """Re-implement a loomx layer tree in torch (float64 leaves collected into ``params``)."""
    b = layer.backend
    if isinstance(layer, Network):
        acts = [h]
        for i, slot in enumerate(layer.slots):
            if slot is not None and not slot.disabled:
                if isinstance(slot, Residual):
                    h = h + acts[layer.resolve_source(slot.source, i)]
                else:
                    h = torch_eval(slot, h, params, f"{prefix}{i}.")
            acts.append(h)
        return h
    if isinstance(layer, Dense):
        w = params.setdefault(prefix + "weight", torch.tensor(
            b.to_host(layer.params["weight"]).astype(np.float64), requires_grad=True))
        bias = params.setdefault(prefix + "bias", torch.tensor(
            b.to_host(layer.params["bias"]).astype(np.float64), requires_grad=True))
        return ACT[layer.activation](h @ w.T + bias)
    if isinstance(layer, Activation):
        return ACT[layer.activation](h)
    if isinstance(layer, Parallel):
        ys = [torch_eval(br, h, params, f"{prefix}branch{k}.")
              for k, br in enumerate(layer.branches)]
        n = h.shape[0]
        if layer.combine_mode == "add":
            return sum(ys)
        if layer.combine_mode == "avg":
            return sum(ys) / len(ys)
        if layer.combine_mode == "grid_scatter":
            return torch.cat([ys[k].reshape(n, -1) for k in layer._order], dim=-1)
        if layer.loom_compat:
            return torch.cat([y.reshape(-1) for y in ys]).reshape(n, -1)
        return torch.cat(ys, dim=-1)
    raise TypeError(type(layer))


def check_against_torch(net, backend, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *net.input_shape)).astype(np.float32)
    dy = rng.standard_normal((batch, *net.output_shape)).astype(np.float32)
    net.zero_grad()
    y, ctx = net.forward(backend.from_host(x), train=True)
    dx = net.backward(backend.from_host(dy), ctx)
    params = {}
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    yt = torch_eval(net, xt, params)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    tol = dict(rtol=1e-4, atol=1e-5)
    assert_close(y, yt, backend, **tol)
    assert_close(dx, xt.grad, backend, **tol)
    names = [p.name for p in net.parameters()]
    assert sorted(names) == sorted(params), "every parameter reaches the gradient registry"
    for p in net.parameters():
        assert_close(p.grad, params[p.name].grad, backend, **tol)


def test_residual_sources_and_gradients(backend):
    layers = [Dense(4, activation="tanh"), Dense(4), Residual(0),        # + input of slot 0
              Dense(4, activation="sigmoid"), Residual(-1),              # + input of slot 3
              Residual((0, 1, 1)), Residual("input"), Dense(2)]
    net = Network(1, 4, 2, layers=layers, input_shape=(4,), backend=backend, seed=3)
    check_against_torch(net, backend)


def test_prenorm_style_block_needs_no_hidden_state(backend):
    # [f, g, Residual(0), f, g, Residual(3)] : h = x + g(f(x)); y = h + g(f(h))
    block = [Activation("tanh"), Dense(5), Residual(0), Activation("sigmoid"), Dense(5),
             Residual(3)]
    net = Network.chain(block, input_shape=(5,), backend=backend, seed=1)
    check_against_torch(net, backend)


@pytest.mark.parametrize("mode", ["concat", "add", "avg", "grid_scatter"])
def test_parallel_modes_match_torch(backend, mode):
    kw = {}
    width = (3, 3, 3) if mode in ("add", "avg") else (3, 2, 4)
    if mode == "grid_scatter":
        kw = dict(grid_positions=[(0, 1, 0), (0, 0, 0), (1, 0, 1)], grid_output_rows=2,
                  grid_output_cols=2, grid_output_layers=2)
    par = Parallel([Dense(width[0], activation="tanh"), Dense(width[1], activation="sigmoid"),
                    Network.chain([Dense(4, activation="tanh"), Residual(0),
                                   Dense(width[2])])], combine_mode=mode, **kw)
    net = Network.chain([Dense(4, activation="tanh"), par, Dense(2)], input_shape=(5,),
                        backend=backend, seed=2)
    expected = {"concat": (9,), "add": (3,), "avg": (3,), "grid_scatter": (9,)}[mode]
    assert par.output_shape == expected
    check_against_torch(net, backend)


def test_grid_scatter_orders_by_cell_per_sample(backend):
    # Loom's example: branch0 -> col 1, branch1 -> col 0 gives [b1, b0] per sample
    par = Parallel([Dense(1), Dense(2)], combine_mode="grid_scatter",
                   grid_positions=[{"target_row": 0, "target_col": 1, "target_layer": 0},
                                   {"target_row": 0, "target_col": 0, "target_layer": 0}],
                   grid_output_cols=2)
    par.build((3,), backend)
    x = backend.from_host(np.arange(6, dtype=np.float32).reshape(2, 3))
    y = backend.to_host(par(x))
    b0 = backend.to_host(par.branches[0](x))
    b1 = backend.to_host(par.branches[1](x))
    np.testing.assert_allclose(y, np.concatenate([b1, b0], axis=1), rtol=1e-6)


def test_nested_parallel_any_depth(backend):
    inner = Parallel([Dense(2), Parallel([Dense(2), Dense(2, activation="tanh")],
                                         combine_mode="add")], combine_mode="avg")
    outer = Parallel([inner, Dense(3, activation="sigmoid"),
                      Parallel([Dense(1), Dense(1)], combine_mode="concat")],
                     combine_mode="concat")
    net = Network.chain([outer, Dense(2)], input_shape=(4,), backend=backend, seed=5)
    assert outer.output_shape == (7,)
    check_against_torch(net, backend)
    assert len(list(net.parameters())) == 2 * 7  # seven Dense layers, all trained


def test_loom_compat_concat_is_whole_batch(backend):
    par = Parallel([Dense(1), Dense(2)], loom_compat=True)
    net = Network.chain([par], input_shape=(3,), backend=backend)
    x = backend.from_host(np.arange(6, dtype=np.float32).reshape(2, 3))
    y = backend.to_host(net(x))
    b0 = backend.to_host(par.branches[0](x)).ravel()
    b1 = backend.to_host(par.branches[1](x)).ravel()
    np.testing.assert_allclose(y.ravel(), np.concatenate([b0, b1]), rtol=1e-6)
    check_against_torch(net, backend, batch=2)


def test_parallel_finite_differences(numpy64):
    par = Parallel([Dense(2, activation="tanh"), Network.chain([Dense(3), Residual(0)])],
                   combine_mode="concat")
    par.build((3,), numpy64, rng=0)
    finite_difference_check(par, np.random.default_rng(0).standard_normal((2, 3)))


def test_residual_and_parallel_errors(backend):
    with pytest.raises(ShapeError, match="skip of shape"):
        Network.chain([Dense(3), Residual(0)], input_shape=(4,), backend=backend)
    with pytest.raises(ConfigError, match="not an earlier position"):
        Network.chain([Dense(4), Residual(3)], input_shape=(4,), backend=backend)
    with pytest.raises(LoomxError, match="needs the skip"):
        r = Residual()
        r.build((2,), backend)
        r(backend.ones((1, 2)))
    with pytest.raises(ConfigError, match="combine_mode"):
        Parallel([Dense(1)], combine_mode="max")
    with pytest.raises(ShapeError, match="equal branch output shapes"):
        Parallel([Dense(1), Dense(2)], combine_mode="add").build((3,), backend)
    with pytest.raises(ConfigError, match="same output cell"):
        Parallel([Dense(1), Dense(2)], combine_mode="grid_scatter",
                 grid_positions=[(0, 0, 0), (0, 0, 0)])
    with pytest.raises(ConfigError, match="Residual"):
        Parallel([Residual()])


def test_parallel_config_round_trip(backend):
    from loomx.layers import layer_from_config

    par = Parallel([Dense(2), Parallel([Dense(1), Dense(1)], combine_mode="add")],
                   combine_mode="grid_scatter", grid_positions=[(0, 0, 1), (0, 0, 0)],
                   grid_output_layers=2)
    again = layer_from_config(par.get_config())
    assert again.get_config() == par.get_config()
    assert again._order == [1, 0]


def test_prenorm_transformer_block_matches_torch(backend):
    """[RMSNorm, MHA, Residual(0), RMSNorm, SwiGLU, Residual(3)] is a Llama-style block."""
    from loomx.layers import MultiHeadAttention, RMSNorm, SwiGLU

    d, heads, t = 8, 2, 5
    block = [RMSNorm(), MultiHeadAttention(heads, causal=True), Residual(0), RMSNorm(),
             SwiGLU(12), Residual(3)]
    net = Network(1, 2, 3, layers=block, input_shape=(t, d), backend=backend, seed=0)
    rng = np.random.default_rng(0)
    for p in net.parameters():  # non-trivial norm weights too
        shape = tuple(p.value.shape)
        p.value = backend.from_host(rng.standard_normal(shape) * 0.3 + (1.0 if len(shape) == 1
                                                                         else 0.0))
    x = rng.standard_normal((2, t, d)).astype(np.float32)
    dy = rng.standard_normal((2, t, d)).astype(np.float32)
    y, ctx = net.forward(backend.from_host(x), train=True)
    dx = net.backward(backend.from_host(dy), ctx)

    P = {p.name: torch.tensor(backend.to_host(p.value).astype(np.float64), requires_grad=True)
         for p in net.parameters()}

    def rms(h, w):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + 1e-6) * w

    def attn(h):
        b = h.shape[0]
        q, k, v = (h @ P[f"1.{n}_weight"].T for n in "qkv")
        q, k, v = (z.reshape(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(b, t, d) @ P["1.o_weight"].T

    def ffn(h):
        g = torch.nn.functional.silu(h @ P["4.gate_weight"].T)
        return (g * (h @ P["4.up_weight"].T)) @ P["4.down_weight"].T

    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    h = xt + attn(rms(xt, P["0.weight"]))
    yt = h + ffn(rms(h, P["3.weight"]))
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    tol = dict(rtol=1e-4, atol=1e-5)
    assert_close(y, yt, backend, **tol)
    assert_close(dx, xt.grad, backend, **tol)
    for p in net.parameters():
        assert_close(p.grad, P[p.name].grad, backend, **tol)


def test_a_disabled_branch_is_an_error_not_silently_run(backend):
    """``disabled`` is a grid slot's switch (the slot becomes the identity); a Parallel branch
    has no identity that fits every combine mode, so running one is refused."""
    par = Parallel([Dense(3), Dense(3)], combine_mode="add")
    par.build((3,), backend, 0)
    par.branches[1].disabled = True
    with pytest.raises(LoomxError, match="branch 1 .* is disabled"):
        par.forward(backend.from_host(np.ones((2, 3), np.float32)))
