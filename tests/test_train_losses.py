"""Losses and gradient clipping against PyTorch, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loomx.errors import ConfigError, ShapeError
from loomx.layers import Dense
from loomx.train import clip_grad_norm, clip_grad_value, get_loss, global_grad_norm
from tests.conftest import assert_close

RNG = np.random.default_rng(0)
LOGITS = (RNG.standard_normal((6, 4)) * 3).astype(np.float32)
LABELS = np.array([0, 3, 1, 2, 3, 0], dtype=np.int64)
PROBS = RNG.uniform(0.02, 0.98, (6, 4)).astype(np.float32)
SOFT = RNG.dirichlet(np.ones(4), 6).astype(np.float32)
BINARY = (RNG.uniform(size=(6, 4)) > 0.5).astype(np.float32)


def _torch_loss(name, out, target):
    if name == "cross_entropy":
        return F.cross_entropy(out, target)
    if name == "cross_entropy_probs":
        t = F.one_hot(target, 4).double() if target.dtype == torch.int64 else target
        return -(t * torch.log(out)).sum() / out.shape[0]
    if name == "mse":
        t = F.one_hot(target, 4).double() if target.dtype == torch.int64 else target
        return F.mse_loss(out, t)
    if name == "bce_logits":
        return F.binary_cross_entropy_with_logits(out, target)
    if name == "bce":
        return F.binary_cross_entropy(out, target)
    raise KeyError(name)


CASES = [
    ("cross_entropy", LOGITS, LABELS),
    ("cross_entropy", LOGITS, SOFT),
    ("cross_entropy_probs", PROBS, LABELS),
    ("cross_entropy_probs", PROBS, SOFT),
    ("mse", LOGITS, SOFT),
    ("mse", LOGITS, LABELS),
    ("bce_logits", LOGITS, BINARY),
    ("bce", PROBS, BINARY),
]


@pytest.mark.parametrize("name,out,target", CASES,
                         ids=[f"{c[0]}-{c[2].dtype}" for c in CASES])
def test_loss_and_gradient_match_torch(backend, name, out, target):
    loss = get_loss(name)
    o = backend.from_host(out)
    t = backend.from_host(target)
    value, grad = loss(o, t)
    ot = torch.tensor(out, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(target) if target.dtype.kind == "i" else torch.tensor(target,
                                                                            dtype=torch.float64)
    ref = _torch_loss(name, ot, tt)
    ref.backward()
    assert tuple(value.shape) == ()
    assert_close(value, ref.detach().numpy(), backend, rtol=1e-5, atol=1e-6)
    assert_close(grad, ot.grad.numpy(), backend, rtol=1e-4, atol=1e-6)


def test_cross_entropy_is_stable_for_huge_logits(backend):
    big = np.array([[1e4, -1e4, 0.0], [-5e3, 5e3, 5e3]], dtype=np.float32)
    value, grad = get_loss("cross_entropy")(backend.from_host(big),
                                            backend.from_host(np.array([0, 1])))
    ref = F.cross_entropy(torch.tensor(big, dtype=torch.float64), torch.tensor([0, 1]))
    assert_close(value, ref.numpy(), backend, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(backend.to_host(grad)))


def test_bce_logits_is_stable_for_huge_logits(backend):
    z = np.array([[80.0, -80.0, 1e4]], dtype=np.float32)
    t = np.array([[0.0, 1.0, 1.0]], dtype=np.float32)
    value, grad = get_loss("bce_logits")(backend.from_host(z), backend.from_host(t))
    ref = F.binary_cross_entropy_with_logits(torch.tensor(z, dtype=torch.float64),
                                             torch.tensor(t, dtype=torch.float64))
    assert_close(value, ref.numpy(), backend, rtol=1e-5)
    assert np.all(np.isfinite(backend.to_host(grad)))


def test_bce_logits_at_plus_minus_200_matches_torch(backend):
    z = np.array([[200.0, -200.0, 200.0, -200.0], [0.5, -3.0, 200.0, -200.0]], dtype=np.float32)
    t = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.3, 0.7]], dtype=np.float32)
    value, grad = get_loss("bce_logits")(backend.from_host(z), backend.from_host(t))
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    ref = F.binary_cross_entropy_with_logits(zt, torch.tensor(t, dtype=torch.float64))
    ref.backward()
    assert np.isfinite(backend.to_host(value)) and np.all(np.isfinite(backend.to_host(grad)))
    assert value.dtype == grad.dtype == backend.xp.float32
    assert tuple(grad.shape) == z.shape
    assert_close(value, ref.detach().numpy(), backend, rtol=1e-6, atol=1e-6)
    assert_close(grad, zt.grad.numpy(), backend, rtol=1e-6, atol=1e-7)


def test_loss_shape_errors_and_names(backend):
    with pytest.raises(ShapeError, match=r"target shape \[6, 3\].*\[6, 4\]"):
        get_loss("mse")(backend.from_host(LOGITS), backend.from_host(SOFT[:, :3]))
    with pytest.raises(ShapeError, match="labels must be"):
        get_loss("cross_entropy")(backend.from_host(LOGITS), backend.from_host(LABELS[:3]))
    with pytest.raises(ConfigError, match="unknown loss 'hinge'.*cross_entropy"):
        get_loss("hinge")
    assert get_loss("binary_cross_entropy_with_logits").name == "bce_logits"


def _net_with_grads(backend):
    layer = Dense(5)
    layer.build((3,), backend, rng=1)
    rng = np.random.default_rng(4)
    layer.grads["weight"] = backend.from_host(rng.standard_normal((5, 3)).astype(np.float32) * 3)
    layer.grads["bias"] = backend.from_host(rng.standard_normal(5).astype(np.float32) * 3)
    ref = [torch.tensor(backend.to_host(layer.grads[k])) for k in ("weight", "bias")]
    return layer, ref


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(backend, max_norm):
    layer, ref = _net_with_grads(backend)
    ps = [torch.zeros_like(g, requires_grad=True) for g in ref]
    for p, g in zip(ps, ref):
        p.grad = g.clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(ps, max_norm)
    norm = clip_grad_norm(layer, max_norm)
    assert_close(norm, ref_norm.numpy(), backend, rtol=1e-5)
    assert_close(layer.grads["weight"], ps[0].grad.numpy(), backend, rtol=1e-5, atol=1e-6)
    assert_close(layer.grads["bias"], ps[1].grad.numpy(), backend, rtol=1e-5, atol=1e-6)
    after = float(backend.to_host(global_grad_norm(layer)))
    assert after <= max_norm * (1 + 1e-5) or max_norm > ref_norm


def test_clipping_a_tied_weight_clips_its_summed_gradient(backend):
    """A weight two layers hold is one parameter, as ``torch.nn.utils`` sees one tensor used
    twice: its gradients add up before the norm and before clipping by value."""
    first, second = Dense(3), Dense(3)
    first.build((3,), backend, rng=0)
    second.build((3,), backend, rng=1)
    second.params["weight"] = first.params["weight"]
    rng = np.random.default_rng(6)
    g1, g2, b1, b2 = (rng.standard_normal(s) * 2 for s in ((3, 3), (3, 3), (3,), (3,)))
    refs = [*first.parameters(prefix="a."), *second.parameters(prefix="b.")]

    def fill():
        first.grads.update(weight=backend.from_host(g1), bias=backend.from_host(b1))
        second.grads.update(weight=backend.from_host(g2), bias=backend.from_host(b2))

    fill()
    ps = [torch.tensor(g) for g in (g1 + g2, b1, b2)]
    want = torch.sqrt(sum((p * p).sum() for p in ps)).item()
    norm = clip_grad_norm(refs, 0.5)
    assert_close(norm, np.asarray(want, dtype=np.float32), backend, rtol=1e-5)
    scale = 0.5 / (want + 1e-6)
    summed = backend.to_host(first.grads["weight"]) + backend.to_host(second.grads["weight"])
    np.testing.assert_allclose(summed, (g1 + g2) * scale, rtol=1e-5, atol=1e-6)
    fill()
    clip_grad_value(refs, 0.7)
    assert_close(first.grads["weight"], np.clip(g1 + g2, -0.7, 0.7), backend, atol=1e-6)
    assert_close(second.grads["weight"], np.zeros((3, 3)), backend)
    assert_close(second.grads["bias"], np.clip(b2, -0.7, 0.7), backend, atol=1e-6)


def test_clip_grad_value(backend):
    layer, ref = _net_with_grads(backend)
    clip_grad_value(layer, 0.7)
    assert_close(layer.grads["weight"], np.clip(ref[0].numpy(), -0.7, 0.7), backend)
    with pytest.raises(ConfigError, match="clip_value must be positive"):
        clip_grad_value(layer, 0.0)
