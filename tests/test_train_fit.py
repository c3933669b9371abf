"""``fit``: data validation, NaN detection, accumulation, early stopping, exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from loomx.errors import ConfigError, FormatError, LoomxError, ShapeError, TrainingError
from loomx.grid import Network
from loomx.io.checkpoint import load_checkpoint
from loomx.layers import Dense, Dropout
from loomx.train import Callback, fit, get_optimizer

pytestmark = pytest.mark.usefixtures("single_threaded")


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    w = rng.standard_normal((6, 3))
    y = np.argmax(x @ w, axis=1).astype(np.int64)
    return x, y


def _net(backend, seed=1, dropout=False):
    hidden = [Dense(12, activation="tanh")] + ([Dropout(0.2)] if dropout else [])
    net = Network.chain([*hidden, Dense(3)])
    net.build((6,), backend, seed)
    return net


def _weights(net):
    return {p.name: net.backend.to_host(p.value).copy() for p in net.parameters()}


def test_fit_learns_and_returns_history(backend):
    x, y = _data()
    net = _net(backend)
    h = fit(net, x, y, epochs=6, batch_size=16, lr=0.03, progress=False,
            validation_split=0.25, log_every=2)
    assert h.epochs == list(range(6))
    assert h.steps == 6 * 5
    assert set(h.metrics) == {"loss", "accuracy", "lr", "val_loss", "val_accuracy"}
    assert h["loss"][-1] < h["loss"][0] * 0.7
    assert h["accuracy"][-1] > 0.8
    assert [e["step"] for e in h.log][:3] == [2, 4, 5]  # every 2 steps and at epoch ends
    assert all(np.isfinite(e["loss"]) for e in h.log)


def test_device_arrays_train_like_host_arrays(backend):
    x, y = _data(48)
    a, b = _net(backend), _net(backend)
    opts = dict(epochs=2, batch_size=16, progress=False, seed=3)
    ha = fit(a, x, y, **opts)
    hb = fit(b, backend.from_host(x), backend.from_host(y), **opts)
    assert ha.metrics == hb.metrics
    for k, v in _weights(a).items():
        np.testing.assert_array_equal(_weights(b)[k], v)


BAD_INPUTS = {
    "labels out of range": (lambda x, y: (x, np.where(y == 2, 3, y)), r"labels in \[0, 3\]"),
    "negative label": (lambda x, y: (x, y - 1), r"must lie in \[0, 2\]"),
    "NaN in x": (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x)
                               .astype(np.float32), y), "contains 1 NaN"),
    "mismatched lengths": (lambda x, y: (x, y[:-1]), "96 samples but y has 95"),
    "wrong input shape": (lambda x, y: (x[:, :5], y), r"shape \[5\] but the network expects"),
    "2-d labels": (lambda x, y: (x, y[:, None]), r"must be \[N\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_before_any_step(backend, case):
    make, message = BAD_INPUTS[case]
    x, y = make(*_data())
    net = _net(backend)
    before = _weights(net)
    steps = []
    cb = type("Count", (Callback,), {"on_step_end": lambda self, st: steps.append(st.step)})()
    with pytest.raises(LoomxError, match=message):
        fit(net, x, y, epochs=1, progress=False, callbacks=[cb])
    assert steps == []
    for k, v in _weights(net).items():
        np.testing.assert_array_equal(v, before[k])


def test_bad_validation_data_and_options(backend):
    x, y = _data()
    net = _net(backend)
    with pytest.raises(ShapeError, match="validation x has 96 samples but validation y"):
        fit(net, x, y, validation_data=(x, y[:10]), progress=False)
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        fit(net, x, y, batch_size=0, progress=False)
    with pytest.raises(ConfigError, match="either validation_data or validation_split"):
        fit(net, x, y, validation_data=(x, y), validation_split=0.1, progress=False)
    with pytest.raises(ConfigError, match="resume=True needs checkpoint"):
        fit(net, x, y, resume=True, progress=False)


class _Poison(Callback):
    """Sets a weight to NaN after step ``at``: the next step's loss is NaN."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, state):
        if state.step == self.at:
            p = next(iter(state.net.parameters()))
            p.value = p.value * float("nan")


def test_nan_loss_stops_with_the_step_named(backend):
    x, y = _data()
    net = _net(backend)
    with pytest.raises(TrainingError, match=r"NaN or infinite at step 8 .*detected at step 10"):
        fit(net, x, y, epochs=3, batch_size=16, progress=False, log_every=5,
            callbacks=[_Poison(7)])


def test_gradient_accumulation_equals_a_larger_batch(backend):
    x, y = _data(64)
    a, b = _net(backend), _net(backend)
    ha = fit(a, x, y, epochs=2, batch_size=8, accumulate=4, optimizer="sgd", lr=0.1,
             shuffle=False, progress=False)
    hb = fit(b, x, y, epochs=2, batch_size=32, optimizer="sgd", lr=0.1, shuffle=False,
             progress=False)
    assert ha.steps == hb.steps == 4
    for k, v in _weights(b).items():
        np.testing.assert_allclose(_weights(a)[k], v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ha["loss"], hb["loss"], rtol=1e-5)


def test_early_stopping_restores_best_weights(backend):
    x, y = _data()
    net = _net(backend)
    snapshots = {}

    class Snap(Callback):
        def on_epoch_end(self, state, logs):
            snapshots[state.epoch] = _weights(state.net)

    # a huge learning rate makes validation loss worsen quickly
    h = fit(net, x, y, epochs=30, batch_size=16, optimizer="sgd", lr=3.0,
            validation_split=0.25, early_stopping=2, restore_best_weights=True,
            progress=False, callbacks=[Snap()])
    assert h.stopped_epoch is not None and h.stopped_epoch == h.best_epoch + 2
    assert len(h.epochs) == h.stopped_epoch + 1
    assert h.best_value == min(h["val_loss"])
    for k, v in _weights(net).items():
        np.testing.assert_array_equal(v, snapshots[h.best_epoch][k])


class _Interrupt(Callback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, state):
        if state.step == self.at:
            raise KeyboardInterrupt


FIT_OPTS = dict(epochs=4, batch_size=10, accumulate=2, optimizer="adamw", lr=0.02,
                schedule={"name": "warmup", "warmup_steps": 3, "after": "cosine"},
                clip_norm=1.0, validation_split=0.2, early_stopping=10,
                restore_best_weights=True, log_every=3, seed=5, progress=False)


@pytest.mark.parametrize("interrupt_at,every", [(17, 5), (10, None)])
def test_resume_reproduces_the_uninterrupted_run_exactly(backend, tmp_path, interrupt_at,
                                                         every):
    x, y = _data(160)  # 128 training samples: 7 steps per epoch, 28 in all
    ref_net = _net(backend, dropout=True)
    ref = fit(ref_net, x, y, **FIT_OPTS)

    path = tmp_path / "run.ckpt"
    net = _net(backend, dropout=True)
    with pytest.raises(KeyboardInterrupt):
        fit(net, x, y, checkpoint=path, checkpoint_every=every,
            callbacks=[_Interrupt(interrupt_at)], **FIT_OPTS)
    assert path.exists() and [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]
    assert load_checkpoint(path)[1]["step"] == (15 if every else 7)
    # different weights and dropout stream: everything must come from the file
    fresh = _net(backend, seed=99, dropout=True)
    resumed = fit(fresh, x, y, checkpoint=path, checkpoint_every=every, resume=True,
                  **FIT_OPTS)
    for k, v in _weights(ref_net).items():
        np.testing.assert_array_equal(_weights(fresh)[k], v, err_msg=k)
    assert resumed.metrics == ref.metrics
    assert resumed.log == ref.log
    assert resumed.steps == ref.steps


def test_resume_with_other_settings_is_refused(backend, tmp_path):
    x, y = _data(40)
    path = tmp_path / "c.ckpt"
    fit(_net(backend), x, y, epochs=1, batch_size=10, checkpoint=path, progress=False)
    with pytest.raises(ConfigError, match="resume with the same data, batch_size"):
        fit(_net(backend), x, y, epochs=1, batch_size=20, checkpoint=path, resume=True,
            progress=False)


def test_optimizer_instance_and_callable_callback(backend):
    x, y = _data(32)
    net = _net(backend)
    opt = get_optimizer("sgd_momentum", net, lr=0.05)
    seen = []
    h = fit(net, x, y, optimizer=opt, epochs=2, batch_size=16, progress=False,
            callbacks=[lambda state, logs: seen.append((state.epoch, round(logs["loss"], 6)))])
    assert opt.step_count == 4 and h["lr"] == [0.05, 0.05]
    assert seen == [(i, round(v, 6)) for i, v in enumerate(h["loss"])]
    # a second run with a schedule starts again from the optimizer's base rate
    h2 = fit(net, x, y, optimizer=opt, schedule="linear", epochs=1, batch_size=16,
             progress=False)
    assert h2.log[0]["lr"] == pytest.approx(0.05 + (0.0005 - 0.05) * 1 / 2)


def test_corrupt_or_foreign_checkpoint_is_a_format_error(backend, tmp_path):
    from safetensors.numpy import save_file

    x, y = _data(40)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FormatError, match="not a readable checkpoint"):
        fit(_net(backend), x, y, epochs=1, checkpoint=bad, resume=True, progress=False)
    foreign = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(FormatError, match="not a loomx checkpoint"):
        fit(_net(backend), x, y, epochs=1, checkpoint=foreign, resume=True, progress=False)
