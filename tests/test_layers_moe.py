"""The MoE block against a PyTorch reference (Mixtral / Qwen2-MoE routing), on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loomx.errors import ConfigError, LoomxError, ShapeError
from loomx.layers import MoE, layer_from_config
from tests.conftest import assert_close

F = torch.nn.functional


def _torch_moe(layer, x: np.ndarray) -> np.ndarray:
    """Sparse reference: per token, run only its top-k experts (as transformers does)."""
    p = {k: torch.tensor(layer.backend.to_host(v), dtype=torch.float64)
         for k, v in layer.params.items()}
    act = {"silu": F.silu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}[
        layer.activation]
    xt = torch.tensor(x, dtype=torch.float64).reshape(-1, x.shape[-1])
    probs = torch.softmax(xt @ p["router_weight"].T, dim=-1)
    top_w, top_i = torch.topk(probs, layer.top_k, dim=-1)
    if layer.normalize_topk:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    y = torch.zeros_like(xt)
    for t in range(xt.shape[0]):
        for w, e in zip(top_w[t], top_i[t]):
            h = act(p["gate_weight"][e] @ xt[t]) * (p["up_weight"][e] @ xt[t])
            y[t] += w * (p["down_weight"][e] @ h)
    if layer.shared_hidden_features is not None:
        sh = F.linear(act(F.linear(xt, p["shared_expert_gate_weight"]))
                      * F.linear(xt, p["shared_expert_up_weight"]), p["shared_expert_down_weight"])
        y = y + torch.sigmoid(F.linear(xt, p["shared_gate_weight"])) * sh
    return y.reshape(x.shape).numpy()


@pytest.mark.parametrize("kw", [
    dict(num_experts=4, top_k=2),  # Mixtral
    dict(num_experts=5, top_k=3, normalize_topk=False, shared_hidden_features=6),  # Qwen2-MoE
    dict(num_experts=3, top_k=1, activation="gelu_tanh"),
    dict(num_experts=4, top_k=4),
])
def test_moe_matches_sparse_torch_reference(backend, kw):
    layer = MoE(hidden_features=7, **kw)
    assert layer.build((5, 8), backend, rng=2) == (5, 8)
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32)
    y, ctx = layer.forward(backend.from_host(x))
    assert_close(y, _torch_moe(layer, x), backend, rtol=1e-4, atol=1e-5)
    e, m = kw["num_experts"], 7
    assert tuple(layer.params["router_weight"].shape) == (e, 8)
    assert tuple(layer.params["gate_weight"].shape) == (e, m, 8)
    assert tuple(layer.params["down_weight"].shape) == (e, 8, m)


def test_routing_weights_keep_exactly_top_k(backend):
    layer = MoE(6, 2, 4)
    layer.build((8,), backend, rng=0)
    x = np.random.default_rng(3).standard_normal((10, 8)).astype(np.float32)
    w = backend.to_host(layer.routing_weights(backend.from_host(x)))
    assert w.shape == (10, 6)
    assert ((w > 0).sum(axis=1) == 2).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)


def test_config_round_trip_and_backward_raises(backend):
    layer = MoE(4, 2, 6, normalize_topk=False, shared_hidden_features=3, name="m")
    again = layer_from_config(layer.get_config())
    assert again.get_config() == layer.get_config() == {
        "type": "moe", "num_experts": 4, "top_k": 2, "hidden_features": 6,
        "activation": "silu", "normalize_topk": False, "shared_hidden_features": 3, "name": "m"}
    layer.build((5,), backend)
    assert sorted(layer.params) == sorted([
        "router_weight", "gate_weight", "up_weight", "down_weight", "shared_expert_gate_weight",
        "shared_expert_up_weight", "shared_expert_down_weight", "shared_gate_weight"])
    y, ctx = layer.forward(backend.from_host(np.ones((2, 5), np.float32)))
    with pytest.raises(LoomxError, match="inference only"):
        layer.backward(y, ctx)


def test_bad_configs_and_shapes(backend):
    with pytest.raises(ConfigError, match="top_k"):
        MoE(4, 5, 8)
    with pytest.raises(ConfigError, match="positive"):
        MoE(0, 1, 8)
    layer = MoE(2, 1, 3)
    layer.build((4,), backend)
    with pytest.raises(ShapeError, match=r"\[B, \.\.\., 4\]"):
        layer.forward(backend.from_host(np.ones((2, 5), np.float32)))
