"""Stepping executor: Loom's trace, latency, equivalence with forward, residual alignment,
recurrent state across ticks, step backward, and the train-while-running loop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loomx.errors import LoomxError, ShapeError
from loomx.grid import Network, Parallel, Residual, Stepper, train_while_running
from loomx.grid.loom_format import load_loom_bundle, loom_input
from loomx.layers import LSTM, Activation, Dense
from tests.conftest import LOOM_FIXTURES, assert_close

FIXTURES = LOOM_FIXTURES


def _composite(backend, seed=0):
    layers = [Dense(5, activation="tanh"), None, Dense(5), Residual(0), Activation("tanh"),
              Parallel([Dense(2), Dense(3, activation="sigmoid")]), Dense(5), Residual(-1),
              Dense(2)]
    net = Network(1, 3, 3, layers=layers, input_shape=(5,), backend=backend, seed=seed)
    return net


@pytest.mark.parametrize("trace", ["trace_constant_input", "trace_varying_input"])
def test_reproduces_loom_stepping_trace(backend, trace):
    fx = json.loads((FIXTURES / "stepping.json").read_text())
    net = load_loom_bundle(fx["bundle"], backend=backend)
    stepper = Stepper(net)
    assert stepper.depth == 5 and stepper.latency == 4
    for tick in fx[trace]:
        stepper.set_input(loom_input(tick["input"], net))
        stepper.step()
        assert stepper.step_count == tick["tick"]
        for k, want in enumerate(tick["layer_outputs"]):
            got = stepper.state.buffers[k]
            assert_close(backend.xp.reshape(got, (-1,)), np.asarray(want, np.float32),
                         backend, rtol=1e-5, atol=1e-6)
        assert_close(backend.xp.reshape(stepper.output, (-1,)),
                     np.asarray(tick["output"], np.float32), backend, rtol=1e-5, atol=1e-6)
    if trace == "trace_constant_input":
        assert_close(backend.xp.reshape(stepper.output, (-1,)),
                     np.asarray(fx["forward_cpu_output_for_inputs0"], np.float32), backend,
                     rtol=1e-5, atol=1e-6)


def test_constant_input_reaches_forward_after_depth_ticks(backend):
    net = _composite(backend)
    net[4].disabled = True
    x = backend.from_host(np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32))
    y_ref = backend.to_host(net(x))
    stepper = Stepper(net, batch_size=2)
    assert stepper.depth == 7  # 8 layers, one disabled
    for t in range(1, stepper.depth + 3):
        stepper.set_input(x)
        y = stepper.step()
        close = np.allclose(backend.to_host(y), y_ref, rtol=1e-5, atol=1e-6)
        assert close == (t >= stepper.depth), f"tick {t}"
    # any slot's output equals the ordinary forward's activations
    net(x)
    for i in (0, 3, 5):
        assert_close(stepper.layer_output(i), backend.to_host(net.activations[i + 1]), backend)
    assert_close(stepper.layer_output((0, 0, 1)), backend.to_host(net.activations[1]), backend)


def test_residuals_align_to_the_same_input_tick(backend):
    """With a varying input, the output at tick t is forward(x[t - latency]) exactly."""
    net = _composite(backend, seed=4)
    stepper = Stepper(net, batch_size=1)
    xs = np.random.default_rng(1).standard_normal((20, 1, 5)).astype(np.float32)
    for t, x in enumerate(xs):
        stepper.set_input(backend.from_host(x))
        y = stepper.step()
        if t + 1 >= stepper.depth:
            want = backend.to_host(net(backend.from_host(xs[t - stepper.latency])))
            assert_close(y, want, backend, rtol=1e-5, atol=1e-6)


def test_an_input_buffer_refilled_in_place_does_not_reach_back_in_time(backend):
    """set_input copies (as Loom's SetInput does): refilling one host-side buffer every tick,
    a residual from the network input still sees the input of its own tick."""
    if backend.name != "numpy":
        pytest.skip("in-place refilling of a numpy buffer")
    net = Network.chain([Dense(3, activation="tanh"), Dense(3), Residual("input")],
                        input_shape=(3,), backend=backend, seed=0)
    stepper = Stepper(net, batch_size=1)
    xs = np.random.default_rng(2).standard_normal((8, 1, 3)).astype(np.float32)
    buf = np.empty((1, 3), np.float32)
    for t, x in enumerate(xs):
        buf[...] = x
        stepper.set_input(buf)
        y = stepper.step()
        if t + 1 >= stepper.depth:
            assert_close(y, net(xs[t - stepper.latency]), backend, rtol=1e-5, atol=1e-6)


def test_no_loom_feedback_accumulation(backend):
    net = Network.chain([Dense(3), Residual(0)], input_shape=(3,), backend=backend)
    stepper = Stepper(net)
    x = backend.ones((1, 3))
    outs = []
    for _ in range(6):
        stepper.set_input(x)
        outs.append(backend.to_host(stepper.step()))
    for o in outs[2:]:
        np.testing.assert_array_equal(o, outs[1])  # constant, not growing


def test_recurrent_state_persists_across_ticks(backend):
    lstm = LSTM(4, input_size=3)
    net = Network.chain([lstm], input_shape=(1, 3), backend=backend, seed=2)
    seq = np.random.default_rng(2).standard_normal((2, 6, 3)).astype(np.float32)
    full = backend.to_host(lstm(backend.from_host(seq)))  # [2, 6, 4]
    stateful = Stepper(net, batch_size=2, stateful=True)
    fresh = Stepper(net, batch_size=2)
    for t in range(6):
        xt = backend.from_host(np.ascontiguousarray(seq[:, t:t + 1]))
        stateful.set_input(xt)
        fresh.set_input(xt)
        assert_close(stateful.step(), full[:, t:t + 1], backend, rtol=1e-5, atol=1e-6)
        y_fresh = backend.to_host(fresh.step())
    assert not np.allclose(y_fresh, full[:, 5:6], atol=1e-4)  # without state: no memory
    stateful.reset()
    stateful.set_input(backend.from_host(np.ascontiguousarray(seq[:, :1])))
    assert_close(stateful.step(), full[:, :1], backend, rtol=1e-5, atol=1e-6)


def test_step_backward_equals_backprop_on_a_settled_pipeline(backend):
    net = _composite(backend, seed=3)
    x = backend.from_host(np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32))
    dy = backend.from_host(np.random.default_rng(4).standard_normal((2, 2)).astype(np.float32))
    net.zero_grad()
    y, ctx = net.forward(x, train=True)
    dx_ref = backend.to_host(net.backward(dy, ctx))
    grads_ref = {p.name: backend.to_host(p.grad) for p in net.parameters()}
    stepper = Stepper(net, batch_size=2)
    for _ in range(stepper.depth):
        stepper.set_input(x)
        stepper.step(train=True)
    net.zero_grad()
    dx = stepper.step_backward(dy)
    assert_close(dx, dx_ref, backend, rtol=1e-5, atol=1e-6)
    for p in net.parameters():
        assert_close(p.grad, grads_ref[p.name], backend, rtol=1e-5, atol=1e-6)


def test_float64_network_steps_in_float64(backend64):
    b = backend64
    net = _composite(b, seed=2)
    stepper = Stepper(net, batch_size=2)
    assert all(buf.dtype == b.xp.float64 for buf in stepper.state.buffers[1:])
    assert all(z.dtype == b.xp.float64 for d in stepper.state.delays.values() for z in d)
    rng = np.random.default_rng(2)
    xs = [b.from_host(rng.standard_normal((2, 5))) for _ in range(stepper.depth + 3)]
    for t, x in enumerate(xs):
        stepper.set_input(x)
        y = stepper.step(train=True)
        assert y.dtype == b.xp.float64
        if t >= stepper.latency:  # residuals aligned: forward of the input latency ticks ago
            assert_close(y, b.to_host(net(xs[t - stepper.latency])), b, rtol=1e-12, atol=1e-13)
    dy = b.from_host(rng.standard_normal((2, 2)))
    assert stepper.step_backward(dy).dtype == b.xp.float64


def test_buffers_follow_layer_dtype_overrides(backend):
    """On a float32 backend, layers asking for float64 get float64 buffers and delay lines."""
    f64 = backend.xp.float64
    net = Network.chain([Dense(4, activation="tanh", dtype="float64"),
                         Dense(4, dtype="float64"), Residual(1), Dense(2, dtype="float64")],
                        input_shape=(3,), backend=backend, seed=1)
    stepper = Stepper(net)
    assert [buf.dtype for buf in stepper.state.buffers[1:]] == [f64] * 4
    assert all(z.dtype == f64 for d in stepper.state.delays.values() for z in d)
    x = backend.from_host(np.random.default_rng(1).standard_normal((1, 3)), dtype=f64)
    for t in range(1, stepper.depth + 1):
        stepper.set_input(x)
        y = stepper.step()
        assert y.dtype == f64, f"tick {t}"
    assert_close(y, backend.to_host(net(x)), backend, rtol=1e-12, atol=1e-13, dtype=f64)


def test_train_while_running_learns_with_the_delay_queue(backend):
    net = Network.chain([Dense(8, activation="tanh"), Dense(8, activation="tanh"), Dense(1)],
                        input_shape=(2,), backend=backend, seed=0)
    rng = np.random.default_rng(0)
    xs = rng.uniform(-1, 1, (600, 1, 2)).astype(np.float32)
    ts = (0.5 * xs[..., :1] - 0.3 * xs[..., 1:]).astype(np.float32)
    start = [backend.to_host(p.value) for p in net.parameters()]

    def run(delay):
        for p, v in zip(net.parameters(), start, strict=True):
            p.value = backend.from_host(v)
        stepper = Stepper(net)
        return stepper, train_while_running(stepper, [backend.from_host(x) for x in xs],
                                            [backend.from_host(t) for t in ts], lr=0.1,
                                            clip_norm=1.0, delay=delay)

    stepper, losses = run(None)
    assert len(losses) == 600 - stepper.latency
    assert np.mean(losses[-100:]) < 0.3 * np.mean(losses[:50])
    _, misaligned = run(0)  # targets not delayed: paired with the wrong outputs
    assert np.mean(losses[-100:]) < 0.5 * np.mean(misaligned[-100:])


def test_stepping_errors(backend):
    net = Network.chain([Dense(2)], input_shape=(3,), backend=backend)
    stepper = Stepper(net, batch_size=2)
    with pytest.raises(LoomxError, match="set_input"):
        stepper.step()
    with pytest.raises(ShapeError, match=r"\[2, 3\].*\[1, 3\]"):
        stepper.set_input(backend.ones((1, 3)))
    with pytest.raises(LoomxError, match="step\\(\\) at least once"):
        stepper.step_backward(backend.ones((2, 2)))
    with pytest.raises(LoomxError, match="built"):
        Stepper(Network.chain([Dense(2)]))


def test_observers_see_stepping_events(backend):
    net = Network.chain([Dense(3), Dense(2)], input_shape=(3,), backend=backend)
    events = []
    net.add_observer(lambda e: events.append((e["phase"], e["mode"], e["step"], e["index"])))
    stepper = Stepper(net)
    stepper.set_input(backend.ones((1, 3)))
    stepper.step()
    stepper.step_backward(backend.ones((1, 2)))
    assert events == [("forward", "step", 1, 0), ("forward", "step", 1, 1),
                      ("backward", "step", 1, 1), ("backward", "step", 1, 0)]
