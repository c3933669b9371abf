"""``fit`` state handling: tied weights across resume and best-weight restore, optimizer
instances, custom schedules on resume, ``monitor`` validation, the best weights after a NaN."""

from __future__ import annotations

import os

import numpy as np
import pytest

from loomx.errors import ConfigError, TrainingError
from loomx.grid import Network
from loomx.layers import Dense
from loomx.train import Adam, Callback, fit, get_schedule
from loomx.train.schedules import Schedule

pytestmark = pytest.mark.usefixtures("single_threaded")


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int64)
    return x, y


def _net(seed=0):
    return Network.chain([Dense(8, activation="relu"), Dense(3)], input_shape=(6,),
                         backend="numpy", seed=seed)


def _tied_net():
    """Slots 0 and 1 hold one kernel array [6, 6]."""
    net = Network(1, 1, 3, layers=[Dense(6, activation="tanh"), Dense(6, activation="tanh"),
                                   Dense(3)], input_shape=(6,), backend="numpy", seed=0)
    net[1].params["weight"] = net[0].params["weight"]
    return net


def _tied(net) -> bool:
    return net[0].params["weight"] is net[1].params["weight"]


def _weights(net):
    return {p.name: np.array(p.value) for p in net.parameters()}


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, st):
        if st.step == self.step:
            raise KeyboardInterrupt


# ---------------------------------------------------------------------------- tied weights
def test_resume_of_tied_weights_keeps_the_tie_and_matches_the_uninterrupted_run(tmp_path):
    x, y = _data()
    opts = dict(epochs=2, batch_size=8, progress=False, checkpoint_every=3)
    ref = _tied_net()
    fit(ref, x, y, checkpoint=tmp_path / "ref.ckpt", **opts)
    ck = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(_tied_net(), x, y, checkpoint=ck, callbacks=[_StopAt(4)], **opts)
    net = _tied_net()
    fit(net, x, y, checkpoint=ck, resume=True, **opts)
    assert _tied(net)
    want = _weights(ref)
    for k, v in _weights(net).items():
        np.testing.assert_array_equal(v, want[k])


def test_restore_best_weights_keeps_tied_weights_tied(tmp_path):
    x, y = _data()
    net = _tied_net()
    seen = {}

    class Keep(Callback):
        def on_epoch_end(self, st, logs):
            if st.best_epoch == st.epoch:
                seen["best"] = _weights(st.net)

    fit(net, x, y, epochs=3, batch_size=8, restore_best_weights=True, progress=False,
        callbacks=[Keep()])
    assert _tied(net)
    for k, v in _weights(net).items():
        np.testing.assert_array_equal(v, seen["best"][k])
    # resumed from a checkpoint holding best weights: still one array
    ck = tmp_path / "best.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(_tied_net(), x, y, epochs=3, batch_size=8, restore_best_weights=True,
            checkpoint=ck, progress=False, callbacks=[_StopAt(7)])
    net = _tied_net()
    fit(net, x, y, epochs=3, batch_size=8, restore_best_weights=True, checkpoint=ck,
        resume=True, progress=False)
    assert _tied(net)


# ---------------------------------------------------------------------------- optimizers
def test_optimizer_instance_of_another_network_is_refused():
    x, y = _data()
    other, net = _net(), _net()
    with pytest.raises(ConfigError, match="not this network's"):
        fit(net, x, y, optimizer=Adam(other, lr=1e-2), epochs=1, progress=False)


def test_optimizer_options_with_an_instance_are_refused():
    x, y = _data()
    net = _net()
    with pytest.raises(ConfigError, match="cannot be applied to an optimizer instance"):
        fit(net, x, y, optimizer=Adam(net), optimizer_options={"weight_decay": 0.5},
            epochs=1, progress=False)


def test_optimizer_instance_built_on_the_network_trains_it():
    x, y = _data()
    net = _net()
    before = _weights(net)
    fit(net, x, y, optimizer=Adam(net, lr=1e-2), epochs=1, progress=False)
    assert any(not np.array_equal(v, before[k]) for k, v in _weights(net).items())


# ---------------------------------------------------------------------------- schedules
class _Halve(Schedule):
    """Not in the registry: halves ``lr`` every 4 steps."""

    name = "halve"

    def __init__(self, lr):
        self.lr = lr

    def __call__(self, step):
        return self.lr * 0.5 ** (step // 4)


class _Counting(_Halve):
    """Keeps state of its own: how many times it was asked for a rate."""

    name = "counting"

    def __init__(self, lr):
        super().__init__(lr)
        self._calls = 0

    def __call__(self, step):
        self._calls += 1
        return super().__call__(step)

    def state_dict(self):
        return {"calls": self._calls}

    def load_state_dict(self, state):
        self._calls = state["calls"]


def test_resume_keeps_a_custom_schedule_instance(tmp_path):
    x, y = _data(64)
    opts = dict(epochs=3, batch_size=16, progress=False)
    ref = _net()
    h_ref = fit(ref, x, y, schedule=_Halve(0.01), **opts)
    ck = tmp_path / "s.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fit(_net(), x, y, schedule=_Halve(0.01), checkpoint=ck, callbacks=[_StopAt(6)], **opts)
    net = _net()
    h = fit(net, x, y, schedule=_Halve(0.01), checkpoint=ck, resume=True, **opts)
    assert h["lr"] == h_ref["lr"]
    want = _weights(ref)
    for k, v in _weights(net).items():
        np.testing.assert_array_equal(v, want[k])


def test_resume_restores_a_schedule_state(tmp_path):
    x, y = _data(64)
    ck = tmp_path / "c.ckpt"
    opts = dict(epochs=3, batch_size=16, progress=False, checkpoint=ck)
    with pytest.raises(KeyboardInterrupt):
        fit(_net(), x, y, schedule=_Counting(0.01), callbacks=[_StopAt(6)], **opts)
    sched = _Counting(0.01)
    fit(_net(), x, y, schedule=sched, resume=True, **opts)
    assert sched._calls == 12  # 6 before the interruption, 6 after


def test_warmup_without_warmup_steps_is_a_config_error():
    with pytest.raises(ConfigError, match="warmup_steps"):
        get_schedule({"name": "warmup", "after": "cosine"}, lr=1e-3, total_steps=100)


# ---------------------------------------------------------------------------- monitor
def test_bad_monitor_is_refused_before_any_step(tmp_path):
    x, y = _data()
    steps = []

    class Count(Callback):
        def on_step_end(self, st):
            steps.append(st.step)

    ck = tmp_path / "m.ckpt"
    with pytest.raises(ConfigError, match="cannot monitor 'val_acc'"):
        fit(_net(), x, y, epochs=2, early_stopping=2, monitor="val_acc", checkpoint=ck,
            progress=False, callbacks=[Count()])
    assert steps == [] and not os.path.exists(ck)
    # names that the run reports are accepted
    fit(_net(), x, y, epochs=1, early_stopping=2, monitor="val_accuracy",
        validation_split=0.25, progress=False)


# ---------------------------------------------------------------------------- NaN
class _Blowup(Callback):
    def __init__(self, epoch):
        self.epoch = epoch
        self.best = None

    def on_epoch_end(self, st, logs):
        if st.epoch == self.epoch:
            if st.best_weights is not None:
                self.best = {k: np.array(v) for k, v in st.best_weights.items()}
            for p in st.net.parameters():
                p.value = p.value * 1e30


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_puts_back_the_best_weights_when_restore_best_weights():
    x, y = _data(128)
    net = _net()
    blow = _Blowup(2)
    with pytest.raises(TrainingError, match="weights of the best epoch"):
        fit(net, x, y, epochs=6, validation_split=0.25, restore_best_weights=True,
            progress=False, callbacks=[blow])
    for k, v in _weights(net).items():
        assert np.isfinite(v).all()
        np.testing.assert_array_equal(v, blow.best[k])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_without_restore_best_weights_leaves_the_weights():
    x, y = _data(128)
    net = _net()
    with pytest.raises(TrainingError) as info:
        fit(net, x, y, epochs=6, validation_split=0.25, progress=False,
            early_stopping=5, callbacks=[_Blowup(2)])
    assert "best epoch" not in str(info.value)


def test_float64_data_trains_a_float32_network_in_float32():
    """numpy float64 inputs on the numpy backend are cast per batch, as host data always was
    on other backends: the weights and the optimizer state stay float32."""
    from loomx.train.optim import Adam

    net = Network.chain([Dense(8, activation="relu"), Dense(3)], input_shape=(5,),
                        backend="numpy", seed=0)
    x = np.random.default_rng(0).standard_normal((23, 5))  # float64
    opt = Adam(net)
    fit(net, x, np.arange(23) % 3, optimizer=opt, epochs=2, batch_size=8, progress=False)
    assert {str(p.value.dtype) for p in net.parameters()} == {"float32"}
    assert {str(v.dtype) for st in opt.state.values() for v in st.values()} == {"float32"}


@pytest.mark.parametrize("spec, dtype", [("numpy", "float16"), ("torch", "bfloat16")])
def test_loss_sums_and_counts_of_low_precision_networks_are_exact(spec, dtype):
    """Running sums are float64: with the learning rate at 0 the training and validation
    loss of the same data agree, and a confusion matrix counts every sample."""
    if spec == "torch":
        pytest.importorskip("torch")
    import loomx
    from loomx.train import evaluate

    b = loomx.get_backend(spec, dtype)
    net = Network.chain([Dense(8, activation="relu"), Dense(3)], input_shape=(5,), backend=b,
                        seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6000, 5)).astype(np.float32)
    y = rng.integers(0, 3, 6000)
    history = fit(net, x, y, optimizer="sgd", lr=0.0, epochs=1, batch_size=32,
                  validation_data=(x, y), progress=False)
    assert history["loss"][0] == pytest.approx(history["val_loss"][0], rel=1e-3)
    result = evaluate(net, x, y, batch_size=32)
    assert int(np.asarray(result.confusion).sum()) == 6000
    assert result.loss == pytest.approx(history["val_loss"][0], rel=1e-3)


def test_integer_features_are_cast_and_ids_are_not():
    """fit and evaluate cast uint8 pixels (or any integer features) to the network's float
    dtype; a network that starts with an Embedding gets its ids as they are."""
    from loomx.layers import Embedding, Flatten
    from loomx.train import evaluate

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 6)).astype(np.uint8)
    y = rng.integers(0, 3, 24)
    net = Network.chain([Dense(3)], input_shape=(6,), backend="numpy", seed=0)
    fit(net, x, y, epochs=1, batch_size=8, progress=False)
    assert evaluate(net, x, y).accuracy is not None
    ids = rng.integers(0, 10, (24, 4))
    emb = Network.chain([Embedding(10, 5), Flatten(), Dense(3)], input_shape=(4,),
                        backend="numpy", seed=0)
    fit(emb, ids, y, epochs=1, batch_size=8, progress=False)


def test_a_float64_network_gets_float64_batches():
    """The network's own dtype, not its backend's, is the dtype of its batches."""
    seen = []
    net = Network(1, 1, 2, layers=[Dense(4), Dense(3)], input_shape=(5,), backend="numpy",
                  dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((8, 5))
    original = net[0].forward

    def forward(x, train=False, **kw):
        seen.append(str(x.dtype))
        return original(x, train, **kw)

    net[0].forward = forward
    fit(net, x, np.arange(8) % 3, epochs=1, batch_size=4, progress=False)
    assert seen and set(seen) == {"float64"}
