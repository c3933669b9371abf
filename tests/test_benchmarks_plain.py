"""The plain-numpy yardsticks compute what their PyTorch twins compute: loss and gradients.

The backend-overhead line of the benchmarks compares loomx with these hand-written steps, so
they must be the same math; PyTorch autograd checks their backward passes (float64).
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.plain.block import block_loss_and_grads
from benchmarks.plain.cnn import cnn_loss_and_grads
from benchmarks.plain.common import one_hot, sgd, step_op
from benchmarks.plain.lstm import lstm_loss_and_grads
from benchmarks.plain.mlp import mlp_loss_and_grads

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


def _data(shape, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.integers(0, classes, size=shape[0])


def _check(loss_and_grads, params, x, target, torch_loss, names, tol=1e-9):
    """Compare the plain step with PyTorch: ``names`` maps each plain parameter to the torch
    parameter(s) whose gradient (summed) it equals."""
    loss, grads = loss_and_grads({k: v.copy() for k, v in params.items()}, x, target)
    ref = torch_loss()
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=tol)
    assert set(grads) == set(params)
    for name, tensors in names.items():
        expect = sum(t.grad.double().numpy() for t in tensors)
        assert grads[name].shape == params[name].shape, name
        assert grads[name].dtype == params[name].dtype, name
        np.testing.assert_allclose(grads[name], expect, rtol=tol, atol=tol, err_msg=name)


def test_mlp_matches_pytorch():
    x, labels = _data((6, 12))
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 10)).double()
    fcs = [model[0], model[2]]
    params = {f"fc{i}.{p}": getattr(m, p).detach().numpy().copy()
              for i, m in enumerate(fcs) for p in ("weight", "bias")}
    _check(mlp_loss_and_grads, params, x, one_hot(labels, 10, x.dtype),
           lambda: F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels)),
           {f"fc{i}.{p}": [getattr(m, p)] for i, m in enumerate(fcs) for p in ("weight", "bias")})


def test_cnn_matches_pytorch():
    x, labels = _data((3, 2, 7, 7))
    conv1, conv2 = nn.Conv2d(2, 32, 3, padding=1), nn.Conv2d(32, 64, 3, stride=2, padding=1)
    fc = nn.Linear(64 * 4 * 4, 10)
    model = nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU(), nn.Flatten(), fc).double()
    mods = {"conv1": conv1, "conv2": conv2, "fc": fc}
    params = {f"{m}.{p}": getattr(mod, p).detach().numpy().copy()
              for m, mod in mods.items() for p in ("weight", "bias")}
    _check(cnn_loss_and_grads, params, x, one_hot(labels, 10, x.dtype),
           lambda: F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels)),
           {f"{m}.{p}": [getattr(mod, p)] for m, mod in mods.items() for p in ("weight", "bias")})


def test_lstm_matches_pytorch():
    from benchmarks.torch_side import LastStepLSTM

    x, labels = _data((4, 5, 3))
    model = LastStepLSTM(3, 6, 10).double()
    lstm = model.lstm
    params = {"weight_ih": lstm.weight_ih_l0.detach().numpy().copy(),
              "weight_hh": lstm.weight_hh_l0.detach().numpy().copy(),
              "bias": (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy().copy(),
              "fc.weight": model.fc.weight.detach().numpy().copy(),
              "fc.bias": model.fc.bias.detach().numpy().copy()}
    _check(lstm_loss_and_grads, params, x, one_hot(labels, 10, x.dtype),
           lambda: F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(labels)),
           {"weight_ih": [lstm.weight_ih_l0], "weight_hh": [lstm.weight_hh_l0],
            "bias": [lstm.bias_ih_l0], "fc.weight": [model.fc.weight],
            "fc.bias": [model.fc.bias]})


def test_transformer_block_matches_pytorch():
    from benchmarks.torch_side import Block

    rng = np.random.default_rng(3)
    x, target = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    model = Block(8, 2, 2, 12).double()
    with torch.no_grad():  # norm weights away from one, so their gradients are checked
        model.norm1.weight.uniform_(0.5, 1.5)
        model.norm2.weight.uniform_(0.5, 1.5)
    tensors = dict(model.named_parameters())
    params = {k: v.detach().numpy().copy() for k, v in tensors.items()}
    _check(lambda p, a, y: block_loss_and_grads(p, a, y, heads=2), params, x, target,
           lambda: F.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(target)),
           {k: [v] for k, v in tensors.items()})


def test_step_op_updates_in_place_by_sgd():
    params = {"w": np.ones(3, np.float32)}
    op = step_op(lambda p, x, y: (1.5, {"w": np.full(3, 2.0, np.float32)}), params, None, None,
                 lr=0.25)
    assert op.run() == 1.5
    np.testing.assert_array_equal(params["w"], np.full(3, 0.5, np.float32))
    assert params["w"].dtype == np.float32
    sgd(params, {"w": np.ones(3, np.float32)}, 0.5)
    np.testing.assert_array_equal(params["w"], np.zeros(3, np.float32))


@pytest.mark.parametrize("key", ["a_mlp", "b_cnn", "c_lstm", "d_transformer"])
def test_each_training_workload_has_a_float32_plain_step(key):
    from benchmarks.workloads import all_cases

    case = {c.key: c for c in all_cases(quick=True)}[key]
    op = case.plain()
    first, second = op.run(), op.run()
    assert np.isfinite(first) and np.isfinite(second)
    assert second < first  # one SGD step on the same batch lowers its loss


@pytest.mark.parametrize("which", ["mlp", "cnn", "lstm", "block"])
def test_float32_steps_stay_float32(which):
    from benchmarks.plain import block, cnn, common, lstm, mlp

    rng = np.random.default_rng(0)
    x32 = rng.standard_normal({"mlp": (4, 12), "cnn": (2, 1, 6, 6), "lstm": (3, 4, 5),
                               "block": (2, 4, 8)}[which]).astype(np.float32)
    shapes, fn = {
        "mlp": (mlp.mlp_shapes([12, 8, 10]), mlp.mlp_loss_and_grads),
        "cnn": (cnn.cnn_shapes(1, 6), cnn.cnn_loss_and_grads),
        "lstm": (lstm.lstm_shapes(5, 6), lstm.lstm_loss_and_grads),
        "block": (block.block_shapes(8, 12),
                  lambda p, a, y: block.block_loss_and_grads(p, a, y, heads=2)),
    }[which]
    target = (x32 if which == "block" else
              common.one_hot(rng.integers(0, 10, size=x32.shape[0]), 10, np.float32))
    params = common.init_params(shapes, np.float32)
    loss, grads = fn(params, x32, target)
    assert np.isfinite(loss)
    assert {k: g.dtype for k, g in grads.items()} == {k: np.dtype(np.float32) for k in params}
