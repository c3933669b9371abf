"""Softmax layer, all ten variants: PyTorch oracle, exact Jacobians, Loom fixtures and bugs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from loomx.backends import get_backend

from loomx.errors import ConfigError, ShapeError
from loomx.layers import Softmax, layer_from_config
from tests.conftest import LOOM_FIXTURES, assert_close
from tests.gradcheck import finite_difference_check, run_layer

FIXTURES = LOOM_FIXTURES
N = 6

CASES = {
    "standard": {},
    "temperature": {"temperature": 0.7},
    "grid": {"rows": 2, "cols": 3, "temperature": 1.3},
    "hierarchical": {"levels": [2, 3]},
    "gumbel": {"temperature": 0.8},
    "masked": {"mask": [True, False, True, True, False, True], "temperature": 0.9},
    "sparsemax": {"temperature": 0.8},
    "entmax": {"alpha": 1.5, "temperature": 1.2},
    "adaptive": {"clusters": [[0, 3], [1, 2, 4, 5]], "temperature": 1.1},
    "mixture": {"temperatures": [0.5, 1.0, 3.0], "temperature": 0.9},
}


# ---------------------------------------------------------------------- torch references
def t_sparsemax(z):
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    support = (1 + k * zs) > zs.cumsum(-1)
    size = support.sum(-1, keepdim=True)
    thr = zs.detach().gather(-1, size - 1)
    mask = (z.detach() >= thr).to(z.dtype)
    tau = ((z * mask).sum(-1, keepdim=True) - 1) / mask.sum(-1, keepdim=True)
    return torch.clamp(z - tau, min=0)


def t_entmax15(z):
    """Exact 1.5-entmax (sort-based support, differentiable threshold on the support)."""
    s = z / 2
    ss, _ = torch.sort(s.detach(), dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    mean = ss.cumsum(-1) / k
    var = (ss * ss).cumsum(-1) / k - mean ** 2
    tau = mean - torch.sqrt(torch.clamp((1 - k * var) / k, min=0))
    size = (tau <= ss).sum(-1, keepdim=True)
    mask = (s.detach() > tau.gather(-1, size - 1)).to(z.dtype)
    m = mask.sum(-1, keepdim=True)
    mu = (s * mask).sum(-1, keepdim=True) / m
    var_s = (s * s * mask).sum(-1, keepdim=True) / m - mu ** 2
    tau_s = mu - torch.sqrt((1 - m * var_s) / m)
    return torch.clamp(s - tau_s, min=0) ** 2


def torch_softmax_variant(variant, opts, x, logits=None, noise=None):
    t = opts.get("temperature", 1.0)
    z = x / t
    if variant in ("grid", "hierarchical"):
        cols = opts["cols"] if variant == "grid" else opts["levels"][-1]
        return torch.softmax(z.reshape(*z.shape[:-1], -1, cols), -1).reshape(z.shape)
    if variant == "gumbel" and noise is not None:
        return torch.softmax((x + noise) / t, -1)
    if variant == "masked":
        keep = torch.tensor(opts["mask"])
        return torch.softmax(z.masked_fill(~keep, -math.inf), -1)
    if variant == "sparsemax":
        return t_sparsemax(z)
    if variant == "entmax":
        return t_entmax15(z)
    if variant == "adaptive":
        off = torch.zeros(N, dtype=x.dtype)
        for c in opts["clusters"]:
            off[c] = -math.log(len(c))
        return torch.softmax(z + off, -1)
    if variant == "mixture":
        pi = torch.softmax(logits, 0)
        return sum(pi[k] * torch.softmax(z / tk, -1) for k, tk in enumerate(opts["temperatures"]))
    return torch.softmax(z, -1)


def gumbel_noise_for(layer, shape, dtype):
    """The noise the layer's next training forward will draw (same stream, same cast)."""
    gen = np.random.default_rng()
    gen.bit_generator.state = layer._rng.get_state()
    u = np.clip(gen.random(size=shape).astype(dtype), 1e-10, np.float32(1 - 1e-7))
    return -np.log(-np.log(u.astype(np.float64)))


# ---------------------------------------------------------------------- oracle tests
@pytest.mark.parametrize("variant", sorted(CASES))
def test_softmax_matches_torch(backend, variant):
    opts = CASES[variant]
    rng = np.random.default_rng(4)
    layer = Softmax(variant, **opts)
    layer.build((3, N), backend, rng=5)
    logits = None
    if variant == "mixture":
        mix = rng.standard_normal(3).astype(np.float32)
        layer.params["mixture_logits"] = backend.from_host(mix)
        logits = torch.tensor(mix, dtype=torch.float64, requires_grad=True)
    x = (rng.standard_normal((2, 3, N)) * 1.5).astype(np.float32)
    dy = rng.standard_normal((2, 3, N)).astype(np.float32)
    train = variant == "gumbel"
    noise = None
    if train:
        noise = torch.tensor(gumbel_noise_for(layer, x.shape, np.float32))

    layer.zero_grad()
    xd = backend.from_host(x)
    y, ctx = layer.forward(xd, train)
    dx = layer.backward(backend.from_host(dy), ctx)

    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = torch_softmax_variant(variant, opts, xt, logits, noise)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    tol = dict(rtol=1e-4, atol=2e-5) if variant in ("entmax", "gumbel") else dict(rtol=2e-5,
                                                                                 atol=2e-6)
    assert_close(y, yt.detach(), backend, **tol)
    assert_close(dx, xt.grad, backend, **tol)
    if variant == "mixture":
        assert_close(layer.grads["mixture_logits"], logits.grad, backend, **tol)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(1, 9), seed=st.integers(0, 2 ** 16),
       scale=st.sampled_from([0.1, 1.0, 4.0]))
def test_sparsemax_and_entmax_match_torch_on_drawn_shapes(batch, n, seed, scale):
    b = get_backend("numpy", "float64")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n)) * scale
    dy = rng.standard_normal((batch, n))
    for variant, ref in (("sparsemax", t_sparsemax), ("entmax", t_entmax15)):
        layer = Softmax(variant, iterations=60)
        layer.build((n,), b)
        y, dx, _ = run_layer(layer, x, dy)
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt)
        yt.backward(torch.tensor(dy))
        np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-9, err_msg=variant)
        np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-8, err_msg=variant)
        np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-12)


def test_entmax_alpha_two_is_sparsemax_and_alpha_near_one_is_softmax(backend64):
    x_host = np.array([[0.3, -1.2, 2.0, 1.7, 0.0]])
    x = backend64.from_host(x_host)
    sp = Softmax("sparsemax")
    sp.build((5,), backend64)
    two = Softmax("entmax", alpha=2.0, iterations=80)
    two.build((5,), backend64)
    assert_close(two(x), backend64.to_host(sp(x)), backend64, atol=1e-12)
    near_one = Softmax("entmax", alpha=1.001, iterations=80)
    near_one.build((5,), backend64)
    assert_close(near_one(x), torch.softmax(torch.tensor(x_host), -1), backend64, atol=2e-3)


# ---------------------------------------------------------------------- exact Jacobians
def _jacobian_fd(layer, x, eps=1e-6):
    b = layer.backend
    n = x.shape[-1]
    jac = np.zeros((n, n))
    for j in range(n):
        xp_, xm = x.copy(), x.copy()
        xp_[0, j] += eps
        xm[0, j] -= eps
        jac[:, j] = (b.to_host(layer(b.from_host(xp_)))[0] -
                     b.to_host(layer(b.from_host(xm)))[0]) / (2 * eps)
    return jac


def _jacobian_analytic(layer, x):
    b = layer.backend
    n = x.shape[-1]
    _, ctx = layer.forward(b.from_host(x))
    rows = []
    for i in range(n):
        e = np.zeros((1, n))
        e[0, i] = 1.0
        rows.append(b.to_host(layer.backward(b.from_host(e), ctx))[0])
    return np.stack(rows)  # J[i, :] = dy_i/dx


@pytest.mark.parametrize("variant", ["temperature", "grid", "hierarchical", "masked",
                                     "sparsemax", "entmax", "adaptive", "mixture"])
def test_full_jacobian_equals_finite_differences(numpy64, variant):
    opts = dict(CASES[variant])
    if variant == "entmax":
        opts["iterations"] = 70
    layer = Softmax(variant, **opts)
    layer.build((N,), numpy64)
    x = np.array([[0.9, -0.4, 1.7, 0.2, 1.1, -1.3]])
    jac = _jacobian_analytic(layer, x)
    np.testing.assert_allclose(jac, _jacobian_fd(layer, x), atol=1e-8)
    if variant in ("hierarchical", "sparsemax", "entmax", "temperature"):
        # Loom's backward: the plain whole-vector softmax Jacobian on the output y
        y = numpy64.to_host(layer(numpy64.from_host(x)))[0]
        loom = np.diag(y) - np.outer(y, y)
        assert not np.allclose(loom, jac, atol=1e-3), "Loom's Jacobian would be right here"


@pytest.mark.parametrize("variant", sorted(set(CASES) - {"gumbel"}))
def test_finite_differences_of_input_and_parameters(numpy64, variant):
    opts = dict(CASES[variant])
    layer = Softmax(variant, **opts)
    layer.build((2, N), numpy64, rng=1)
    if variant == "mixture":
        layer.params["mixture_logits"] = numpy64.from_host(np.array([0.3, -0.2, 0.5]))
    x = np.random.default_rng(3).standard_normal((2, 2, N))
    finite_difference_check(layer, x, rtol=1e-5, atol=1e-8)


def test_gumbel_gradient_with_noise_held_fixed(numpy64):
    layer = Softmax("gumbel", temperature=0.6)
    layer.build((N,), numpy64, rng=2)
    x = np.random.default_rng(0).standard_normal((3, N))
    noise = gumbel_noise_for(layer, x.shape, np.float64)
    y, ctx = layer.forward(numpy64.from_host(x), train=True)
    dy = np.random.default_rng(1).standard_normal(x.shape)
    dx = numpy64.to_host(layer.backward(numpy64.from_host(dy), ctx))
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.softmax((xt + torch.tensor(noise)) / 0.6, -1)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(numpy64.to_host(y), yt.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------- Loom's bugs fixed
def test_sparsemax_of_1_2_3_is_0_0_1(backend):
    layer = Softmax("sparse")  # Loom's name; Loom returns [0, 0, 0]
    layer.build((3,), backend)
    assert_close(layer(backend.from_host(np.array([[1.0, 2.0, 3.0]], np.float32))),
                 np.array([[0.0, 0.0, 1.0]]), backend, atol=0)


def test_temperature_gradient_includes_one_over_t(numpy64):
    t = 2.5
    layer = Softmax("temperature", temperature=t)
    layer.build((4,), numpy64)
    x = np.array([[0.5, -1.0, 2.0, 0.1]])
    dy = np.array([[1.0, 0.0, -2.0, 0.5]])
    y, dx, _ = run_layer(layer, x, dy)
    loom = y * (dy - (dy * y).sum(-1, keepdims=True))  # Loom: no 1/T factor
    np.testing.assert_allclose(dx * t, loom, rtol=1e-12)
    fd = _jacobian_fd(layer, x).T @ dy[0]
    np.testing.assert_allclose(dx[0], fd, atol=1e-8)


@pytest.mark.parametrize("name", ["standard", "grid", "masked"])
def test_forward_reproduces_loom_fixtures(backend, name):
    fx = json.loads((FIXTURES / f"softmax_{name}.json").read_text())
    cfg = json.loads(fx["bundle"])["models"][0]["cfg"]["layers"][1]
    opts = {"temperature": cfg.get("temperature", 1.0)}
    if name == "grid":
        opts.update(rows=cfg["softmax_rows"], cols=cfg["softmax_cols"])
    if name == "masked":
        opts["mask"] = cfg["mask"]
    layer = Softmax(name, **opts)
    logits = np.asarray(fx["logits"], np.float32)
    layer.build((logits.shape[1],), backend)
    y = layer(backend.from_host(logits))
    assert_close(y, np.asarray(fx["outputs"], np.float32), backend, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- behaviour
def test_gumbel_noise_only_in_training_and_seeded(backend):
    x = backend.from_host(np.array([[1.0, 0.0, -1.0, 0.5]], np.float32))
    a, b2 = Softmax("gumbel"), Softmax("gumbel")
    a.build((4,), backend, rng=9)
    b2.build((4,), backend, rng=9)
    plain = Softmax()
    plain.build((4,), backend)
    assert_close(a(x), backend.to_host(plain(x)), backend)
    first = backend.to_host(a(x, train=True))
    assert_close(b2(x, train=True), first, backend, rtol=0, atol=0)
    assert not np.allclose(backend.to_host(a(x, train=True)), first)


def test_gumbel_max_samples_follow_the_softmax(numpy64):
    logits = np.array([1.0, 0.0, -0.5])
    layer = Softmax("gumbel")
    layer.build((3,), numpy64, rng=0)
    y = numpy64.to_host(layer(numpy64.from_host(np.tile(logits, (20000, 1))), train=True))
    freq = np.bincount(y.argmax(-1), minlength=3) / 20000
    np.testing.assert_allclose(freq, np.exp(logits) / np.exp(logits).sum(), atol=0.015)


@pytest.mark.parametrize("variant", sorted(CASES))
def test_outputs_are_distributions_and_keep_dtype(backend64, variant):
    layer = Softmax(variant, **CASES[variant])
    layer.build((N,), backend64)
    x = np.random.default_rng(7).standard_normal((4, N)) * 3
    y = layer(backend64.from_host(x), train=True)
    groups = 2 if variant in ("grid", "hierarchical") else 1
    y_host = backend64.to_host(y)
    assert_close(y, y_host, backend64, dtype=backend64.xp.float64)
    np.testing.assert_allclose(y_host.sum(-1), groups, rtol=1e-10)
    assert (y_host >= 0).all()
    if variant == "masked":
        assert (y_host[:, [1, 4]] == 0).all()


def test_adaptive_gives_each_cluster_equal_mass_for_equal_logits(backend):
    layer = Softmax("adaptive", clusters=[[0], [1, 2, 3]])
    layer.build((4,), backend)
    y = layer(backend.zeros((1, 4)))
    assert_close(y, np.array([[0.5, 1 / 6, 1 / 6, 1 / 6]]), backend)


@pytest.mark.parametrize("variant", sorted(CASES))
def test_config_round_trip(variant):
    layer = Softmax(variant, name="sm", **CASES[variant])
    cfg = layer.get_config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["variant"] == variant
    assert layer_from_config(cfg).get_config() == cfg
    if variant == "standard":
        assert set(cfg) == {"type", "variant", "temperature", "name"}


def test_wrong_input_width_names_layer_and_shapes(backend):
    layer = Softmax(name="probs")
    layer.build((5,), backend)
    with pytest.raises(ShapeError, match=r"'probs'.*\[B, \.\.\., 5\].*\[2, 4\]"):
        layer(backend.zeros((2, 4)))


@pytest.mark.parametrize("kwargs, build, error", [
    ({"variant": "nope"}, None, ConfigError),
    ({"variant": "standard", "temperature": 0}, None, ConfigError),
    ({"variant": "grid"}, None, ConfigError),
    ({"variant": "entmax", "alpha": 1.0}, None, ConfigError),
    ({"variant": "masked", "mask": [False, False]}, None, ConfigError),
    ({"variant": "grid", "rows": 4}, (6,), ShapeError),
    ({"variant": "hierarchical", "levels": [2, 2]}, (6,), ShapeError),
    ({"variant": "masked", "mask": [True, False]}, (6,), ShapeError),
    ({"variant": "adaptive", "clusters": [[0, 1], [1, 2]]}, (3,), ShapeError),
])
def test_bad_configurations_raise(kwargs, build, error):
    with pytest.raises(error, match="Softmax|softmax"):
        layer = Softmax(**kwargs)
        layer.build(build, "numpy")


@pytest.mark.parametrize("variant", ["masked", "adaptive", "gumbel", "mixture"])
def test_layer_moves_to_another_backend(backend, variant):
    layer = Softmax(variant, **CASES[variant])
    layer.build((N,), "numpy", rng=3)
    x = np.random.default_rng(0).standard_normal((2, N)).astype(np.float32)
    before = layer.backend.to_host(layer(layer.backend.from_host(x)))
    layer.to(backend)
    y, ctx = layer.forward(backend.from_host(x), train=True)
    dx = layer.backward(backend.ones((2, N)), ctx)
    assert_close(dx, backend.to_host(dx), backend)
    if variant != "gumbel":
        assert_close(y, before, backend)
