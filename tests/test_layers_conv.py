"""Convolutions (1/2/3-d, transposed) against PyTorch and finite differences, on every backend."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from loomx.backends import get_backend

from loomx.errors import ConfigError, LoomxError, ShapeError
from loomx.layers import (
    Conv1D,
    Conv2D,
    Conv3D,
    ConvTranspose1D,
    ConvTranspose2D,
    Dense,
    layer_from_config,
)
from loomx.layers._windows import (
    gather_windows,
    gather_windows_reference,
    scatter_windows_reference,
)
from tests.conftest import LOOM_FIXTURES, assert_close
from tests.gradcheck import finite_difference_check

CONV = {1: Conv1D, 2: Conv2D, 3: Conv3D}
CONVT = {1: ConvTranspose1D, 2: ConvTranspose2D}
TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TORCH_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d}
TORCH_ACT = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "scaled_relu": lambda z: torch.relu(1.1 * z),
}
FIXTURE = LOOM_FIXTURES / "conv2d.json"

# (ndim, C, F, spatial, options)
CONV_CASES = [
    (1, 3, 4, (11,), dict(kernel_size=3)),
    (1, 4, 6, (12,), dict(kernel_size=4, stride=3, padding=2, groups=2, activation="tanh")),
    (1, 2, 3, (10,), dict(kernel_size=3, padding="same", dilation=2, bias=False)),
    (2, 3, 4, (7, 6), dict(kernel_size=3, padding=1, activation="relu")),
    (2, 4, 6, (9, 8), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), groups=2)),
    (2, 4, 4, (8, 8), dict(kernel_size=3, padding="same", dilation=(2, 1), groups=4,
                           activation="gelu")),
    (2, 2, 3, (7, 9), dict(kernel_size=2, padding="same", bias=False)),
    (2, 3, 5, (9, 9), dict(kernel_size=3, stride=2, padding="valid", dilation=2)),
    (2, 3, 4, (9, 8), dict(kernel_size=2, stride=2, activation="relu")),
    (2, 2, 2, (5, 5), dict(kernel_size=1, bias=False)),
    (3, 2, 3, (5, 6, 4), dict(kernel_size=3, padding=1, activation="tanh")),
    (3, 4, 2, (6, 5, 6), dict(kernel_size=(2, 3, 2), stride=(2, 1, 2), dilation=(1, 2, 1),
                              groups=2)),
]

# (ndim, C, F, spatial, options)
CONVT_CASES = [
    (1, 3, 4, (6,), dict(kernel_size=3)),
    (1, 4, 6, (5,), dict(kernel_size=4, stride=3, padding=1, output_padding=2, groups=2,
                         activation="tanh")),
    (1, 2, 2, (7,), dict(kernel_size=3, dilation=3, output_padding=2, bias=False)),
    (2, 3, 4, (4, 5), dict(kernel_size=3, stride=2, padding=1, output_padding=1,
                           activation="relu")),
    (2, 4, 6, (5, 4), dict(kernel_size=(2, 3), stride=(1, 2), padding=(0, 1), dilation=(2, 1),
                           groups=2)),
    (2, 2, 3, (3, 3), dict(kernel_size=4, stride=2, padding=1)),
    (2, 4, 2, (3, 4), dict(kernel_size=2, stride=2)),
    (1, 2, 3, (4,), dict(kernel_size=3, stride=3, padding=1, output_padding=2)),
]


def _case_id(case):
    ndim, c, f, s, opts = case
    return f"{ndim}d-{c}to{f}-" + "-".join(f"{k}={v}" for k, v in opts.items())


def _torch_opts(opts: dict) -> dict:
    skip = ("kernel_size", "bias", "activation")
    return {k: v for k, v in opts.items() if k not in skip}


def _run(layer, backend, x_host, dy_host):
    """Forward + backward on device arrays; returns device y, dx and the grads dict."""
    layer.zero_grad()
    y, ctx = layer.forward(backend.from_host(x_host))
    dx = layer.backward(backend.from_host(dy_host), ctx)
    return y, dx, layer.grads


def _torch_reference(fn, act, x, weight, bias, dy, opts):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    bt = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    yt = TORCH_ACT[act](fn(xt, wt, bt, **opts))
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    return yt, xt.grad, wt.grad, None if bt is None else bt.grad


def _check_against_torch(layer, backend, fn, ndim, c, spatial, opts, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    layer.build((c, *spatial), backend, rng=seed)
    if layer.bias:  # non-zero bias so its broadcast is checked
        layer.params["bias"] = backend.from_host(rng.standard_normal(layer.out_channels))
    x = rng.standard_normal((batch, c, *spatial))
    dy = rng.standard_normal((batch, *layer.output_shape))
    y, dx, grads = _run(layer, backend, x, dy)
    w = backend.to_host(layer.params["weight"])
    b = backend.to_host(layer.params["bias"]) if layer.bias else None
    yt, dxt, dwt, dbt = _torch_reference(fn, opts.get("activation", "identity"), x, w, b, dy,
                                         _torch_opts(opts))
    tol = dict(rtol=1e-4, atol=1e-4)
    assert_close(y, yt, backend, **tol)
    assert_close(dx, dxt, backend, **tol)
    assert_close(grads["weight"], dwt, backend, **tol)
    if layer.bias:
        assert_close(grads["bias"], dbt, backend, **tol)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv_matches_torch(backend, case):
    ndim, c, f, spatial, opts = case
    layer = CONV[ndim](f, **opts)
    _check_against_torch(layer, backend, TORCH_CONV[ndim], ndim, c, spatial, opts)


@pytest.mark.parametrize("case", CONVT_CASES, ids=_case_id)
def test_conv_transpose_matches_torch(backend, case):
    ndim, c, f, spatial, opts = case
    layer = CONVT[ndim](f, **opts)
    _check_against_torch(layer, backend, TORCH_CONVT[ndim], ndim, c, spatial, opts)


@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (1, 2, 4, 5, 8, 11)], ids=_case_id)
def test_conv_finite_differences(numpy64, case):
    ndim, c, f, spatial, opts = case
    layer = CONV[ndim](f, **opts)
    layer.build((c, *spatial), numpy64, rng=1)
    x = np.random.default_rng(3).standard_normal((2, c, *spatial))
    finite_difference_check(layer, x, max_entries=25)


@pytest.mark.parametrize("case", [CONVT_CASES[i] for i in (1, 2, 4)], ids=_case_id)
def test_conv_transpose_finite_differences(numpy64, case):
    ndim, c, f, spatial, opts = case
    layer = CONVT[ndim](f, **opts)
    layer.build((c, *spatial), numpy64, rng=1)
    x = np.random.default_rng(3).standard_normal((2, c, *spatial))
    finite_difference_check(layer, x, max_entries=25)


def test_conv_finite_differences_every_backend(backend64):
    layer = Conv2D(4, (2, 3), stride=(1, 2), padding=1, dilation=(2, 1), groups=2,
                   activation="tanh")
    layer.build((2, 5, 6), backend64, rng=2)
    x = np.random.default_rng(4).standard_normal((2, 2, 5, 6))
    finite_difference_check(layer, x, max_entries=12)


def test_transpose_is_the_adjoint_of_conv(backend64):
    """<conv(x), u> == <x, conv_transpose(u)> for the same weight (no bias, identity)."""
    rng = np.random.default_rng(5)
    opts = dict(kernel_size=3, stride=2, padding=1, dilation=1, groups=2, bias=False)
    conv = Conv2D(4, **opts)
    conv.build((6, 9, 7), backend64)
    convt = ConvTranspose2D(6, output_padding=(0, 0), **opts)
    convt.build(conv.output_shape, backend64)
    assert convt.output_shape == (6, 9, 7)
    convt.params["weight"] = conv.params["weight"]
    x = rng.standard_normal((2, 6, 9, 7))
    u = rng.standard_normal((2, *conv.output_shape))
    lhs = np.sum(backend64.to_host(conv(backend64.from_host(x))) * u)
    rhs = np.sum(x * backend64.to_host(convt(backend64.from_host(u))))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    c_per_group=st.integers(1, 3), f_per_group=st.integers(1, 3), groups=st.integers(1, 2),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.just("valid")),
    size=st.tuples(st.integers(5, 9), st.integers(5, 9)), bias=st.booleans())
def test_conv2d_random_configurations(c_per_group, f_per_group, groups, k, stride, dilation,
                                      padding, size, bias):
    backend = get_backend("numpy", "float64")
    opts = dict(kernel_size=k, stride=stride, padding=padding, dilation=dilation,
                groups=groups, bias=bias)
    layer = Conv2D(f_per_group * groups, **opts)
    _check_against_torch(layer, backend, F.conv2d, 2, c_per_group * groups, size, opts)


@settings(max_examples=20, deadline=None)
@given(
    c=st.integers(1, 3), f=st.integers(1, 3), k=st.integers(1, 4), stride=st.integers(1, 3),
    dilation=st.integers(1, 2), padding=st.integers(0, 2), out_pad=st.integers(0, 2),
    size=st.integers(3, 7))
def test_conv_transpose1d_random_configurations(c, f, k, stride, dilation, padding, out_pad,
                                                size):
    backend = get_backend("numpy", "float64")
    out_pad = min(out_pad, max(stride, dilation) - 1)
    if (size - 1) * stride - 2 * padding + dilation * (k - 1) + out_pad + 1 < 1:
        return
    opts = dict(kernel_size=k, stride=stride, padding=padding, output_padding=out_pad,
                dilation=dilation)
    _check_against_torch(ConvTranspose1D(f, **opts), backend, F.conv_transpose1d, 1, c,
                         (size,), opts)


@pytest.mark.parametrize("spec", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("geometry", [
    ((3,), (1,), (1,), (9,)), ((3,), (2,), (2,), (12,)), ((3, 2), (2, 1), (1, 3), (9, 8)),
    ((2, 2, 3), (1, 2, 1), (2, 1, 1), (5, 6, 7))])
def test_window_kernels_match_reference(spec, geometry):
    from tests.conftest import _make

    backend = _make(spec, "float64")
    kernel, stride, dilation, spatial = geometry
    if backend.kernel("window_gather") is None:
        pytest.skip(f"{spec} has no window kernels")
    rng = np.random.default_rng(0)
    shape = (2, *spatial, 3)  # channels last
    x = backend.from_host(rng.standard_normal(shape))
    fast = gather_windows(backend, x, kernel, stride, dilation)
    out_shape = tuple(fast.shape[1:-2])
    ref = gather_windows_reference(backend.xp, x, kernel, stride, dilation, out_shape)
    np.testing.assert_array_equal(backend.to_host(fast), backend.to_host(ref))
    cols = backend.from_host(rng.standard_normal(tuple(fast.shape)))
    want = scatter_windows_reference(backend, backend.zeros(shape), cols, kernel, stride,
                                     dilation)
    got = backend.kernel("window_scatter_add")(backend.zeros(shape), cols, kernel, stride,
                                               dilation)
    np.testing.assert_allclose(backend.to_host(got), backend.to_host(want), rtol=1e-14)


def test_float64_device_and_dtype_preserved(backend64):
    layer = ConvTranspose2D(3, 3, stride=2, padding=1, output_padding=1)
    layer.build((2, 4, 4), backend64)
    assert layer.params["weight"].dtype == backend64.xp.float64
    x = backend64.from_host(np.ones((1, 2, 4, 4)))
    y, ctx = layer.forward(x)
    assert tuple(y.shape) == (1, 3, 8, 8)
    dx = layer.backward(backend64.ones((1, 3, 8, 8)), ctx)
    for arr in (y, dx, layer.grads["weight"], layer.grads["bias"]):
        assert arr.dtype == backend64.xp.float64
        assert str(getattr(arr, "device", backend64.device)) == str(backend64.device)


def test_output_shapes_and_he_init():
    backend = get_backend("numpy", "float64")
    layer = Conv2D(64, 3, stride=2, padding=1)
    assert layer.build((32, 28, 28), backend) == (64, 14, 14)
    w = backend.to_host(layer.params["weight"])
    assert w.shape == (64, 32, 3, 3)
    np.testing.assert_allclose(w.std(), np.sqrt(2 / (32 * 9)), rtol=0.05)
    assert Conv1D(4, 5, padding="same").build((2, 11), backend) == (4, 11)
    assert Conv3D(2, 3, padding="valid").build((1, 5, 6, 7), backend) == (2, 3, 4, 5)
    assert ConvTranspose2D(5, 4, stride=2, padding=1).build((3, 7, 7), backend) == (5, 14, 14)
    assert ConvTranspose1D(2, 3, groups=1).build((4, 6), backend) == (2, 8)


@pytest.mark.parametrize("layer", [
    Conv1D(4, 3, stride=2, padding=[1], dilation=1, groups=1, bias=False, activation="tanh",
           in_channels=2, init="xavier", name="c1"),
    Conv2D(6, [3, 2], stride=(2, 1), padding=(1, 0), dilation=[1, 2],
           groups=3),
    Conv2D(2, 3, padding="same"),
    Conv3D(2, 3, padding="valid", activation="relu", dtype="float64"),
    ConvTranspose1D(4, 3, stride=2, output_padding=1, groups=2),
    ConvTranspose2D(4, [2, 3], stride=[2, 2], padding=(0, 1), output_padding=[1, 0],
                    dilation=1, name="up"),
], ids=lambda layer: layer.type_name)
def test_config_round_trip(layer):
    config = layer.get_config()
    again = layer_from_config(json.loads(json.dumps(config)))
    assert type(again) is type(layer)
    assert again.get_config() == config
    backend = get_backend("numpy")
    c = layer.in_channels or 6
    spatial = (8,) * layer.ndim
    assert again.build((c, *spatial), backend) == layer.build((c, *spatial), backend)


def test_wrong_input_shape_names_layer_and_shapes(backend):
    layer = Conv2D(4, 3, name="stem")
    layer.build((3, 8, 8), backend)
    with pytest.raises(ShapeError, match=r"'stem'.*\[B, 3, 8, 8\].*\[2, 1, 8, 8\]"):
        layer.forward(backend.from_host(np.zeros((2, 1, 8, 8), np.float32)))
    up = ConvTranspose1D(2, 3, name="up")
    up.build((4, 5), backend)
    with pytest.raises(ShapeError, match=r"'up'.*\[B, 4, 5\].*\[2, 4, 6\]"):
        up.forward(backend.from_host(np.zeros((2, 4, 6), np.float32)))


@pytest.mark.parametrize("make, shape, message", [
    (lambda: Conv2D(4, 3, name="c"), (3, 8), r"'c'.*\[C, H, W\].*\[3, 8\]"),
    (lambda: Conv2D(4, 3, in_channels=2, name="c"), (3, 8, 8),
     r"'c'.*2 input channels.*\[3, 8, 8\]"),
    (lambda: Conv2D(4, 5, name="c"), (3, 4, 4), r"'c'.*\[3, 4, 4\].*smaller"),
    (lambda: Conv1D(4, 3, groups=2, name="c"), (3, 8), r"'c'.*3 input channels.*groups=2"),
    (lambda: ConvTranspose1D(2, 2, padding=3, name="t"), (1, 2), r"'t'.*\[1, 2\].*empty"),
])
def test_bad_build_raises(make, shape, message):
    with pytest.raises(LoomxError, match=message):
        make().build(shape, get_backend("numpy"))


@pytest.mark.parametrize("make, message", [
    (lambda: Conv2D(4, 3, stride=2, padding="same"), r"Conv2D.*'same'.*stride"),
    (lambda: Conv2D(4, 3, padding="full"), r"Conv2D.*padding.*'full'"),
    (lambda: Conv2D(4, (3, 3, 3)), r"Conv2D.*kernel_size.*2 ints"),
    (lambda: Conv1D(3, 3, groups=2), r"Conv1D.*out_channels=3.*groups=2"),
    (lambda: Conv3D(0, 3), r"Conv3D.*out_channels"),
    (lambda: Conv2D(4, 3, dilation=0), r"Conv2D.*dilation.*>= 1"),
    (lambda: Conv2D(4, 3, activation="nope"), r"unknown activation"),
    (lambda: ConvTranspose2D(4, 3, stride=2, output_padding=2), r"ConvTranspose2D.*output_padding"),
    (lambda: ConvTranspose1D(4, 3, padding="same"), r"ConvTranspose1D.*padding"),
])
def test_bad_config_raises(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def _loom_fixture():
    if not FIXTURE.exists():
        pytest.skip(f"Loom fixture {FIXTURE} not present")
    data = json.loads(FIXTURE.read_text())
    model = json.loads(data["bundle"])["models"][0]
    weights = json.loads(base64.b64decode(model["weights"]["data"]))["layers"]
    return data, model["cfg"]["layers"], weights


def test_loom_conv2d_fixture(backend):
    """Conv2D → Conv2D → Dense with Loom's weights reproduces Loom's outputs."""
    data, cfgs, weights = _loom_fixture()
    f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731
    acts = {"relu": "scaled_relu", "tanh": "tanh", "leaky_relu": "loom_leaky_relu"}
    convs = []
    shape = (cfgs[0]["input_channels"], cfgs[0]["input_height"], cfgs[0]["input_width"])
    for cfg, w in zip(cfgs[:2], weights[:2]):
        layer = Conv2D(cfg["filters"], cfg["kernel_size"], stride=cfg["stride"],
                       padding=cfg["padding"], activation=acts[cfg["activation"]])
        shape = layer.build(shape, backend)
        assert shape == (cfg["filters"], cfg["output_height"], cfg["output_width"])
        k = cfg["kernel_size"]
        layer.params["weight"] = backend.from_host(
            f32(w["kernel"]).reshape(cfg["filters"], cfg["input_channels"], k, k))
        layer.params["bias"] = backend.from_host(f32(w["conv_bias"]))
        convs.append(layer)
    dense_cfg, dense_w = cfgs[2], weights[2]
    n_in, n_out = dense_cfg["input_height"], dense_cfg["output_height"]
    dense = Dense(n_out, activation=acts[dense_cfg["activation"]])
    dense.build((n_in,), backend)
    dense.params["weight"] = backend.from_host(f32(dense_w["kernel"]).reshape(n_in, n_out).T)
    dense.params["bias"] = backend.from_host(f32(dense_w["biases"]))
    batch = data["batch_size"]
    inputs = data["inputs"]
    inputs = json.loads(inputs) if isinstance(inputs, str) else inputs
    for flat_in, flat_out in zip(inputs, data["outputs"]):
        h = backend.from_host(f32(flat_in).reshape(batch, 1, 8, 8))
        for layer in convs:
            h = layer(h)
        h = backend.from_host(backend.to_host(h).reshape(batch, n_in))
        y = dense(h)
        assert_close(y, f32(flat_out).reshape(batch, n_out), backend, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, shape", [
    (lambda: Conv2D(4, 3, padding=1, activation="relu"), (2, 5, 5)),
    (lambda: Conv2D(4, 3, groups=2), (2, 5, 5)),
    (lambda: Conv1D(3, 3), (2, 6)),
    (lambda: ConvTranspose2D(3, 3, stride=2), (2, 4, 4)),
], ids=["relu", "groups", "1d", "transposed"])
def test_an_empty_batch_runs_forward_and_backward(backend, make, shape):
    """B = 0 gives empty outputs and input gradients and zero parameter gradients, with and
    without the backend's kernels (reshapes spell every size out)."""
    for b in (backend, backend.without_kernels()):
        layer = make()
        out_shape = layer.build(shape, b, rng=0)
        x = b.from_host(np.zeros((0, *shape), np.float32))
        y, ctx = layer.forward(x, True)
        assert tuple(y.shape) == (0, *out_shape)
        dx = layer.backward(b.zeros(tuple(y.shape), dtype=y.dtype), ctx)
        assert tuple(dx.shape) == (0, *shape)
        for ref in layer.parameters():
            assert float(b.to_host(b.xp.sum(b.xp.abs(ref.grad)))) == 0.0
