"""Loom's benchmark artefacts, reproduced by the faithful harness and removed by the fixed one."""

from __future__ import annotations

import os

import numpy as np
import pytest

from benchmarks.tween import archs, data
from benchmarks.tween.runners import run_adaptation, run_static
from loomx.tween import TweenConfig, TweenTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quadrant_prior_and_bayes_rate():
    x, y = data.quadrant(200_000, 8, np.random.default_rng(0))
    prior = np.bincount(y) / len(y)
    assert prior == pytest.approx([0.483, 0.258, 0.258], abs=0.004)
    assert (data.quadrant_rule(x) == y).mean() == pytest.approx(0.9333, abs=0.003)


def _quadrant_attn(seed=0):
    x, y = data.quadrant(500, 64, np.random.default_rng(seed))
    return archs.reshape_input(x, "Attn"), y


def _outputs(net, backend, x):
    y, _ = net.forward(backend.from_host(x), False)
    return backend.to_host(y).reshape(len(x), -1)


@pytest.mark.parametrize("arch", ["Attn", "Norm"])
def test_faithful_networks_ignore_their_input(backend, arch):
    """HeadDim=0 attention / NormSize=0 LayerNorm make Loom's networks input-independent;
    the fixed harness's networks are not."""
    rng = np.random.default_rng(1)
    width = 64 if arch == "Attn" else 16
    x = archs.reshape_input(rng.uniform(-1, 1, (6, width)).astype(np.float32), arch)
    faithful, _ = archs.build(arch, 3, 3, True, backend, 0)
    fixed, _ = archs.build(arch, 3, 3, False, backend, 0)
    out = _outputs(faithful, backend, x)
    np.testing.assert_array_equal(out, np.broadcast_to(out[:1], out.shape))
    assert np.ptp(_outputs(fixed, backend, x), axis=0).max() > 1e-3


def test_faithful_attention_plateaus_at_majority_class(backend):
    """Test 16's Attn-3L (HeadDim=0) under Loom's tweening predicts the majority class for
    every sample: the "~48 % barrier" is the 48.3 % class prior."""
    x, y = _quadrant_attn()
    net, _ = archs.build("Attn", 3, 3, True, backend, 0)
    tr = TweenTrainer(net, TweenConfig.faithful(), output_size=3, telemetry=False)
    for i in range(150):
        tr.step(backend.from_host(x[i:i + 1]), [int(y[i])], 0.15)
    pred = backend.to_host(tr.predict(backend.from_host(x)))
    majority = np.bincount(y, minlength=3).argmax()
    assert (pred == majority).all()
    assert (pred == y).mean() == pytest.approx((y == majority).mean())
    assert 100 * (y == majority).mean() == pytest.approx(48.3, abs=3.0)


def test_fixed_attention_leaves_the_plateau():
    """With head_dim = d/heads (the fixed harness) corrected tweening fits the training set
    well above the majority rate."""
    import loomx

    backend = loomx.get_backend("numpy")
    x, y = _quadrant_attn()
    net, _ = archs.build("Attn", 3, 3, False, backend, 0)
    res = run_static("NormTween", net, backend, (x, y), (x, y), 2000, False, 0)
    majority = 100 * np.bincount(y).max() / len(y)
    assert res["train_acc"] > majority + 8


def test_step_tween_is_tchain_in_the_faithful_harness():
    import loomx

    backend = loomx.get_backend("numpy")
    x, y = data.quadrant(500, 8, np.random.default_rng(0))
    results = {}
    for faithful in (True, False):
        for mode in ("StepTween", "TChain"):
            net, _ = archs.build("Dense", 3, 3, faithful, backend, 5)
            run_static(mode, net, backend, (x, y), (x, y), 60, faithful, 5)
            results[(faithful, mode)] = backend.to_host(net[0].params["weight"])
    np.testing.assert_array_equal(results[(True, "StepTween")], results[(True, "TChain")])
    assert not np.allclose(results[(False, "StepTween")], results[(False, "TChain")])


def test_label_persistence_matches_the_headline_adaptation_curve():
    """Copying the previous step's optimal action scores what Loom reports for StepTweenChain
    (≈ 64 %): CHASE ≈ 45 %, AVOID ≈ 100 %."""
    import loomx

    backend = loomx.get_backend("numpy")
    net, _ = archs.build("Dense", 3, 4, True, backend, 0, all_leaky=True)
    avgs, curves = [], []
    for seed in range(3):
        r = run_adaptation("Persistence", net, backend, lambda o: o, seed, 3000, 10)
        avgs.append(r["avgAccuracy"])
        curves.append(r["windows"])
    assert np.mean(avgs) == pytest.approx(64.0, abs=4.0)
    w = np.mean(curves, axis=0)
    assert w[4] > 95 and w[5] > 95 and w[1] < 60 and w[8] < 60


def test_results_report_has_every_baseline():
    path = os.path.join(ROOT, "benchmarks", "tween", "RESULTS.md")
    text = open(path, encoding="utf-8").read()
    for word in ("majority", "Bayes", "Persistence", "SGD", "Adam", "python -m benchmarks.tween",
                 "faithful", "fixed", "± "):
        assert word in text, word
