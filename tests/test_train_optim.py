"""Optimizers follow torch.optim step for step; schedules follow Loom's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from loomx.backends import get_backend

from loomx.errors import ConfigError, FormatError
from loomx.grid import Network
from loomx.layers import Dense
from loomx.train import SGD, Adam, AdamW, RMSprop, get_loss, get_optimizer, get_schedule
from tests.conftest import assert_close

pytestmark = pytest.mark.usefixtures("single_threaded")


# (loomx class, loomx options, torch class, torch options)
OPTIMIZERS = {
    "sgd": (SGD, dict(lr=0.1), torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum": (SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
                     torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1,
                                           weight_decay=1e-2)),
    "nesterov": (SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                 torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                       weight_decay=1e-3)),
    "adam": (Adam, dict(lr=1e-2), torch.optim.Adam, dict(lr=1e-2)),
    "adam_amsgrad_l2": (Adam, dict(lr=1e-2, beta1=0.8, beta2=0.99, weight_decay=1e-2,
                                   amsgrad=True),
                        torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2,
                                               amsgrad=True)),
    "adamw": (AdamW, dict(lr=1e-2, weight_decay=0.1), torch.optim.AdamW,
              dict(lr=1e-2, weight_decay=0.1)),
    "rmsprop": (RMSprop, dict(lr=1e-2), torch.optim.RMSprop, dict(lr=1e-2)),
    "rmsprop_centered_momentum": (RMSprop, dict(lr=1e-3, momentum=0.9, centered=True,
                                                weight_decay=1e-3),
                                  torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9,
                                                            centered=True, weight_decay=1e-3)),
}


def _nested_net(backend):
    """A grid whose middle slot is itself a network: parameters at two nesting levels."""
    inner = Network.chain([Dense(8, activation="tanh"), Dense(8, activation="relu")])
    net = Network(1, 3, 1, layers=[Dense(8, activation="relu"), inner, Dense(3)])
    net.build((5,), backend, 7)
    return net


def _torch_forward(p, x):
    h = torch.relu(x @ p["0.weight"].T + p["0.bias"])
    h = torch.tanh(h @ p["1.0.weight"].T + p["1.0.bias"])
    h = torch.relu(h @ p["1.1.weight"].T + p["1.1.bias"])
    return h @ p["2.weight"].T + p["2.bias"]


def _batches(steps=20):
    rng = np.random.default_rng(3)
    return [(rng.standard_normal((6, 5)).astype(np.float32), rng.integers(0, 3, 6))
            for _ in range(steps)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_twenty_steps_follow_torch_optim(backend, name):
    cls, opts, tcls, topts = OPTIMIZERS[name]
    net = _nested_net(backend)
    names = [p.name for p in net.parameters()]
    assert len(names) == 8 and "1.1.weight" in names
    tparams = {p.name: torch.tensor(backend.to_host(p.value), requires_grad=True)
               for p in net.parameters()}
    opt = cls(net, **opts)
    topt = tcls(list(tparams.values()), **topts)
    loss = get_loss("cross_entropy")
    for xb, yb in _batches():
        out, ctx = net.forward(backend.from_host(xb), train=True)
        _, dout = loss(out, backend.from_host(yb))
        net.backward(dout, ctx)
        opt.step()
        opt.zero_grad()
        topt.zero_grad()
        F.cross_entropy(_torch_forward(tparams, torch.tensor(xb)), torch.tensor(yb)).backward()
        topt.step()
    for p in net.parameters():
        assert_close(p.value, tparams[p.name].detach().numpy(), backend, rtol=2e-4, atol=2e-5)
    assert opt.step_count == 20


def _train(net, opt, backend, batches):
    loss = get_loss("cross_entropy")
    for xb, yb in batches:
        out, ctx = net.forward(backend.from_host(xb), train=True)
        net.backward(loss(out, backend.from_host(yb))[1], ctx)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw", "rmsprop_centered_momentum"])
def test_state_dict_round_trip_continues_exactly(backend, name):
    cls, opts, _, _ = OPTIMIZERS[name]
    batches = _batches(10)
    a = _nested_net(backend)
    opt_a = cls(a, **opts)
    _train(a, opt_a, backend, batches)

    b = _nested_net(backend)
    opt_b = cls(b, **opts)
    _train(b, opt_b, backend, batches[:5])
    state = opt_b.state_dict()
    assert state["step"] == 5 and all(state["buffers"][n] for n in state["buffers"])
    weights = {p.name: backend.to_host(p.value) for p in b.parameters()}
    c = _nested_net(backend)
    for p in c.parameters():
        p.value = backend.from_host(weights[p.name])
    opt_c = cls(c, lr=123.0)
    opt_c.load_state_dict(state)
    assert opt_c.lr == opts["lr"] and opt_c.step_count == 5
    _train(c, opt_c, backend, batches[5:])
    for pa, pc in zip(a.parameters(), c.parameters()):
        np.testing.assert_array_equal(backend.to_host(pc.value), backend.to_host(pa.value))


def test_state_dict_mismatch_is_a_format_error(backend):
    net = _nested_net(backend)
    state = Adam(net).state_dict()
    with pytest.raises(FormatError, match="'adam'.*'sgd'"):
        SGD(net).load_state_dict(state)
    other = Network.chain([Dense(3)])
    other.build((5,), backend)
    with pytest.raises(FormatError, match="does not match the parameters"):
        Adam(other).load_state_dict(state)


def test_optimizer_options_are_checked(backend):
    net = _nested_net(backend)
    with pytest.raises(ConfigError, match="unknown options.*'betas'"):
        Adam(net, betas=(0.9, 0.99))
    with pytest.raises(ConfigError, match="Nesterov"):
        SGD(net, nesterov=True)
    with pytest.raises(ConfigError, match="unknown optimizer 'lbfgs'"):
        get_optimizer("lbfgs", net)
    opt = get_optimizer("nesterov", net, lr=0.2)
    assert isinstance(opt, SGD) and opt.hyper["momentum"] == 0.9 and opt.lr == 0.2
    assert AdamW(net).hyper["weight_decay"] == 0.01


SCHEDULE_CASES = [
    ({"name": "constant", "lr": 0.1}, {0: 0.1, 1000: 0.1}),
    ({"name": "linear", "lr": 1.0, "final_lr": 0.0, "total_steps": 10},
     {0: 1.0, 5: 0.5, 10: 0.0, 99: 0.0}),
    ({"name": "cosine", "lr": 1.0, "min_lr": 0.1, "total_steps": 10},
     {0: 1.0, 5: 0.55, 10: 0.1, 20: 0.1}),
    ({"name": "cosine_restarts", "lr": 1.0, "period": 4}, {0: 1.0, 2: 0.5, 4: 1.0, 6: 0.5}),
    ({"name": "exponential", "lr": 1.0, "rate": 0.5, "decay_steps": 10},
     {0: 1.0, 5: 0.5 ** 0.5, 20: 0.25}),
    ({"name": "step", "lr": 1.0, "factor": 0.1, "step_size": 3}, {0: 1.0, 2: 1.0, 3: 0.1,
                                                                  7: 0.01}),
    ({"name": "polynomial", "lr": 1.0, "final_lr": 0.0, "total_steps": 10, "power": 2.0},
     {0: 1.0, 5: 0.25, 10: 0.0}),
    ({"name": "warmup", "lr": 1.0, "warmup_steps": 4, "start_lr": 0.0,
      "after": {"name": "step", "lr": 1.0, "factor": 0.5, "step_size": 2}},
     {0: 0.0, 2: 0.5, 4: 1.0, 6: 0.5, 8: 0.25}),
]


@pytest.mark.parametrize("cfg,expected", SCHEDULE_CASES, ids=[c[0]["name"] for c in
                                                              SCHEDULE_CASES])
def test_schedules_follow_loom_formulas(cfg, expected):
    sched = get_schedule(cfg)
    for step, lr in expected.items():
        assert math.isclose(sched(step), lr, rel_tol=1e-12, abs_tol=1e-12), (step, sched(step))
    again = get_schedule(sched.get_config())
    assert again.get_config() == sched.get_config()
    assert [again(s) for s in range(30)] == [sched(s) for s in range(30)]


def test_schedule_errors_and_defaults():
    with pytest.raises(ConfigError, match="period > 0"):
        get_schedule({"name": "cosine_restarts", "lr": 1.0, "period": 0})
    with pytest.raises(ConfigError, match="total_steps > 0"):
        get_schedule("cosine", lr=1.0)
    with pytest.raises(ConfigError, match="unknown schedule 'triangle'"):
        get_schedule("triangle", lr=1.0)
    sched = get_schedule({"name": "warmup", "warmup_steps": 10, "after": "cosine"}, lr=2.0,
                         total_steps=110)
    assert sched(5) == 1.0 and sched(10) == 2.0 and sched(110) == 0.0
    assert math.isclose(sched(60), 1.0)


@pytest.mark.parametrize("name", ["sgd", "sgd_momentum", "adamw", "rmsprop"])
def test_a_tied_weight_is_one_parameter_as_in_torch(backend, name):
    """A weight two layers hold (a tied embedding and head) is one parameter: updated once
    from the sum of both entries' gradients, exactly as ``torch.optim`` updates one tensor
    used twice, and still one array afterwards (also where the update makes a new array);
    its state is kept once."""
    cls, opts, tcls, topts = OPTIMIZERS[name]
    first, second = Dense(4), Dense(4)
    first.build((4,), backend, rng=0)
    second.build((4,), backend, rng=1)
    second.params["weight"] = first.params["weight"]
    refs = [*first.parameters(prefix="first."), *second.parameters(prefix="second.")]
    opt = cls(refs, **opts)
    weight = torch.tensor(backend.to_host(first.params["weight"]), dtype=torch.float64,
                          requires_grad=True)
    topt = tcls([weight], **topts)
    rng = np.random.default_rng(3)
    for _ in range(3):
        g1, g2 = rng.standard_normal((2, 4, 4))
        for layer, g in ((first, g1), (second, g2)):
            layer.zero_grad()
            layer.grads["weight"] = backend.from_host(g)
        opt.step()
        weight.grad = torch.tensor(g1 + g2)
        topt.step()
    assert first.params["weight"] is second.params["weight"]
    assert_close(first.params["weight"], weight.detach().numpy(), backend, rtol=1e-5,
                 atol=1e-6)
    assert "second.weight" not in opt.state_dict()["buffers"]


def test_plain_sgd_with_only_mixed_dtype_gradients():
    backend = get_backend("torch")
    layer = Dense(3)
    layer.build((2,), backend, rng=0)
    for r in layer.parameters():
        r.grad = backend.xp.ones(tuple(r.value.shape), dtype=backend.xp.float64)
    SGD(layer, lr=0.1).step()
    assert all(r.value.dtype == backend.xp.float64 for r in layer.parameters())


def test_optimizer_state_follows_the_network_to_another_backend():
    """Adam built on numpy, two steps, then the network moves to PyTorch tensors: the third
    step runs there, with the moments moved, and matches three steps on numpy."""
    from loomx.train.optim import Adam

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    dy = rng.standard_normal((6, 3)).astype(np.float32)
    nets = [Network.chain([Dense(4, activation="tanh"), Dense(3)], input_shape=(5,),
                          backend="numpy", seed=0) for _ in range(2)]
    opts = [Adam(net, lr=0.1) for net in nets]
    for step in range(3):
        if step == 2:
            nets[1].to("torch")
        for net, opt in zip(nets, opts):
            b = net.backend
            net.zero_grad()
            _, ctx = net.forward(b.from_host(x), True)
            net.backward(b.from_host(dy), ctx)
            opt.step()
    moved = opts[1]
    assert moved.backend is nets[1].backend
    assert all(isinstance(v, torch.Tensor) for st in moved.state.values() for v in st.values())
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        np.testing.assert_allclose(nets[1].backend.to_host(b.value), a.value, rtol=1e-5,
                                   atol=1e-6)
