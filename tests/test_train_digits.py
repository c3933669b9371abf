"""End-to-end: the digits data set reaches the target held-out accuracy on numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest

from loomx.errors import LoomxError
from loomx.grid import Network
from loomx.layers import Conv2D, Dense, Flatten, MaxPool2D
from loomx.train import evaluate, fit, load_digits

BACKENDS = ["numpy", "torch"]


pytestmark = pytest.mark.usefixtures("single_threaded")


def test_digits_loader_shapes_and_split():
    x, y, xt, yt = load_digits(seed=0)
    assert x.shape == (1437, 64) and xt.shape == (360, 64)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() == 1.0
    assert sorted(set(yt.tolist())) == list(range(10))
    xi, _, xti, _ = load_digits(seed=0, image=True)
    assert xi.shape == (1437, 1, 8, 8) and xti.shape == (360, 1, 8, 8)
    np.testing.assert_array_equal(xi.reshape(-1, 64), x)
    other = load_digits(seed=1)[2]
    assert not np.array_equal(other, xt)
    with pytest.raises(LoomxError, match="test_fraction"):
        load_digits(test_fraction=1.5)


@pytest.mark.parametrize("spec", BACKENDS)
def test_mlp_reaches_95_percent(spec):
    x, y, xt, yt = load_digits(seed=0)
    net = Network.chain([Dense(64, activation="relu"), Dense(10)], input_shape=(64,),
                        backend=spec, seed=0)
    h = fit(net, x, y, epochs=10, batch_size=32, lr=3e-3, schedule="cosine", progress=False)
    result = evaluate(net, xt, yt)
    assert result.accuracy >= 0.95, result.accuracy
    assert h["loss"][-1] < 0.2 < h["loss"][0]
    assert result.deviation.score > 90.0
    assert int(result.confusion.sum()) == 360


@pytest.mark.parametrize("spec", BACKENDS)
def test_small_cnn_reaches_97_percent(spec):
    x, y, xt, yt = load_digits(seed=0, image=True)
    net = Network.chain([Conv2D(32, 3, padding=1, activation="relu"), MaxPool2D(2), Flatten(),
                         Dense(64, activation="relu"), Dense(10)],
                        input_shape=(1, 8, 8), backend=spec, seed=0)
    fit(net, x, y, epochs=10, batch_size=32, lr=3e-3, schedule="cosine", progress=False)
    result = evaluate(net, xt, yt)
    assert result.accuracy >= 0.97, result.accuracy


def test_same_seed_same_run_on_numpy_and_torch():
    x, y, xt, yt = load_digits(seed=0)
    losses = {}
    for spec in BACKENDS:
        net = Network.chain([Dense(32, activation="relu"), Dense(10)], input_shape=(64,),
                            backend=spec, seed=3)
        losses[spec] = fit(net, x, y, epochs=2, batch_size=64, progress=False,
                           seed=4)["loss"]
    np.testing.assert_allclose(losses["numpy"], losses["torch"], rtol=1e-4)
