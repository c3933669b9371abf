"""Tween ``fit``: the best state (per call, saved before pruning, with the disabled flags and
removed layers), pruning without telemetry, clip switches, batch clipping, label checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loomx.errors import ConfigError, LoomxError
from loomx.grid import Network
from loomx.layers import Dense
from loomx.tween import TweenConfig, TweenTrainer
from loomx.tween.pruning import prune_epoch


def _data(n=200, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((8, classes)), axis=1).astype(np.int64)
    return x, y


def _deep(seed=0, classes=4):
    return Network.chain([Dense(12, activation="tanh"), Dense(12, activation="tanh"),
                          Dense(12, activation="tanh"), Dense(classes)], input_shape=(8,),
                         backend="numpy", seed=seed)


def _accuracy(tr, x, y) -> float:
    return 100.0 * float(tr.evaluate(x, y)["accuracy"])


def _pruning(**kw):
    # every budget counts as dead: threshold above the largest possible budget
    return TweenConfig(loss="softmax_ce", prune_enabled=True, prune_threshold=1.5,
                       prune_patience=1, eval_frequency=1, early_stop_threshold=1e9, **kw)


def test_second_fit_restores_its_own_best():
    x, y = _data()
    net = Network.chain([Dense(16, activation="tanh"), Dense(4)], input_shape=(8,),
                        backend="numpy", seed=0)
    cfg = TweenConfig(loss="softmax_ce", eval_frequency=1, early_stop_threshold=1e9)
    tr = TweenTrainer(net, cfg)
    tr.fit(x, y, epochs=4, rate=0.3, batch_size=8, metric="accuracy")
    y2 = (y + 1) % 4  # another task: the first fit's best scores low on it
    s = tr.fit(x, y2, epochs=2, rate=0.3, batch_size=8, metric="accuracy")
    assert tr.best_score == pytest.approx(max(e["accuracy"] for e in s))
    assert _accuracy(tr, x, y2) == pytest.approx(tr.best_score, abs=1e-4)


def test_best_is_saved_before_pruning_and_restored_with_the_disabled_flags():
    x, y = _data()
    net = _deep()
    tr = TweenTrainer(net, _pruning())
    seen = []
    # one epoch: evaluated with every layer enabled, then pruning disables layers 1 and 2
    tr.fit(x, y, epochs=1, rate=0.2, batch_size=16, metric="accuracy",
           callback=lambda s: seen.append([bool(net[i].disabled) for i in range(4)]))
    assert seen == [[False, True, True, False]]  # pruned after the evaluation
    assert tr.best_state["layers"][1][1] is False
    assert not any(net[i].disabled for i in range(4))  # the evaluated network is back
    assert _accuracy(tr, x, y) == pytest.approx(tr.best_score, abs=1e-4)


def test_restore_puts_back_a_layer_removed_after_the_best():
    x, y = _data(32)
    net = _deep()
    tr = TweenTrainer(net, _pruning())
    tr.step(x, y, 0.1)
    layer1 = net[1]
    want = np.array(layer1.params["weight"])
    tr.save_best()
    dead = {i: 0.0 for i, _ in net.layers()}
    assert any("disabled" in m for m in prune_epoch(tr, dead))
    assert any("removed layer 1" in m for m in prune_epoch(tr, dead))
    assert net[1] is None and tr.removed == [1]
    tr.restore_best()
    assert net[1] is layer1 and not layer1.disabled and not net[2].disabled
    assert tr.removed == []
    np.testing.assert_array_equal(layer1.params["weight"], want)


def test_restore_leaves_out_a_layer_that_was_disabled_at_the_best():
    x, y = _data(32)
    net = _deep()
    tr = TweenTrainer(net, _pruning())
    dead = {i: 0.0 for i, _ in net.layers()}
    prune_epoch(tr, dead)  # disables 1 and 2
    tr.save_best()
    prune_epoch(tr, dead)  # removes 1
    tr.restore_best()
    assert net[1] is None and net[2].disabled and tr.removed == [1]


@pytest.mark.parametrize("telemetry", [True, False])
def test_pruning_acts_with_and_without_telemetry(telemetry):
    x, y = _data()
    net = _deep()
    # a budget is at most 1 (and below it in practice): 1.0 counts every measured layer dead,
    # and no layer whose budget went unmeasured
    cfg = TweenConfig(loss="softmax_ce", prune_enabled=True, prune_threshold=1.0,
                      prune_patience=1, eval_frequency=100, early_stop_threshold=1e9)
    tr = TweenTrainer(net, cfg, telemetry=telemetry)
    msgs = []
    tr.fit(x, y, epochs=3, rate=0.2, batch_size=16, metric="accuracy", verbose=True,
           print_fn=msgs.append)
    assert any("disabled layers [1, 2]" in m for m in msgs)
    assert any("removed layer 1" in m for m in msgs)
    assert net[1] is None


def test_no_clip_switches():
    x, y = _data(8, classes=3)
    cfg = TweenConfig(gradient_clip=None, update_clip=None)
    assert cfg.gradient_clip == math.inf and cfg.update_clip == math.inf
    results = []
    for c in (None, math.inf):
        net = Network.chain([Dense(6, activation="tanh"), Dense(3)], input_shape=(8,),
                            backend="numpy", seed=0)
        tr = TweenTrainer(net, TweenConfig(gradient_clip=c, update_clip=c, momentum=0.0))
        tr.step(x, y, 0.1)
        results.append([np.array(p.value) for p in net.parameters()])
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
    for bad in (0.0, -1.0, "big"):
        with pytest.raises(ConfigError, match="update_clip"):
            TweenConfig(update_clip=bad)


def test_corrected_batch_step_clips_the_averaged_update():
    """The batch update is clip(mean of the per-sample unclipped updates), not the mean of
    per-sample clipped updates."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5)) * 3).astype(np.float32)
    labels = np.array([0, 2])
    limit = 1e-3

    def update(xb, lb, clip):
        net = Network.chain([Dense(6, activation="tanh"), Dense(3)], input_shape=(5,),
                            backend="numpy", seed=0)
        tr = TweenTrainer(net, TweenConfig(momentum=0.0, update_clip=clip))
        before = [np.array(p.value) for p in net.parameters()]
        tr.step(xb, lb, 1.0)
        return [np.array(p.value) - w for p, w in zip(net.parameters(), before, strict=True)]

    batch = update(x, labels, limit)
    raw = [(a + b) / 2 for a, b in zip(update(x[:1], labels[:1], None),
                                        update(x[1:], labels[1:], None), strict=True)]
    for got, r in zip(batch, raw, strict=True):
        np.testing.assert_allclose(got, np.clip(r, -limit, limit), rtol=1e-4, atol=1e-7)


def test_fit_refuses_labels_outside_the_classes():
    x, y = _data(16)
    tr = TweenTrainer(_deep(), TweenConfig())
    with pytest.raises(LoomxError, match=r"labels must lie in \[0, 3\]"):
        tr.fit(x, y + 4, epochs=1, rate=0.1)
    with pytest.raises(LoomxError, match="eval_data labels"):
        tr.fit(x, y, epochs=1, rate=0.1, eval_data=(x, y - 1))
