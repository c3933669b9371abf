"""Integer labels on a one-output network: the labels are the targets ``[B, 1]`` (binary
classification with ``bce_logits`` / ``bce``, integer regression with ``mse``)."""

from __future__ import annotations

import numpy as np
import pytest

from loomx.errors import LoomxError, ShapeError
from loomx.grid import Network
from loomx.layers import Dense
from loomx.train import evaluate, fit, get_loss

pytestmark = pytest.mark.usefixtures("single_threaded")


def _data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def _net(width=1, activation=None):
    return Network.chain([Dense(8, activation="relu"), Dense(width, activation=activation)],
                         input_shape=(4,), backend="numpy", seed=0)


@pytest.mark.parametrize("name", ["bce_logits", "bce", "mse"])
def test_int_labels_on_one_output_are_the_targets(name):
    rng = np.random.default_rng(1)
    out = rng.uniform(0.05, 0.95, (5, 1))
    labels = np.array([0, 1, 1, 0, 1])
    loss = get_loss(name)
    v_int, g_int = loss(out, labels)
    v_float, g_float = loss(out, labels[:, None].astype(np.float64))
    np.testing.assert_allclose(v_int, v_float)
    np.testing.assert_allclose(g_int, g_float)


@pytest.mark.parametrize("name", ["cross_entropy", "cross_entropy_probs"])
def test_softmax_loss_on_one_output_refuses_int_labels(name):
    with pytest.raises(ShapeError, match="C ≥ 2"):
        get_loss(name)(np.zeros((3, 1)), np.array([0, 1, 0]))


def test_fit_and_evaluate_a_binary_classifier_with_one_output():
    x, y = _data()
    net = _net()
    h = fit(net, x, y, loss="bce_logits", epochs=15, lr=1e-2, progress=False,
            validation_split=0.25)
    assert h["accuracy"][-1] > 0.9 and h["val_accuracy"][-1] > 0.9
    r = evaluate(net, x, y)  # default loss for labels on one output: bce_logits
    logits = np.asarray(net.forward(x, train=False)[0])[:, 0]
    assert r.accuracy == pytest.approx(np.mean((logits > 0) == y))
    assert r.accuracy > 0.9
    assert r.confusion.shape == (2, 2) and int(r.confusion.sum()) == len(y)
    want, _ = get_loss("bce_logits")(net.forward(x, train=False)[0], y[:, None] * 1.0)
    assert r.loss == pytest.approx(float(want), rel=1e-5)


def test_bce_on_probabilities_thresholds_at_one_half():
    x, y = _data()
    net = _net(activation="sigmoid")
    fit(net, x, y, loss="bce", epochs=10, lr=1e-2, progress=False)
    r = evaluate(net, x, y, loss="bce")
    probs = np.asarray(net.forward(x, train=False)[0])[:, 0]
    assert r.accuracy == pytest.approx(np.mean((probs > 0.5) == y))


def test_one_output_label_checks():
    x, y = _data(32)
    with pytest.raises(LoomxError, match="C ≥ 2"):
        fit(_net(), x, y, epochs=1, progress=False)  # default cross_entropy
    with pytest.raises(LoomxError, match="binary labels 0 and 1"):
        fit(_net(), x, y * 3, loss="bce_logits", epochs=1, progress=False)
    # integer regression with MSE: any integers
    h = fit(_net(), x, y * 3 - 1, loss="mse", epochs=1, progress=False)
    assert "accuracy" in h.metrics  # the nearest integer, as evaluate counts it
    r = evaluate(_net(), x, y * 3 - 1, loss="mse")
    assert r.confusion is None and r.accuracy is not None


def test_labels_out_of_range_for_a_wide_output_are_refused():
    x, y = _data(32)
    with pytest.raises(LoomxError, match=r"labels must lie in \[0, 2\]"):
        fit(_net(3), x, y + 2, epochs=1, progress=False)
    with pytest.raises(LoomxError, match=r"labels must lie in \[0, 2\]"):
        evaluate(_net(3), x, y - 1)


def test_integer_labels_report_training_accuracy_with_every_loss():
    """Training accuracy is counted wherever validation accuracy is: integer labels with
    MSE on a wide output (argmax) too."""
    import numpy as np

    from loomx.grid import Network
    from loomx.layers import Dense
    from loomx.train import fit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 4)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    net = Network.chain([Dense(3)], input_shape=(4,), backend="numpy", seed=0)
    history = fit(net, x, y, loss="mse", epochs=1, batch_size=10, validation_data=(x, y),
                  progress=False)
    assert "accuracy" in history.metrics and "val_accuracy" in history.metrics
