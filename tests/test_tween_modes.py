"""Corrected tweening on every layer type, DTP without backward passes, pruning, stepping."""

from __future__ import annotations

import numpy as np
import pytest

import loomx
from loomx.grid import Network
from loomx.layers import LSTM, RNN, Dense, Flatten, LayerNorm, MultiHeadAttention, RMSNorm, SwiGLU
from loomx.layers.base import LAYER_TYPES, Layer
from loomx.tween import TweenConfig, TweenTrainer
from loomx.tween.stepping import SteppingTween


def _mixed_net(backend):
    from loomx.grid import Parallel, Residual

    layers = [Dense(8, activation="tanh"), LayerNorm(), MultiHeadAttention(2), Residual(-1),
              SwiGLU(12), RMSNorm(),
              Parallel([Dense(4, activation="tanh"), Dense(4)], combine_mode="concat"),
              RNN(6), LSTM(5), Flatten(), Dense(3, activation="sigmoid")]
    return Network.chain(layers, input_shape=(3, 5), backend=backend, seed=0)


def test_corrected_mode_uses_exact_gradients_for_every_layer_type(backend):
    """With scaling, clipping and momentum off, corrected tweening is exact gradient descent
    (with Loom's per-type rates) through attention, residual, norms, SwiGLU, parallel and
    recurrent layers."""
    net = _mixed_net(backend)
    rng = np.random.default_rng(0)
    x = backend.from_host(rng.normal(size=(2, 3, 5)))
    labels = [0, 2]
    net.zero_grad()
    y, ctx = net.forward(x, True)
    onehot = backend.from_host(np.eye(3)[labels])
    net.backward((y - onehot) / 2, ctx)
    refs = list(net.parameters())
    want = {r.name: backend.to_host(r.grad) for r in refs}
    before = {r.name: backend.to_host(r.value) for r in refs}
    assert np.isfinite(backend.to_host(y)).all()
    cfg = TweenConfig(momentum=0.0, depth_scaling=False, fanout_norm=False, gradient_clip=1e9,
                      update_clip=1e9)
    eta = 0.1
    TweenTrainer(net, cfg).step(x, labels, eta)
    seen = set()
    for r in net.parameters():
        owner = r.layer.type_name
        top = net[int(r.name.split(".")[0])].type_name
        rate = cfg.type_rate(top if top != "parallel" else owner)
        got = backend.to_host(r.value) - before[r.name]
        np.testing.assert_allclose(got, -eta * rate * want[r.name], rtol=2e-3, atol=2e-6,
                                   err_msg=r.name)
        seen.add(owner)
    assert {"dense", "layer_norm", "mha", "swiglu", "rms_norm", "rnn", "lstm"} <= seen


def test_faithful_mode_runs_loom_rules_on_every_layer_type(backend):
    net = _mixed_net(backend)
    x = backend.from_host(np.random.default_rng(1).normal(size=(1, 3, 5)))
    before = {r.name: backend.to_host(r.value) for r in net.parameters()}
    tr = TweenTrainer(net, TweenConfig.faithful())
    tr.step(x, [1], 0.1)
    changed = {r.name for r in net.parameters()
               if not np.array_equal(backend.to_host(r.value), before[r.name])}
    # Loom updates Dense, norms, attention, SwiGLU, RNN/LSTM input weights; never W_hh,
    # and never the branches of a Parallel layer
    assert "0.weight" in changed and "1.weight" in changed and "2.o_weight" in changed
    assert "4.down_weight" in changed and "7.weight_ih" in changed
    assert "7.weight_hh" not in changed and "8.weight_hh" not in changed
    assert not any(name.startswith("6.") for name in changed)
    assert all(np.isfinite(v).all() for v in (backend.to_host(r.value)
                                              for r in net.parameters()))


def _digits(n_train=1200):
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x, y = d.data[order] / 16.0, d.target[order]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def test_dtp_learns_digits_without_any_backward_pass(monkeypatch):
    """Difference target propagation reaches far above chance (10 %) on held-out digits while
    every layer's backward raises."""

    def forbidden(self, *a, **k):
        raise AssertionError(f"backward of {type(self).__name__} called in DTP")

    for cls in {Layer, *LAYER_TYPES.values()}:
        monkeypatch.setattr(cls, "backward", forbidden)
    (xtr, ytr), (xte, yte) = _digits()
    with loomx.use_backend("numpy"):
        b = loomx.get_backend()
        net = Network.chain([Dense(48, activation="tanh"), Dense(48, activation="tanh"),
                             Dense(10)], input_shape=(64,), seed=0)
        tr = TweenTrainer(net, TweenConfig(method="dtp", loss="softmax_ce"))
        tr.fit(b.from_host(xtr), b.from_host(ytr), epochs=3, rate=0.1, batch_size=16,
               metric="accuracy")
        acc = float(b.to_host(tr.evaluate(b.from_host(xte), b.from_host(yte))["accuracy"]))
    assert acc > 0.8
    assert len(tr.telemetry.history["gap"][-1]) == 3


def test_dtp_rejects_non_dense_layers(backend):
    net = Network.chain([Dense(4), LayerNorm(), Dense(2)], input_shape=(3,), backend=backend)
    with pytest.raises(loomx.ConfigError, match="chain of Dense layers"):
        TweenTrainer(net, TweenConfig(method="dtp"))


def test_pruning_disables_then_removes_dead_layers(backend):
    layers = [Dense(6, activation="tanh"), Dense(6, activation="tanh"),
              Dense(6, activation="tanh"), Dense(2, activation="sigmoid")]
    net = Network.chain(layers, input_shape=(4,), backend=backend, seed=0)
    # every budget counts as dead: threshold above the largest possible budget
    cfg = TweenConfig(prune_enabled=True, prune_threshold=1.5, prune_patience=2,
                      eval_frequency=1, early_stop_threshold=1e9)
    tr = TweenTrainer(net, cfg)
    x = backend.from_host(np.random.default_rng(0).normal(size=(8, 4)))
    labels = backend.from_host(np.array([0, 1] * 4))
    msgs = []
    flags = []
    tr.fit(x, labels, epochs=2, rate=0.1, batch_size=4, verbose=True, print_fn=msgs.append,
           callback=lambda s: flags.append([net[i].disabled for i in range(3)]))
    assert flags[-1] == [False, True, True]
    assert any("disabled layers [1, 2]" in m for m in msgs)
    # disabled after the last evaluation: the best (evaluated) network has them enabled
    assert not net[1].disabled and not net[2].disabled
    for layer in layers[1:3]:  # as pruning left them
        layer.disabled = True
    tr.fit(x, labels, epochs=2, rate=0.1, batch_size=4, verbose=True, print_fn=msgs.append)
    assert net[1] is None and tr.removed == [1]
    assert all(k[0] != id(layers[1]) for k in tr.velocity)
    assert 1 not in tr.dead_epochs
    loss = tr.step(x, labels, 0.1)  # training goes on over the remaining layers
    assert tr.telemetry.last("gap") and loss.shape == ()
    assert tr.telemetry.layers[-1] == (0, 3)


def test_step_tween_equals_tchain_under_loom_defaults(backend):
    """Loom's "StepTween (legacy)" runs the default config, whose chain rule is on: the same
    algorithm as TChain. With use_chain_rule=False it is a different algorithm."""

    def run(cfg, mode):
        net = Network.chain([Dense(8, activation="tanh"), Dense(3, activation="sigmoid")],
                            input_shape=(4,), backend=backend, seed=3)
        st = SteppingTween(TweenTrainer(net, cfg), mode=mode, tween_every=2)
        rng = np.random.default_rng(0)
        for i in range(12):
            st.tick(backend.from_host(rng.normal(size=(1, 4))), [i % 3], 0.15)
        return backend.to_host(net[0].params["weight"])

    a = run(TweenConfig.faithful(), "step_tween")
    b = run(TweenConfig.faithful(), "tchain")
    c = run(TweenConfig.faithful(use_chain_rule=False), "step_tween")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_step_batch_applies_every_batch(backend):
    net = Network.chain([Dense(3, activation="sigmoid")], input_shape=(4,), backend=backend)
    st = SteppingTween(TweenTrainer(net, TweenConfig.faithful()), mode="step_batch", batch=4)
    w0 = backend.to_host(net[0].params["weight"])
    x = backend.from_host(np.ones((1, 4)))
    for _ in range(3):
        st.tick(x, [0], 0.5)
    np.testing.assert_array_equal(backend.to_host(net[0].params["weight"]), w0)
    st.tick(x, [0], 0.5)
    assert not np.array_equal(backend.to_host(net[0].params["weight"]), w0)
    out = st.settle(x)
    assert tuple(out.shape) == (1, 3)


def test_heatmap_matrix_tracks_layers_through_pruning(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from loomx.tween.plots import layer_matrix, plot_heatmaps

    b = loomx.get_backend("numpy")
    net = Network.chain([Dense(4, activation="tanh"), Dense(4, activation="tanh"),
                         Dense(2, activation="sigmoid")], input_shape=(3,), backend=b)
    tr = TweenTrainer(net)
    x = b.from_host(np.ones((1, 3)))
    tr.step(x, [0], 0.1)
    net[1].disabled = True
    tr.step(x, [1], 0.1)
    ids, rows = layer_matrix(tr.telemetry, "budget")
    assert ids == [0, 1, 2]
    assert np.isnan(rows[1][1]) and not np.isnan(rows[1][0]) and not np.isnan(rows[2][1])
    fig = plot_heatmaps(tr.telemetry, path=str(tmp_path / "heat.png"))
    assert len(fig.axes) == 4 and (tmp_path / "heat.png").stat().st_size > 1000
    with pytest.raises(loomx.LoomxError, match="unknown telemetry metric"):
        layer_matrix(tr.telemetry, "gapp")


def test_demo_section_compares_tweening_with_sgd():
    lines = loomx.tween.demo_section("numpy", quick=True)
    assert "SGD" in lines[3] and "tweening" in lines[1]
    accs = [float(line.split("accuracy")[1].split("%")[0]) for line in lines[1:4]]
    assert accs[0] > 85 and accs[2] > 85 and accs[1] > 50
