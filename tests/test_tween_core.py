"""Neural Tweening: chain-rule updates vs true gradients, legacy mode, batches, telemetry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import loomx
from loomx.errors import ConfigError
from loomx.layers import Dense
from loomx.tween import TweenConfig, TweenTrainer, heat_bar
from loomx.tween.primitives import depth_scale

from .conftest import assert_close

ACTS = ("loom_leaky_relu", "tanh", "sigmoid")
WIDTHS = (16, 12, 3)


def _net(backend, seed=0):
    layers = [Dense(w, activation=a) for w, a in zip(WIDTHS, ACTS, strict=True)]
    return loomx.Network.chain(layers, input_shape=(8,), backend=backend, seed=seed)


def _torch_grads(net, backend, x, label):
    """−∇W of ½‖y − onehot‖² per Dense layer (float64 autograd)."""
    ws, bs = [], []
    for _, layer in net.layers():
        ws.append(torch.tensor(backend.to_host(layer.params["weight"]), dtype=torch.float64,
                               requires_grad=True))
        bs.append(torch.tensor(backend.to_host(layer.params["bias"]), dtype=torch.float64))
    h = torch.tensor(backend.to_host(x), dtype=torch.float64)
    for w, b, act in zip(ws, bs, ACTS, strict=True):
        z = h @ w.T + b
        h = {"loom_leaky_relu": lambda v: torch.where(v >= 0, v, 0.1 * v),
             "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act](z)
    t = torch.nn.functional.one_hot(torch.tensor(label), WIDTHS[-1]).to(torch.float64)
    (0.5 * ((h - t) ** 2).sum() / h.shape[0]).backward()
    return [-w.grad.numpy() for w in ws]


def _weights(net, backend):
    return [backend.to_host(layer.params["weight"]).astype(np.float64) for _, layer in net.layers()]


def _cos(a, b):
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("compat", [True, False], ids=["faithful", "corrected"])
def test_chain_update_is_scaled_negative_gradient(backend, compat):
    net = _net(backend)
    x = backend.from_host(np.random.default_rng(1).uniform(-1, 1, (1, 8)))
    want = _torch_grads(net, backend, x, [2])
    before = _weights(net, backend)
    eta = 0.01
    tr = TweenTrainer(net, TweenConfig(loom_compat=compat, momentum=0.0))
    loss = tr.step(x, [2], eta)
    assert loss.shape == () and loss.dtype == backend.float_dtype
    after = _weights(net, backend)
    n = len(WIDTHS)
    for l in range(n):
        dw = after[l] - before[l]
        # Loom's ε-offset derivatives tilt the faithful direction very slightly
        assert _cos(dw, want[l]) > (0.9995 if compat else 0.99999)
        ds = [depth_scale(n - 1 - k, 1.2) for k in range(n)]
        c = eta * ds[l] * math.prod(ds[k] / math.sqrt(WIDTHS[k]) for k in range(l + 1, n))
        ratio = np.linalg.norm(dw) / np.linalg.norm(want[l])
        assert ratio == pytest.approx(c, rel=0.1 if compat else 1e-3)


def test_corrected_batch_averages_per_sample_updates(backend):
    net = _net(backend)
    x = backend.from_host(np.random.default_rng(2).uniform(-1, 1, (4, 8)))
    labels = [0, 1, 2, 1]
    want = _torch_grads(net, backend, x, labels)  # batch mean of per-sample gradients
    before = _weights(net, backend)
    tr = TweenTrainer(net, TweenConfig(momentum=0.0, depth_scaling=False, fanout_norm=False))
    tr.step(x, backend.from_host(np.array(labels)), 0.05)
    for l, w in enumerate(_weights(net, backend)):
        np.testing.assert_allclose(w - before[l], 0.05 * want[l], rtol=2e-3, atol=1e-7)


def test_momentum_is_dampened_ema(backend):
    net = _net(backend)
    x = backend.from_host(np.random.default_rng(3).uniform(-1, 1, (1, 8)))
    before = _weights(net, backend)
    ref = _net(backend)
    TweenTrainer(ref, TweenConfig(momentum=0.0)).step(x, [1], 0.5)
    TweenTrainer(net, TweenConfig(momentum=0.9)).step(x, [1], 0.5)
    # first step: v = 0.1·d (weights only; biases get no momentum)
    for b0, w_ref, w in zip(before, _weights(ref, backend), _weights(net, backend), strict=True):
        np.testing.assert_allclose(w - b0, 0.1 * (w_ref - b0), rtol=1e-3, atol=3e-7)
    assert_close(net[2].params["bias"], ref[2].params["bias"], backend)


def test_legacy_target_propagation_is_reachable(backend):
    """use_chain_rule=False runs Loom's delta rule: ΔW = r·0.01·(t − y)⊗x, no φ'."""
    net = loomx.Network.chain([Dense(3, activation="sigmoid")], input_shape=(4,),
                              backend=backend, seed=0)
    x_host = np.array([[0.5, -0.2, 0.8, 0.1]])
    w0 = backend.to_host(net[0].params["weight"]).astype(np.float64)
    y = 1 / (1 + np.exp(-(x_host @ w0.T)))
    t = np.array([[0.0, 1.0, 0.0]])
    t = np.clip(t, 0.05, 0.95) * 0 + t  # the top target is the raw one-hot
    cos = (y * t).sum() / np.sqrt((y * y).sum() * (t * t).sum())
    budget = (cos + 1) / 2
    r = 0.1 * (0.5 + 0.5 * budget)
    want = r * 0.01 * (t - y).T @ x_host
    tr = TweenTrainer(net, TweenConfig(use_chain_rule=False, momentum=0.0))
    tr.step(backend.from_host(x_host), [1], 0.1)
    got = backend.to_host(net[0].params["weight"]) - w0
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-8)
    assert tr.telemetry.last("budget")[0] == pytest.approx(budget, rel=1e-4)


def test_legacy_gate_skips_low_budget_layers(backend):
    net = loomx.Network.chain([Dense(3, activation="sigmoid")], input_shape=(4,),
                              backend=backend, seed=0)
    w0 = backend.to_host(net[0].params["weight"])
    tr = TweenTrainer(net, TweenConfig(use_chain_rule=False, ignore_threshold=1.01))
    tr.step(backend.from_host(np.ones((1, 4))), [0], 0.5)
    np.testing.assert_array_equal(backend.to_host(net[0].params["weight"]), w0)


def test_faithful_batch_pairs_mean_gap_with_last_sample(backend):
    net = loomx.Network.chain([Dense(2, activation="identity")], input_shape=(3,),
                              backend=backend, seed=0)
    xs = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    w0 = backend.to_host(net[0].params["weight"]).astype(np.float64)
    ys = xs @ w0.T
    t = np.array([[1.0, 0.0], [0.0, 1.0]])
    mean_gap = (t - ys).mean(axis=0)
    tr = TweenTrainer(net, TweenConfig.faithful(momentum=0.0))
    tr.batch_step(backend.from_host(xs), [0, 1], 0.1)
    got = backend.to_host(net[0].params["weight"]) - w0
    np.testing.assert_allclose(got, 0.1 * np.outer(mean_gap, xs[-1]), rtol=1e-4, atol=1e-7)
    # the fixed batch averages per-sample outer products instead
    net2 = loomx.Network.chain([Dense(2, activation="identity")], input_shape=(3,),
                               backend=backend, seed=0)
    TweenTrainer(net2, TweenConfig(momentum=0.0)).batch_step(backend.from_host(xs), [0, 1], 0.1)
    got2 = backend.to_host(net2[0].params["weight"]) - w0
    np.testing.assert_allclose(got2, 0.1 * (t - ys).T @ xs / 2, rtol=1e-4, atol=1e-7)


def test_telemetry_epoch_means_and_console(backend):
    net = _net(backend)
    rng = np.random.default_rng(0)
    x = backend.from_host(rng.uniform(-1, 1, (12, 8)))
    labels = backend.from_host(rng.integers(0, 3, 12))
    tr = TweenTrainer(net, TweenConfig(eval_frequency=1), log_interval=7)
    lines = []
    summaries = tr.fit(x, labels, epochs=2, rate=0.1, batch_size=3, verbose=True,
                       print_fn=lines.append)
    assert len(tr.telemetry.loss) == 8  # 4 steps per epoch, flushed at the epoch end
    gaps = np.array(tr.telemetry.history["gap"][4:8])
    np.testing.assert_allclose(summaries[1]["per_layer"]["gap"], gaps.mean(axis=0), rtol=1e-6)
    assert summaries[1]["avg_loss"] == pytest.approx(np.mean(tr.telemetry.loss[4:8]))
    budgets = summaries[1]["per_layer"]["budget"]
    assert summaries[1]["depth_barrier"] == pytest.approx(np.prod(budgets), rel=1e-6)
    assert lines[-1].startswith("Epoch 2/2 | Loss") and "[" in lines[-1]
    assert len(lines[-1].split("[")[-1].rstrip("]")) == 3
    rates = tr.telemetry.history["rate"][0]
    assert rates == pytest.approx([0.1 * 1.44, 0.1 * 1.2, 0.1], rel=1e-5)
    doc = tr.telemetry.to_loom_json()
    assert set(doc["EpochMetrics"][0]) >= {"Epoch", "AvgLoss", "Score", "AvgLinkBudget",
                                           "BottleneckLayer", "DepthBarrier"}
    assert len(doc["GapHistory"]) == 2 and len(doc["steps"]["gap"]) == 8


def test_heat_bar_glyphs():
    assert heat_bar([0.1, 0.9, 0.7, 0.5, 0.3, 0.2]) == "X█▓▒░·"
    assert heat_bar([0.25], ignore_threshold=0.3) == "X"


def test_explosion_detection_damps_rate(backend):
    net = _net(backend)
    tr = TweenTrainer(net, TweenConfig(explosion_detection=True))
    rng = np.random.default_rng(0)
    for i in range(14):
        scale = 1.0 if i < 10 else 10.0 ** (i - 9)
        tr.step(backend.from_host(rng.uniform(-1, 1, (1, 8)) * scale), [i % 3], 0.1)
    value = float(backend.to_host(tr.adaptive.value))
    assert value < 1.0


def test_config_errors_and_round_trip():
    cfg = TweenConfig(dense_rate=0.5)
    assert TweenConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="method"):
        TweenConfig(method="backprop")
    with pytest.raises(ConfigError, match="unknown TweenConfig fields"):
        TweenConfig.from_dict({"dense_rat": 1.0})
    defaults = TweenConfig()
    assert (defaults.momentum, defaults.depth_scale_factor, defaults.gradient_scale,
            defaults.use_chain_rule, defaults.ignore_threshold) == (0.9, 1.2, 0.1, True, 0.2)
    assert loomx.TweenConfig is TweenConfig and loomx.TweenTrainer is TweenTrainer


def test_depth_scale_table():
    want = [1, 1.2, 1.44, 1.728, 2.074, 2.488, 2.986, 3.583, 4.300, 5.160, 6.192, 7.026,
            7.565, 7.972, 8.303, 8.584, 8.829, 9.046, 9.243, 9.422]
    got = [depth_scale(d, 1.2) for d in range(20)]
    assert got == pytest.approx(want, abs=1.5e-3)
