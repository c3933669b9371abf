"""Argument, shape and dtype checks shared by every layer: constructor arguments, build
shapes, input dtypes, output-gradient shapes and backend dtypes."""

from __future__ import annotations

import numpy as np
import pytest
from loomx.backends import get_backend

from loomx.errors import ConfigError, LoomxError, ShapeError
from loomx.grid import Network
from loomx.layers import (
    GRU,
    LSTM,
    RNN,
    Activation,
    AvgPool2D,
    Conv1D,
    Conv2D,
    ConvTranspose2D,
    Dense,
    Dropout,
    Embedding,
    Flatten,
    GlobalAvgPool,
    LayerNorm,
    MaxPool2D,
    MLPBlock,
    MoE,
    MultiHeadAttention,
    Reshape,
    RMSNorm,
    Softmax,
    SwiGLU,
)


def _rand(backend, shape, dtype=np.float32, seed=0):
    host = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return backend.from_host(host, dtype=getattr(backend.xp, np.dtype(dtype).name))


# ---------------------------------------------------------------------- 1: float dtypes
@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "sum", "float99", "complex64"])
def test_get_backend_rejects_non_float_dtype(dtype):
    with pytest.raises(ConfigError, match="real floating"):
        get_backend("numpy", dtype)
    with pytest.raises(ConfigError, match="real floating"):
        get_backend("numpy").with_dtype(dtype)


def test_with_dtype_rejects_non_float_dtype():
    numpy = get_backend("numpy")
    with pytest.raises(ConfigError):
        numpy.with_dtype("int32")
    with pytest.raises(ConfigError):
        numpy.with_dtype(numpy.xp.int64)
    assert numpy.with_dtype(numpy.xp.float64).float_dtype == numpy.xp.float64
    assert get_backend("numpy", "float16").float_dtype == numpy.xp.float16


@pytest.mark.parametrize("dtype", ["int32", "sum", "bogus", "bool"])
def test_layer_dtype_must_be_a_float_name(dtype):
    with pytest.raises(ConfigError, match="dtype"):
        Dense(4, dtype=dtype)


def test_layer_to_rejects_non_float_dtype():
    layer = Dense(2)
    layer.build((3,), "numpy")
    with pytest.raises(ConfigError):
        layer.to("numpy", "int32")


def test_bad_backend_specs_raise_loomx_errors():
    pytest.importorskip("torch")
    with pytest.raises(LoomxError, match="torch:nope"):
        get_backend("torch:nope")
    with pytest.raises(LoomxError, match="the device after ':' is a number here"):
        get_backend("numpy:abc")
    with pytest.raises(LoomxError, match=r"\(e.g. 'cupy:0'\), got 'x'"):
        get_backend("cupy:x")
    assert get_backend("numpy:cpu").device == get_backend("numpy").device
    with pytest.raises(ConfigError):
        get_backend(3)


# ---------------------------------------------------------------------- 2: input dtypes
def _float_layers():
    return [
        (Dense(4), (3,)), (Activation("relu"), (3,)), (LayerNorm(), (8,)), (RMSNorm(), (8,)),
        (Softmax(), (5,)), (SwiGLU(4), (6,)), (MLPBlock(4), (6,)), (MoE(4, 2, 8), (6,)),
        (Dropout(0.5), (5,)), (Conv2D(2, 3), (1, 5, 5)), (ConvTranspose2D(2, 3), (1, 4, 4)),
        (MaxPool2D(2), (1, 4, 4)), (AvgPool2D(2), (1, 4, 4)), (GlobalAvgPool(), (1, 4, 4)),
        (LSTM(4), (5, 3)), (MultiHeadAttention(2), (5, 8)),
    ]


@pytest.mark.parametrize("index", range(16))
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_float_layers_reject_non_float_inputs(backend, index, dtype):
    layer, shape = _float_layers()[index]
    layer.build(shape, backend)
    x = backend.from_host(np.ones((2, *shape), dtype=dtype),
                          dtype=getattr(backend.xp, np.dtype(dtype).name))
    with pytest.raises(ShapeError, match=f"{type(layer).__name__} expected a real floating"):
        layer.forward(x)


def test_network_rejects_integer_input_naming_the_layer(backend):
    net = Network.chain([Dense(8, activation="relu"), Dense(3)], input_shape=(4,),
                        backend=backend)
    x = backend.from_host(np.ones((2, 4), np.int64), dtype=backend.xp.int64)
    with pytest.raises(ShapeError, match="Dense expected a real floating"):
        net(x)


def test_shape_layers_and_embedding_accept_integers(backend):
    ids = backend.from_host(np.ones((2, 6), np.int64), dtype=backend.xp.int64)
    flat = Flatten()
    flat.build((6,), backend)
    assert flat(ids).dtype == backend.xp.int64
    reshape = Reshape((2, 3))
    reshape.build((6,), backend)
    assert tuple(reshape(ids).shape) == (2, 2, 3)
    emb = Embedding(4, 3)
    emb.build((6,), backend)
    assert tuple(emb(ids).shape) == (2, 6, 3)


@pytest.mark.parametrize("make", [LayerNorm, RMSNorm, lambda: SwiGLU(4), lambda: MLPBlock(4)])
def test_half_precision_input_keeps_its_dtype(backend, make):
    if not hasattr(backend.xp, "float16"):
        pytest.skip("no float16")
    layer = make()
    layer.build((8,), backend)
    x = _rand(backend, (2, 8), np.float16)
    y, ctx = layer.forward(x)
    assert y.dtype == backend.xp.float16
    ref = make()
    ref.build((8,), backend)
    y32 = ref(backend.xp.astype(x, backend.xp.float32))
    np.testing.assert_allclose(backend.to_host(y).astype(np.float32), backend.to_host(y32),
                               rtol=2e-2, atol=2e-2)
    dx = layer.backward(backend.ones(tuple(y.shape), dtype=backend.xp.float16), ctx)
    assert dx.dtype == backend.xp.float16
    assert all(g.dtype == backend.xp.float32 for g in layer.grads.values())


def test_a_list_input_names_the_array_type():
    layer = Dense(2)
    layer.build((3,), "numpy")
    with pytest.raises(ShapeError, match="numpy array but received a list"):
        layer([[1.0, 2.0, 3.0]])
    net = Network.chain([Dense(2)], input_shape=(3,))
    with pytest.raises(ShapeError, match="array but received a list"):
        net([[1.0, 2.0, 3.0]])


# ---------------------------------------------------------------------- 3: dy shapes
def _forward(layer, shape, backend, batch=2, **kw):
    layer.build(shape, backend)
    return layer.forward(_rand(backend, (batch, *shape)), **kw)


@pytest.mark.parametrize("make, shape", [
    (lambda: Dense(4, activation="relu"), (3,)), (lambda: Dense(4), (3,)),
    (lambda: Activation("tanh"), (3,)), (LayerNorm, (8,)), (RMSNorm, (8,)),
    (Softmax, (5,)), (lambda: Softmax("mixture", temperatures=[1.0, 2.0]), (5,)),
    (lambda: SwiGLU(4), (6,)), (lambda: MLPBlock(4), (6,)),
    (lambda: Dropout(0.5), (5,)), (Flatten, (2, 3)), (lambda: Reshape((3, 2)), (6,)),
    (lambda: Conv2D(4, 3, padding=1), (2, 6, 6)), (lambda: ConvTranspose2D(2, 3), (2, 4, 4)),
    (lambda: Conv1D(2, 3), (2, 6)), (lambda: MaxPool2D(2), (2, 4, 4)),
    (lambda: AvgPool2D(2), (2, 4, 4)), (GlobalAvgPool, (2, 4, 4)),
    (lambda: RNN(4), (5, 3)), (lambda: GRU(4, return_sequences=False), (5, 3)),
    (lambda: LSTM(4), (5, 3)), (lambda: MultiHeadAttention(2, causal=True), (5, 8)),
])
def test_backward_rejects_a_wrongly_shaped_dy(backend, make, shape):
    layer = make()
    y, ctx = _forward(layer, shape, backend, train=True)
    good = tuple(y.shape)
    for bad in ((1, *good[1:]), (*good[:-1], 1), good[1:]):
        with pytest.raises(ShapeError, match=rf"{type(layer).__name__} backward expected dy"):
            layer.backward(_rand(backend, bad), ctx)
    layer.backward(_rand(backend, good), ctx)  # the right shape still works


def test_embedding_backward_rejects_a_wrongly_shaped_dy(backend):
    emb = Embedding(5, 3)
    emb.build((4,), backend)
    ids = backend.from_host(np.array([[0, 1, 2, 3]] * 2), dtype=backend.xp.int64)
    y, ctx = emb.forward(ids)
    with pytest.raises(ShapeError, match="Embedding backward expected dy of shape"):
        emb.backward(_rand(backend, (1, 4, 3)), ctx)
    emb.backward(_rand(backend, (2, 4, 3)), ctx)


# ---------------------------------------------------------------------- 4: build shapes
@pytest.mark.parametrize("shape", [(0,), (-3,), (3.5,), ("3",), (True,), "abc", None, 0])
def test_build_rejects_malformed_shapes(shape):
    with pytest.raises(ShapeError, match="positive ints"):
        Dense(4).build(shape, "numpy")
    with pytest.raises(ShapeError, match="positive ints"):
        Network.chain([Dense(4)], input_shape=shape if shape is not None else "x")


def test_build_accepts_a_bare_int_and_integer_scalars():
    layer = Dense(4)
    assert layer.build(3, "numpy") == (4,)
    assert layer.input_shape == (3,)
    net = Network.chain([Dense(4)], input_shape=np.int64(3))
    assert net.input_shape == (3,)
    conv = Conv2D(2, 3)
    assert conv.build((np.int64(1), 5, 5), "numpy") == (2, 3, 3)


# ---------------------------------------------------------------------- 5-6: constructors
@pytest.mark.parametrize("make", [
    lambda v: Dense(v), lambda v: Dense(4, in_features=v), lambda v: Embedding(v, 4),
    lambda v: Embedding(5, v), lambda v: LSTM(v), lambda v: GRU(4, input_size=v),
    lambda v: SwiGLU(v), lambda v: MLPBlock(v), lambda v: MoE(v, 1, 4),
    lambda v: MoE(4, v, 4), lambda v: MoE(4, 1, v), lambda v: MoE(4, 1, 4, None, True, v),
    lambda v: MultiHeadAttention(v), lambda v: MultiHeadAttention(4, head_dim=v),
    lambda v: MultiHeadAttention(4, num_kv_heads=v), lambda v: Reshape((v, 2)),
    lambda v: Conv2D(8, 3, in_channels=v),
])
@pytest.mark.parametrize("value", [3.7, 4.0, "4", "abc", True, [4]])
def test_integer_arguments_reject_non_integers(make, value):
    with pytest.raises(ConfigError, match="must be an integer"):
        make(value)


@pytest.mark.parametrize("make", [
    lambda v: Dense(v), lambda v: Dense(4, in_features=v), lambda v: Embedding(v, 4),
    lambda v: LSTM(v), lambda v: LSTM(4, input_size=v), lambda v: SwiGLU(v),
    lambda v: MultiHeadAttention(v), lambda v: Conv2D(8, 3, in_channels=v),
    lambda v: ConvTranspose2D(8, 3, in_channels=v),
])
@pytest.mark.parametrize("value", [0, -2])
def test_sizes_must_be_positive(make, value):
    with pytest.raises(ConfigError, match="positive"):
        make(value)


def test_integer_scalars_are_accepted_as_python_ints():
    layer = Dense(np.int64(3), in_features=np.int32(2))
    assert type(layer.out_features) is int and type(layer.in_features) is int
    assert LSTM(np.int64(4)).hidden_size == 4


def test_conv_in_channels_must_divide_into_groups():
    with pytest.raises(ConfigError, match="in_channels=3 is not divisible by groups=2"):
        Conv2D(8, 3, groups=2, in_channels=3)
    Conv2D(8, 3, groups=2, in_channels=4)


@pytest.mark.parametrize("make", [lambda: Dropout("x"), lambda: Dropout(None),
                                  lambda: LayerNorm(eps="x"), lambda: RMSNorm(eps=None),
                                  lambda: Reshape(4), lambda: Reshape("ab")])
def test_bad_argument_types_raise_config_errors(make):
    with pytest.raises(ConfigError):
        make()


# ---------------------------------------------------------------------- 7: attention config
@pytest.mark.parametrize("kw, match", [
    (dict(qk_norm=True, qk_norm_eps=-1.0), "qk_norm_eps"),
    (dict(qk_norm=True, qk_norm_eps=0.0), "qk_norm_eps"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling needs RoPE"),
    (dict(rope_fraction=2.0), "rope_fraction"),
    (dict(rope_fraction=0.0, rope_theta=1e4), "rope_fraction"),
    (dict(rope_fraction=-0.5), "rope_fraction"),
    (dict(rope_theta="x"), "rope_theta"),
])
def test_attention_config_errors_at_construction(kw, match):
    with pytest.raises(ConfigError, match=match):
        MultiHeadAttention(4, **kw)


@pytest.mark.parametrize("batch, max_len", [(0, 4), (1, -4), (1, 0), (1.5, 4), (1, "4")])
def test_new_cache_rejects_bad_sizes(batch, max_len):
    mha = MultiHeadAttention(2)
    mha.build((5, 8), "numpy")
    with pytest.raises(ConfigError):
        mha.new_cache(batch, max_len)
    assert tuple(mha.new_cache(1, 4).k.shape) == (1, 2, 4, 4)


# ---------------------------------------------------------------------- 8-10
@pytest.mark.parametrize("make", [lambda: GRU(6), lambda: RNN(6)])
def test_single_state_layers_reject_a_tuple_state(backend, make):
    layer = make()
    layer.build((5, 3), backend)
    h = backend.zeros((2, 6))
    with pytest.raises(ShapeError, match="one array of shape"):
        layer.forward(_rand(backend, (2, 5, 3)), initial_state=(h, h))


def test_moe_routing_weights_checks_its_input(backend):
    moe = MoE(4, 2, 8)
    moe.build((6,), backend)
    with pytest.raises(ShapeError, match=r"MoE expected input \[B, \.\.\., 6\]"):
        moe.routing_weights(_rand(backend, (2, 5)))
    w = moe.routing_weights(_rand(backend, (3, 6)))
    assert tuple(w.shape) == (3, 4)


def test_activation_checks_like_dropout(backend):
    for make in (lambda: Activation("relu"), lambda: Dropout(0.5)):
        with pytest.raises(LoomxError, match="not built"):
            make()(_rand(backend, (2, 3)))
        layer = make()
        layer.build((3,), backend)
        with pytest.raises(ShapeError, match=r"expected input of shape \[B, 3\]"):
            layer(_rand(backend, (2, 7)))
        assert tuple(layer(_rand(backend, (2, 3))).shape) == (2, 3)
