"""Loom's deviation metrics and ``evaluate``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loomx.errors import FormatError, LoomxError
from loomx.grid import Network
from loomx.layers import Dense
from loomx.train import DeviationMetrics, evaluate
from loomx.train.metrics import bucket_of, deviation_percent


def test_loom_reference_example():
    # Loom: expected [1,1,1], actual [1,1.5,3] → score 50, avg dev 83.3, 1 failure
    m = DeviationMetrics.from_values([1.0, 1.0, 1.0], [1.0, 1.5, 3.0])
    assert m.score == pytest.approx(50.0)
    assert m.average_deviation == pytest.approx(250 / 3)
    assert m.failures == 1
    assert m.counts() == {"0-10%": 1, "10-20%": 0, "20-30%": 0, "30-40%": 0, "40-50%": 1,
                          "50-100%": 0, "100%+": 1}
    assert m.samples_in_bucket("100%+") == [2]


@pytest.mark.parametrize("dev,bucket", [(0.0, "0-10%"), (10.0, "0-10%"), (10.0001, "10-20%"),
                                        (50.0, "40-50%"), (100.0, "50-100%"),
                                        (100.5, "100%+")])
def test_bucket_upper_bounds_are_inclusive(dev, bucket):
    assert bucket_of(dev) == bucket


def test_deviation_rules():
    assert deviation_percent(0.0, 0.25) == pytest.approx(25.0)  # |e| < 1e-10: absolute
    assert deviation_percent(2.0, 3.0) == pytest.approx(50.0)
    assert deviation_percent(-2.0, -1.0) == pytest.approx(50.0)
    assert deviation_percent(1.0, math.nan) == 100.0  # NaN lands in 50-100%, not 100%+
    assert deviation_percent(1.0, math.inf) == 100.0
    m = DeviationMetrics.from_values([1.0], [math.nan])
    assert m.counts()["50-100%"] == 1 and m.failures == 0 and m.score == 0.0
    empty = DeviationMetrics.from_values([], [])
    assert empty.score == 0.0 and empty.average_deviation == 0.0
    with pytest.raises(FormatError, match="expected has 2 values but actual has 1"):
        DeviationMetrics.from_values([1.0, 2.0], [1.0])


def test_worst_samples_summary_and_json_round_trip(tmp_path):
    m = DeviationMetrics.from_values([1.0, 2.0, 4.0, 1e-12], [1.1, 5.0, 4.0, math.inf])
    worst = m.worst_samples(2)
    assert [w.sample_index for w in worst] == [1, 3]
    assert "quality score" in m.summary() and "█" in m.summary()
    path = m.save(tmp_path / "metrics.json")
    doc = json.loads(path.read_text())
    assert doc["buckets"]["100%+"]["range_max"] == 1e9  # Inf sanitised as Loom does
    assert doc["results"][3]["actual"] == 1e9
    assert set(doc) == {"total_samples", "score", "avg_deviation", "failures", "buckets",
                        "results"}
    again = DeviationMetrics.load(path)
    assert again.counts() == m.counts()
    assert again.score == pytest.approx(m.score)
    assert [r.bucket for r in again.results] == [r.bucket for r in m.results]
    (tmp_path / "bad.json").write_text('{"score": 1}')
    with pytest.raises(FormatError, match="not a deviation-metrics document"):
        DeviationMetrics.load(tmp_path / "bad.json")


def test_evaluate_classification(backend):
    net = Network.chain([Dense(4)])
    net.build((3,), backend, 0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    y = rng.integers(0, 4, 50)
    w = backend.to_host(net.slots[0].params["weight"])
    logits = x @ w.T
    pred = logits.argmax(1)
    r = evaluate(net, x, y, batch_size=16)
    assert r.samples == 50
    assert r.accuracy == pytest.approx(np.mean(pred == y))
    shifted = logits - logits.max(1, keepdims=True)
    ce = np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(50), y])
    assert r.loss == pytest.approx(ce, rel=1e-5)
    expected_cm = np.zeros((4, 4), np.int64)
    np.add.at(expected_cm, (y, pred), 1)
    np.testing.assert_array_equal(r.confusion, expected_cm)
    ref = DeviationMetrics.from_values(y.astype(float).tolist(), pred.astype(float).tolist())
    assert r.deviation.score == pytest.approx(ref.score)
    assert r.deviation.counts() == ref.counts()
    assert r.as_dict()["accuracy"] == r.accuracy


def test_evaluate_regression_and_errors(backend):
    net = Network.chain([Dense(2)])
    net.build((3,), backend, 0)
    x = np.ones((5, 3), np.float32)
    out = backend.to_host(net(backend.from_host(x)))
    r = evaluate(net, x, out * 1.05)
    assert r.accuracy is None and r.confusion is None
    assert r.loss == pytest.approx(np.mean((out * 0.05) ** 2), rel=1e-4, abs=1e-9)
    assert r.deviation.total_samples == 10
    assert r.deviation.counts()["0-10%"] == 10
    with pytest.raises(LoomxError, match="5 samples but y has 4"):
        evaluate(net, x, out[:4])
