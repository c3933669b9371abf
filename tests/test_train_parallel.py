"""BatchParallel: a mini-batch split over CPU threads gives the serial step's gradients."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from loomx.errors import ConfigError, ShapeError
from loomx.grid import Network, Parallel, Residual
from loomx.layers import LSTM, Conv2D, Dense, Dropout, Flatten
from loomx.train import fit
from loomx.train.losses import get_loss
from loomx.train.parallel import BatchParallel, split_batch

from .conftest import assert_close


def _is_cpu(backend) -> bool:
    return str(backend.device).startswith("cpu")


def _cnn(backend):
    return Network.chain([Conv2D(4, 3, padding=1, activation="relu"),
                          Conv2D(6, 3, stride=2, padding=1, activation="tanh"),
                          Flatten(), Dense(5)], input_shape=(2, 8, 8), backend=backend, seed=3)


def _lstm(backend):
    return Network.chain([LSTM(6, return_sequences=False), Dense(5)], input_shape=(4, 3),
                         backend=backend, seed=3)


def _branchy(backend):
    """Residual connections and a parallel branch (nested layers in containers)."""
    return Network.chain([Dense(6, activation="tanh"), Dense(6), Residual(0),
                          Parallel([Dense(3, activation="relu"), Dense(2)], combine_mode="concat"),
                          Dense(5)], input_shape=(6,), backend=backend, seed=3)


def _batch(backend, shape, n=11, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape))
    y = rng.integers(0, 5, n)
    return backend.from_host(x), backend.asarray(y, dtype=backend.xp.int64)


def _grads(net) -> dict:
    return {p.name: p.grad for p in net.parameters()}


def _serial_step(make, backend, x, y, prepare=lambda net: None):
    """``(gradients, output, mean loss)`` of one unsplit cross-entropy step on ``make(backend)``."""
    loss = get_loss("cross_entropy")
    net = make(backend)
    prepare(net)
    net.zero_grad()
    out, ctx = net.forward(x, train=True)
    value, dout = loss(out, y)
    net.backward(dout, ctx)
    return _grads(net), out, value


def _serial_grads(make, backend, x, y, prepare=lambda net: None):
    return _serial_step(make, backend, x, y, prepare)[0]


def _assert_grads(net, expected, backend):
    got = _grads(net)
    assert got.keys() == expected.keys()
    for name in expected:
        assert_close(got[name], expected[name], backend, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n, shards, sizes", [(10, 2, [5, 5]), (11, 3, [4, 3, 4]),
                                              (2, 4, [1, 1]), (1, 1, [1]), (7, 1, [7])])
def test_split_batch_covers_every_row_once(n, shards, sizes):
    parts = split_batch(n, shards)
    assert [p.stop - p.start for p in parts] == sizes
    assert parts[0].start == 0 and parts[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))


@pytest.mark.parametrize("make, shape", [(_cnn, (2, 8, 8)), (_lstm, (4, 3)), (_branchy, (6,))],
                         ids=["cnn", "lstm", "residual-parallel"])
@pytest.mark.parametrize("workers", [2, 3])
def test_gradients_equal_the_serial_step(backend64, make, shape, workers):
    x, y = _batch(backend64, shape)
    net = make(backend64)
    if not _is_cpu(backend64):
        with pytest.raises(ConfigError, match="CPU threads"):
            BatchParallel(net, workers)
        return
    expected, out, value = _serial_step(make, backend64, x, y)
    net.zero_grad()
    with BatchParallel(net, workers) as par:
        results = par.forward_backward(x, y, get_loss("cross_entropy"))
    assert [r.rows for r in results] == split_batch(11, workers)
    _assert_grads(net, expected, backend64)
    # the shards' outputs and mean losses are those of the whole batch
    xp = backend64.xp
    outs = xp.concat([r.out for r in results], axis=0)
    assert_close(outs, out, backend64, rtol=1e-12, atol=1e-12)
    mean = sum(float(r.value) * (r.rows.stop - r.rows.start) for r in results) / 11
    assert mean == pytest.approx(float(value), rel=1e-12)


def test_parameters_are_shared_not_copied(numpy64):
    net = _cnn(numpy64)
    with BatchParallel(net, 2) as par:
        (replica,) = par.replicas
        for a, b in zip(net.parameters(), replica.parameters()):
            assert a.value is b.value
        # an optimizer replacing an array in the network is seen by the replica
        ref = next(iter(net.parameters()))
        ref.value = ref.value * 2.0
        assert next(iter(replica.parameters())).value is ref.value


def test_accumulation_weight_uses_the_group_total(numpy64):
    """``total`` larger than the batch scales the gradients like gradient accumulation."""
    loss = get_loss("cross_entropy")
    x, y = _batch(numpy64, (4, 3), n=6)
    a, b = _lstm(numpy64), _lstm(numpy64)
    a.zero_grad()
    b.zero_grad()
    with BatchParallel(a, 2) as pa, BatchParallel(b, 2) as pb:
        pa.forward_backward(x, y, loss)
        pb.forward_backward(x, y, loss, total=12)
    for ga, gb in zip(_grads(a).values(), _grads(b).values()):
        np.testing.assert_allclose(np.asarray(gb), 0.5 * np.asarray(ga), rtol=1e-12)


def test_blas_thread_limit_is_restored(numpy64):
    before = _blas_threads()
    net = _cnn(numpy64)
    x, y = _batch(numpy64, (2, 8, 8))
    with BatchParallel(net, 2) as par:
        net.zero_grad()
        par.forward_backward(x, y, get_loss("cross_entropy"))
    assert _blas_threads() == before


def test_random_layers_draw_independent_streams_per_shard(numpy64):
    net = Network.chain([Dense(64), Dropout(0.5)], input_shape=(8,), backend=numpy64, seed=0)
    x = numpy64.from_host(np.ones((4, 8)))
    y = numpy64.from_host(np.zeros((4, 64)))
    net.zero_grad()

    def run():
        n = Network.chain([Dense(64), Dropout(0.5)], input_shape=(8,), backend=numpy64, seed=0)
        n.zero_grad()
        with BatchParallel(n, 2) as par:
            res = par.forward_backward(x, y, get_loss("mse"))
        return [np.asarray(r.out) != 0 for r in res]

    first, again = run(), run()
    assert not np.array_equal(first[0], first[1])  # the two shards' masks differ
    for a, b in zip(first, again):  # and each is reproducible
        np.testing.assert_array_equal(a, b)


def test_observers_see_the_first_shard_only(numpy64):
    net = _cnn(numpy64)
    seen = []
    net.add_observer(lambda event: seen.append(event))
    x, y = _batch(numpy64, (2, 8, 8), n=10)
    net.zero_grad()
    with BatchParallel(net, 2) as par:
        par.forward_backward(x, y, get_loss("cross_entropy"))
    assert seen, "the network's own observers still run"
    serial_count = len(seen)
    seen.clear()
    net.zero_grad()
    out, ctx = net.forward(x[:5], train=True)
    net.backward(out, ctx)
    assert len(seen) == serial_count


def test_bad_configurations_raise(numpy64):
    net = _cnn(numpy64)
    with pytest.raises(ConfigError, match="workers"):
        BatchParallel(net, 0)
    with pytest.raises(ConfigError, match="built"):
        BatchParallel(Network.chain([Dense(3)]), 2)
    par = BatchParallel(net, 2)
    par.close()
    x, y = _batch(numpy64, (2, 8, 8))
    with pytest.raises(ConfigError, match="closed"):
        par.forward_backward(x, y, get_loss("cross_entropy"))
    with pytest.raises(ConfigError, match="workers"):
        fit(net, np.zeros((4, 2, 8, 8)), np.zeros(4, dtype=np.int64), epochs=1,
            progress=False, workers=0)


def test_fit_with_workers_follows_the_serial_run(backend64):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 2, 8, 8))
    y = rng.integers(0, 5, 40)
    serial, split = _cnn(backend64), _cnn(backend64)
    kw = dict(epochs=2, batch_size=16, optimizer="sgd", lr=0.05, progress=False, shuffle=True)
    if not _is_cpu(backend64):
        with pytest.raises(ConfigError, match="CPU threads"):
            fit(split, x, y, workers=2, **kw)
        return
    h1 = fit(serial, x, y, **kw)
    h2 = fit(split, x, y, workers=2, **kw)
    assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-9)
    assert h2["accuracy"] == h1["accuracy"]
    for a, b in zip(serial.parameters(), split.parameters()):
        assert_close(b.value, a.value, backend64, rtol=1e-9, atol=1e-11)


def test_replicas_are_kept_between_steps_and_follow_setting_changes(numpy64):
    loss = get_loss("cross_entropy")
    x, y = _batch(numpy64, (6,))
    net = _branchy(numpy64)
    with BatchParallel(net, 2) as par:
        (first,) = par.replicas
        net.zero_grad()
        par.forward_backward(x, y, loss)
        assert par.replicas[0] is first  # nothing changed: no rebuild
        net[1].disabled = True  # a setting changed after the replicas were made
        net.zero_grad()
        par.forward_backward(x, y, loss)
        assert par.replicas[0] is not first

    def disable(n):
        n[1].disabled = True

    _assert_grads(net, _serial_grads(_branchy, numpy64, x, y, disable), numpy64)


def test_a_layer_object_in_two_slots_is_counted_once(numpy64):
    def make(backend):
        shared = Dense(6, activation="tanh")
        return Network.chain([shared, shared, Dense(5)], input_shape=(6,), backend=backend,
                             seed=1)

    x, y = _batch(numpy64, (6,))
    net = make(numpy64)
    net.zero_grad()
    with BatchParallel(net, 2) as par:
        par.forward_backward(x, y, get_loss("cross_entropy"))
    _assert_grads(net, _serial_grads(make, numpy64, x, y), numpy64)


def test_batch_coupled_layers_are_refused(numpy64):
    net = Network.chain([Parallel([Dense(3), Dense(2)], combine_mode="concat", loom_compat=True),
                         Dense(5)], input_shape=(6,), backend=numpy64, seed=0)
    with pytest.raises(ConfigError, match="mixes samples across the batch"):
        BatchParallel(net, 2)


def _blas_threads():
    from threadpoolctl import threadpool_info

    return [(i["filepath"], i["num_threads"]) for i in threadpool_info()
            if i["user_api"] == "blas"]


def test_a_failing_shard_waits_for_the_others_and_restores_blas(numpy64):
    loss = get_loss("cross_entropy")
    x, y = _batch(numpy64, (2, 8, 8))
    net = _cnn(numpy64)
    main = threading.get_ident()

    def failing(out, target):
        if threading.get_ident() == main:
            raise RuntimeError("loss failed")
        time.sleep(0.05)  # the other shard is still running when the first one raises
        return loss(out, target)

    before = _blas_threads()
    with BatchParallel(net, 2) as par:
        net.zero_grad()
        with pytest.raises(RuntimeError, match="loss failed"):
            par.forward_backward(x, y, failing)
        assert _blas_threads() == before
        net.zero_grad()  # the gradients of a failed step are partial
        par.forward_backward(x, y, loss)
    _assert_grads(net, _serial_grads(_cnn, numpy64, x, y), numpy64)


def test_overlapping_steps_from_several_threads_restore_blas_once(numpy64):
    before = _blas_threads()
    loss = get_loss("cross_entropy")

    def train(seed):
        x, y = _batch(numpy64, (2, 8, 8), seed=seed)
        net = _cnn(numpy64)
        with BatchParallel(net, 2) as par:
            for _ in range(5):
                net.zero_grad()
                par.forward_backward(x, y, loss)

    threads = [threading.Thread(target=train, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _blas_threads() == before


def test_edge_cases_of_the_batch_and_the_options(numpy64):
    net = _cnn(numpy64)
    loss = get_loss("cross_entropy")
    x, y = _batch(numpy64, (2, 8, 8))
    with BatchParallel(net, 2) as par:
        with pytest.raises(ShapeError, match="non-empty batch"):
            par.forward_backward(x[:0, ...], y[:0], loss)
        net.zero_grad()
        (only,) = par.forward_backward(x[:1, ...], y[:1], loss)  # fewer rows than workers
        assert only.rows == slice(0, 1)
    with pytest.raises(ConfigError, match="closed"):
        par.forward_backward(x[:1, ...], y[:1], loss)
    with pytest.raises(ConfigError, match="workers"):
        BatchParallel(net, True)
    with pytest.raises(ConfigError, match="workers"):
        fit(net, np.zeros((4, 2, 8, 8)), np.zeros(4, dtype=np.int64), epochs=1,
            progress=False, workers=True)


def test_list_and_numpy_scalar_settings_reach_the_replicas(numpy64):
    """A mixture softmax's temperatures (a list) and a dropout rate set as a numpy scalar
    are settings too: changing them rebuilds the replicas, whose random streams carry on."""
    from loomx.layers import Softmax

    loss = get_loss("mse")
    x = numpy64.from_host(np.random.default_rng(0).standard_normal((6, 4)))
    y = numpy64.from_host(np.random.default_rng(1).standard_normal((6, 6)))

    def make(b):
        return Network.chain([Dense(6), Softmax("mixture", temperatures=[0.5, 1.0, 2.0])],
                             input_shape=(4,), backend=b, seed=0)

    def change(n):
        n[1].temperatures = [0.1, 1.0, 10.0]

    net = make(numpy64)
    with BatchParallel(net, 2) as par:
        par.forward_backward(x, y, loss)
        par.forward_backward(x, y, loss)  # a step with nothing changed: no rebuild
        first = par.replicas[0]
        par.forward_backward(x, y, loss)
        assert par.replicas[0] is first
        change(net)
        net.zero_grad()
        par.forward_backward(x, y, loss)
        assert par.replicas[0] is not first  # the list change itself rebuilt them
    serial = make(numpy64)
    change(serial)
    serial.zero_grad()
    out, ctx = serial.forward(x, True)
    serial.backward(loss(out, y)[1], ctx)
    _assert_grads(net, {p.name: numpy64.to_host(p.grad) for p in serial.parameters()}, numpy64)

    drop_net = Network.chain([Dense(6), Dropout(0.1)], input_shape=(4,), backend=numpy64,
                             seed=0)
    with BatchParallel(drop_net, 2) as par:
        par.forward_backward(x, y, loss)
        par.forward_backward(x, y, loss)
        rng_before = par.replicas[0][1]._rng
        drop_net[1].rate = np.float32(0.5)
        par.forward_backward(x, y, loss)
        assert par.replicas[0][1].rate == pytest.approx(0.5)
        assert par.replicas[0][1]._rng is rng_before  # the stream continues, not re-drawn
        drop_net[1].rate = np.float32(0.25)
        par.forward_backward(x, y, loss)
        assert par.replicas[0][1].rate == pytest.approx(0.25)


def test_a_step_with_nothing_changed_never_rebuilds_the_replicas(numpy64):
    """Neither the first steps (activations appearing) nor long lists (a mask over a large
    output) make every step compare or rebuild."""
    from loomx.layers import Softmax

    loss = get_loss("mse")
    x = numpy64.from_host(np.random.default_rng(0).standard_normal((6, 4)))
    y = numpy64.from_host(np.random.default_rng(1).standard_normal((6, 300)))
    net = Network.chain([Dense(300), Softmax("masked", mask=[True] * 299 + [False])],
                        input_shape=(4,), backend=numpy64, seed=0)
    with BatchParallel(net, 2) as par:
        first = par.replicas[0]
        for _ in range(4):
            net.zero_grad()
            par.forward_backward(x, y, loss)
        assert par.replicas[0] is first


def test_blas_libraries_are_scanned_again_after_new_imports(monkeypatch):
    """The scan of loaded thread pools is cached, and redone once modules were imported
    since (torch imported after a first step brings its own BLAS)."""
    import sys
    import types

    from loomx.train import parallel

    scans = []

    class Controller:
        def __init__(self):
            scans.append(1)

        def limit(self, limits, user_api):
            return types.SimpleNamespace(restore_original_limits=lambda: None)

    monkeypatch.setattr(parallel, "ThreadpoolController", Controller)
    monkeypatch.setattr(parallel._BlasLimit, "_controller", None)
    for _ in range(2):
        parallel._BlasLimit.acquire()
        parallel._BlasLimit.release()
    assert len(scans) == 1
    monkeypatch.setitem(sys.modules, "a_module_importing_a_blas", types.ModuleType("m"))
    parallel._BlasLimit.acquire()
    parallel._BlasLimit.release()
    assert len(scans) == 2
