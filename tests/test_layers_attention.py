"""MultiHeadAttention against a PyTorch reference, SDPA and finite differences, on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from loomx.errors import ConfigError, LoomxError, ShapeError
from loomx.layers import MultiHeadAttention, layer_from_config
from loomx.layers.rope import RopeCache, rope_tables, rotary_dims
from tests.conftest import assert_close
from tests.gradcheck import finite_difference_check

B, T, D = 2, 5, 8
TOL = dict(rtol=1e-4, atol=2e-5)
BIASES = dict(q_bias=True, k_bias=True, v_bias=True, o_bias=True)

CONFIGS = {
    "plain": dict(num_heads=2),
    "gqa2_biases_causal": dict(num_heads=4, num_kv_heads=2, causal=True, **BIASES),
    "mqa_head_dim5": dict(num_heads=4, num_kv_heads=1, head_dim=5, causal=True),
    "rope_half": dict(num_heads=2, rope_theta=10000.0, causal=True),
    "rope_interleaved": dict(num_heads=2, rope_theta=500.0, rope_style="interleaved"),
    "rope_partial_half": dict(num_heads=2, head_dim=8, rope_theta=10000.0, rope_fraction=0.5,
                              causal=True),
    "rope_partial_interleaved": dict(num_heads=2, head_dim=6, rope_theta=100.0,
                                     rope_fraction=2 / 3, rope_style="interleaved"),
    "qk_norm_gqa_rope": dict(num_heads=4, num_kv_heads=2, qk_norm=True, qk_norm_eps=1e-5,
                             rope_theta=1e6, causal=True, k_bias=True),
}


def _build(cfg, backend, seed=0, name="attn"):
    """A built layer with random parameters (biases and norms away from 0/1)."""
    layer = MultiHeadAttention(**cfg, name=name)
    layer.build((T, D), backend, rng=seed)
    rng = np.random.default_rng(seed + 100)
    for k, v in list(layer.params.items()):
        host = rng.standard_normal(tuple(v.shape)) * 0.5
        if k.endswith("_norm"):
            host += 1.0
        layer.params[k] = backend.from_host(host)
    layer.zero_grad()
    return layer


def _rope_ref(z, offset, rot, theta, style):
    """Hugging Face rotate-half / Meta complex-pair RoPE on the first ``rot`` dims."""
    t = z.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    ang = torch.arange(offset, offset + t, dtype=torch.float64)[:, None] * inv[None]
    zr, zp = z[..., :rot], z[..., rot:]
    if style == "half":
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        x1, x2 = zr[..., :rot // 2], zr[..., rot // 2:]
        out = zr * cos + torch.cat([-x2, x1], -1) * sin
    else:
        zc = torch.view_as_complex(zr.reshape(*zr.shape[:-1], rot // 2, 2).contiguous())
        out = torch.view_as_real(zc * torch.polar(torch.ones_like(ang), ang)).flatten(-2)
    return torch.cat([out, zp], -1)


def reference_mha(layer, p, x, key_padding_mask=None):
    """Explicit PyTorch attention: projections, qk-norm, RoPE, repeat_interleave GQA, masks."""
    h, kv, hd = layer.num_heads, layer.kv_heads, layer.head_dim
    b, t, _ = x.shape

    def proj(name, heads):
        y = x @ p[f"{name}_weight"].T
        if f"{name}_bias" in p:
            y = y + p[f"{name}_bias"]
        return y.view(b, t, heads, hd).transpose(1, 2)

    q, k, v = proj("q", h), proj("k", kv), proj("v", kv)
    if layer.qk_norm:
        eps = layer.qk_norm_eps
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * p["q_norm"]
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * p["k_norm"]
    if layer.rope_theta is not None:
        rot = int(layer.rope_fraction * hd)
        q = _rope_ref(q, 0, rot, layer.rope_theta, layer.rope_style)
        k = _rope_ref(k, 0, rot, layer.rope_theta, layer.rope_style)
    k = k.repeat_interleave(h // kv, dim=1)
    v = v.repeat_interleave(h // kv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if layer.causal:
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    if key_padding_mask is not None:
        s = s.masked_fill(torch.tensor(key_padding_mask)[:, None, None, :], float("-inf"))
    a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * hd)
    y = a @ p["o_weight"].T
    return y + p["o_bias"] if "o_bias" in p else y


def _torch_params(layer):
    b = layer.backend
    return {k: torch.tensor(b.to_host(v).astype(np.float64), requires_grad=True)
            for k, v in layer.params.items()}


def _check_against_reference(layer, backend, x, dy, mask=None):
    p = _torch_params(layer)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = reference_mha(layer, p, xt, mask)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    mask_d = None if mask is None else backend.from_host(mask)
    layer.zero_grad()
    y, ctx = layer.forward(backend.from_host(x), key_padding_mask=mask_d)
    dx = layer.backward(backend.from_host(dy), ctx)
    assert_close(y, yt, backend, **TOL)
    assert_close(dx, xt.grad, backend, **TOL)
    assert set(layer.grads) == set(p)
    for k, v in p.items():
        assert_close(layer.grads[k], v.grad, backend, **TOL)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mha_matches_torch_reference(backend, name):
    layer = _build(CONFIGS[name], backend)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    dy = rng.standard_normal((B, T, D)).astype(np.float32)
    _check_against_reference(layer, backend, x, dy)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_drawn_configurations_match_reference(backend64, data):
    """Heads, KV heads, head_dim, biases, RoPE layout/fraction, qk-norm, masks: all drawn."""
    kv = data.draw(st.sampled_from([1, 2]), "num_kv_heads")
    hd = data.draw(st.sampled_from([2, 4, 6]), "head_dim")
    cfg = dict(num_heads=kv * data.draw(st.integers(1, 3), "group"), num_kv_heads=kv,
               head_dim=hd, causal=data.draw(st.booleans(), "causal"),
               qk_norm=data.draw(st.booleans(), "qk_norm"),
               **{f"{p}_bias": data.draw(st.booleans(), f"{p}_bias") for p in "qkvo"})
    if data.draw(st.booleans(), "rope"):
        rot = data.draw(st.sampled_from(range(2, hd + 1, 2)), "rotary dims")
        cfg.update(rope_theta=data.draw(st.sampled_from([10.0, 1e4, 1e6]), "theta"),
                   rope_style=data.draw(st.sampled_from(["half", "interleaved"]), "style"),
                   rope_fraction=rot / hd)
        assume(rotary_dims(hd, rot / hd) == rot)
    t = data.draw(st.integers(1, 4), "T")
    layer = MultiHeadAttention(**cfg)
    layer.build((t, D), backend64, rng=data.draw(st.integers(0, 99), "seed"))
    rng = np.random.default_rng(0)
    for k, v in list(layer.params.items()):
        layer.params[k] = backend64.from_host(rng.standard_normal(tuple(v.shape)) * 0.5 + 0.2)
    x, dy = rng.standard_normal((2, t, D)), rng.standard_normal((2, t, D))
    mask = None
    if data.draw(st.booleans(), "padding") and t > 1:
        mask = np.zeros((2, t), bool)
        mask[1, t - 1] = True
    p = _torch_params(layer)
    xt = torch.tensor(x, requires_grad=True)
    yt = reference_mha(layer, p, xt, mask)
    yt.backward(torch.tensor(dy))
    layer.zero_grad()
    y, ctx = layer.forward(backend64.from_host(x),
                           key_padding_mask=None if mask is None else backend64.from_host(mask))
    dx = layer.backward(backend64.from_host(dy), ctx)
    tight = dict(rtol=1e-9, atol=1e-11)
    assert_close(y, yt, backend64, **tight)
    assert_close(dx, xt.grad, backend64, **tight)
    for k, v in p.items():
        assert_close(layer.grads[k], v.grad, backend64, **tight)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_mask_matches_reference(backend, causal):
    layer = _build(dict(num_heads=4, num_kv_heads=2, causal=causal, rope_theta=1e4), backend)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    dy = rng.standard_normal((B, T, D)).astype(np.float32)
    mask = np.zeros((B, T), bool)
    mask[1, 3:] = True  # the second sequence has two padding positions at the end
    _check_against_reference(layer, backend, x, dy, mask)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_plain_mha_matches_scaled_dot_product_attention(backend, causal):
    layer = _build(dict(num_heads=2, causal=causal, **BIASES), backend)
    p = _torch_params(layer)
    x = np.random.default_rng(3).standard_normal((B, T, D)).astype(np.float32)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)

    def heads(name):
        return (xt @ p[f"{name}_weight"].T + p[f"{name}_bias"]).view(B, T, 2, 4).transpose(1, 2)

    a = F.scaled_dot_product_attention(heads("q"), heads("k"), heads("v"), is_causal=causal)
    yt = a.transpose(1, 2).reshape(B, T, D) @ p["o_weight"].T + p["o_bias"]
    yt.pow(2).sum().backward()
    y, ctx = layer.forward(backend.from_host(x))
    dx = layer.backward(2.0 * y, ctx)
    assert_close(y, yt, backend, **TOL)
    assert_close(dx, xt.grad, backend, **TOL)
    for k, v in p.items():  # k_bias: exactly 0 (softmax is shift-invariant), float32 noise
        assert_close(layer.grads[k], v.grad, backend, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mha_finite_differences(numpy64, name):
    layer = _build(CONFIGS[name], numpy64)
    x = np.random.default_rng(4).standard_normal((2, 4, D))
    finite_difference_check(layer, x, max_entries=12)


def test_finite_differences_with_padding_mask(numpy64):
    layer = _build(dict(num_heads=2, causal=True, rope_theta=100.0), numpy64)
    mask = numpy64.from_host(np.array([[False] * 4, [False, False, True, True]]))
    x = np.random.default_rng(5).standard_normal((2, 4, D))

    class Masked:
        """The layer with a fixed padding mask, seen through the plain forward signature."""

        backend = layer.backend

        def forward(self, xx, train=False):
            return layer.forward(xx, train, key_padding_mask=mask)

        def __getattr__(self, item):
            return getattr(layer, item)

    finite_difference_check(Masked(), x, max_entries=12)


@pytest.mark.parametrize("name", ["plain", "gqa2_biases_causal", "mqa_head_dim5",
                                  "rope_partial_interleaved", "qk_norm_gqa_rope"])
def test_kv_cache_decoding_equals_full_causal_forward(backend, name):
    cfg = dict(CONFIGS[name], causal=True)
    layer = _build(cfg, backend)
    steps = 7
    x = np.random.default_rng(6).standard_normal((B, steps, D)).astype(np.float32)
    full = layer(backend.from_host(x))
    cache = layer.new_cache(B, max_len=16)
    assert tuple(cache.k.shape) == (B, layer.kv_heads, 16, layer.head_dim)
    parts = [layer(backend.from_host(x[:, :3]), cache=cache)]  # the prompt, then one at a time
    for s in range(3, steps):
        parts.append(layer(backend.from_host(x[:, s:s + 1]), cache=cache))
    assert cache.length == steps
    decoded = np.concatenate([backend.to_host(y) for y in parts], axis=1)
    assert_close(full, decoded, backend, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rope_cache_slices_equal_fresh_tables(backend, dtype):
    xp = backend.xp
    dt = getattr(xp, dtype)
    cache = RopeCache()
    # a prompt, decoding steps past it (the table grows), then a shorter range again
    for start, length in [(0, 5), (5, 1), (6, 1), (7, 9), (3, 4), (0, 40)]:
        cos, sin = cache.tables(backend, dt, start, length, 6, 500.0)
        ref_cos, ref_sin = rope_tables(backend, dt, start, length, 6, 500.0)
        for got, want in ((cos, ref_cos), (sin, ref_sin)):
            assert_close(got, want, backend, rtol=0, atol=0, dtype=dt)
            assert tuple(got.shape) == (length, 3)
    first = cache.tables(backend, dt, 2, 3, 6, 500.0)[0]
    other = cache.tables(backend, dt, 2, 3, 6, 10.0)[0]  # another theta: its own table
    assert not np.array_equal(backend.to_host(first), backend.to_host(other))


def test_rope_tables_are_computed_once_per_length(backend, monkeypatch):
    from loomx.layers import rope

    calls = []

    def counting(*args):
        calls.append(args[2:4])
        return rope_tables(*args)

    monkeypatch.setattr(rope, "rope_tables", counting)
    layer = _build(dict(num_heads=2, rope_theta=1e4, causal=True), backend)
    x = backend.from_host(np.random.default_rng(8).standard_normal((B, T, D)).astype(np.float32))
    y1, y2 = layer(x), layer(x)
    assert calls == [(0, T)]
    assert_close(y1, backend.to_host(y2), backend, rtol=0, atol=0)
    cache = layer.new_cache(B, max_len=T + 3)
    layer(x, cache=cache)
    for _ in range(3):  # decoding steps: one growth to 2T covers them all
        layer(x[:, :1, :], cache=cache)
    assert calls == [(0, T), (0, 2 * T)]


def test_kv_cache_errors(backend):
    layer = _build(dict(num_heads=2, causal=True, rope_theta=1e4), backend, name="dec")
    cache = layer.new_cache(1, max_len=4)
    _, ctx = layer.forward(backend.zeros((1, 3, D)), cache=cache)
    with pytest.raises(LoomxError, match="KV cache.*cache=None"):
        layer.backward(backend.zeros((1, 3, D)), ctx)
    with pytest.raises(LoomxError, match="overflow.*max_len=4"):
        layer.forward(backend.zeros((1, 2, D)), cache=cache)
    with pytest.raises(ShapeError, match=r"'dec'.*KV cache"):
        layer.forward(backend.zeros((2, 1, D)), cache=cache)
    cache.reset()
    assert cache.length == 0


def test_attention_backward_is_exact_unlike_loom(backend):
    """Loom's MHA backward (nn/attention.go:459-536) is a heuristic; loomx matches autograd."""
    layer = _build(dict(num_heads=2, causal=True, **BIASES), backend)
    p = _torch_params(layer)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, T, D)).astype(np.float32)
    g = rng.standard_normal((1, T, D)).astype(np.float32)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    reference_mha(layer, p, xt).backward(torch.tensor(g, dtype=torch.float64))
    _, ctx = layer.forward(backend.from_host(x))
    dx = layer.backward(backend.from_host(g), ctx)
    assert_close(dx, xt.grad, backend, **TOL)
    assert_close(layer.grads["o_weight"], p["o_weight"].grad, backend, **TOL)

    w = {k: v.detach().numpy() for k, v in p.items()}
    x2, g2 = x[0].astype(np.float64), g[0].astype(np.float64)
    gc = g2 @ w["o_weight"]
    loom_dx = gc @ w["q_weight"] + 0.1 * gc @ (w["k_weight"] + w["v_weight"])
    loom_dwo = g2.T @ x2  # uses the layer input instead of the attention output
    true_dx, true_dwo = xt.grad.numpy()[0], p["o_weight"].grad.numpy()
    assert np.linalg.norm(loom_dx - true_dx) > 0.2 * np.linalg.norm(true_dx)
    assert np.linalg.norm(loom_dwo - true_dwo) > 0.2 * np.linalg.norm(true_dwo)


def test_parameter_layouts_and_head_dim(numpy64):
    layer = MultiHeadAttention(num_heads=4, num_kv_heads=1, head_dim=5, qk_norm=True,
                               q_bias=True, o_bias=True)
    assert layer.build((T, D), numpy64) == (T, D)
    assert {k: tuple(v.shape) for k, v in layer.params.items()} == {
        "q_weight": (20, 8), "k_weight": (5, 8), "v_weight": (5, 8), "o_weight": (8, 20),
        "q_bias": (20,), "o_bias": (8,), "q_norm": (5,), "k_norm": (5,)}
    plain = MultiHeadAttention(num_heads=2)
    plain.build((T, D), numpy64)
    assert plain.head_dim == 4 and set(plain.params) == {"q_weight", "k_weight", "v_weight",
                                                         "o_weight"}


def test_float64_and_device_preserved(backend64):
    """float64 in, float64 out on the same device, equal to the float64 reference to 1e-10."""
    layer = _build(dict(num_heads=2, num_kv_heads=1, rope_theta=1e4, causal=True, qk_norm=True),
                   backend64)
    rng = np.random.default_rng(8)
    x, dy = rng.standard_normal((B, T, D)), rng.standard_normal((B, T, D))
    p = _torch_params(layer)
    xt = torch.tensor(x, requires_grad=True)
    reference_mha(layer, p, xt).backward(torch.tensor(dy))
    y, ctx = layer.forward(backend64.from_host(x))
    dx = layer.backward(backend64.from_host(dy), ctx)
    tight = dict(rtol=1e-10, atol=1e-12)
    assert_close(y, reference_mha(layer, p, torch.tensor(x)), backend64, **tight)
    assert_close(dx, xt.grad, backend64, **tight)
    for k, v in p.items():
        assert_close(layer.grads[k], v.grad, backend64, **tight)


def test_config_round_trip():
    layer = MultiHeadAttention(num_heads=4, head_dim=8, num_kv_heads=2, d_model=8, q_bias=True,
                               causal=True, rope_theta=5e5, rope_style="interleaved",
                               rope_fraction=0.5, qk_norm=True, qk_norm_eps=1e-5, name="a")
    cfg = layer.get_config()
    assert cfg["type"] == "mha"
    assert layer_from_config(cfg).get_config() == cfg


def test_bad_inputs_and_configs_raise(backend):
    layer = MultiHeadAttention(num_heads=2, name="self_attn")
    layer.build((T, D), backend)
    with pytest.raises(ShapeError, match=r"'self_attn'.*\[B, T, 8\].*\[2, 5, 6\]"):
        layer.forward(backend.zeros((2, 5, 6)))
    with pytest.raises(ShapeError, match=r"'self_attn'.*\[2, 5\].*bool.*\[2, 4\]"):
        layer.forward(backend.zeros((2, 5, D)),
                      key_padding_mask=backend.from_host(np.zeros((2, 4), bool)))
    with pytest.raises(ConfigError, match="num_kv_heads=3.*num_heads=4"):
        MultiHeadAttention(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="rope_style"):
        MultiHeadAttention(num_heads=2, rope_style="complex")
    with pytest.raises(ConfigError, match="rope_fraction"):
        MultiHeadAttention(num_heads=2, head_dim=6, rope_theta=1e4, rope_fraction=0.5)
    with pytest.raises(ConfigError, match="not divisible by num_heads=3"):
        MultiHeadAttention(num_heads=3).build((T, D), backend)


SCALINGS = {
    "linear": {"type": "linear", "factor": 4.0},
    "llama3": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


def test_rope_scaling_none_is_bit_identical_to_plain_rope(backend):
    xp = backend.xp
    cos, sin = rope_tables(backend, xp.float32, 3, 11, 6, 500.0, None)
    i = xp.arange(0, 6, 2, dtype=xp.float32, device=backend.device)
    ang = xp.arange(3, 14, dtype=xp.float32, device=backend.device)[:, None] * xp.exp(
        i * (-math.log(500.0) / 6))[None, :]
    assert_close(cos, backend.to_host(xp.cos(ang)), backend, rtol=0, atol=0)
    assert_close(sin, backend.to_host(xp.sin(ang)), backend, rtol=0, atol=0)
    x = backend.from_host(np.random.default_rng(9).standard_normal((B, T, D)).astype(np.float32))
    plain = _build(dict(num_heads=2, rope_theta=1e4, causal=True), backend)
    explicit = _build(dict(num_heads=2, rope_theta=1e4, causal=True, rope_scaling=None), backend)
    assert explicit.get_config() == plain.get_config()
    assert_close(explicit(x), backend.to_host(plain(x)), backend, rtol=0, atol=0)


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_rope_scaling_frequencies_match_transformers(backend64, kind):
    """Tables equal cos/sin of positions x transformers' inverse frequencies (x yarn's factor)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {k: v for k, v in SCALINGS[kind].items() if k != "type"}
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=2, head_dim=16,
                      max_position_embeddings=128,
                      rope_parameters={"rope_type": kind, "rope_theta": 1e4, **params})
    inv, factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    ang = np.arange(40, 60)[:, None] * inv.double().numpy()[None, :]
    cos, sin = rope_tables(backend64, backend64.xp.float64, 40, 20, 16, 1e4, SCALINGS[kind])
    assert tuple(cos.shape) == (20, 8)
    assert_close(cos, factor * np.cos(ang), backend64, rtol=0, atol=2e-5)
    assert_close(sin, factor * np.sin(ang), backend64, rtol=0, atol=2e-5)
    plain, _ = rope_tables(backend64, backend64.xp.float64, 40, 20, 16, 1e4)
    assert np.abs(backend64.to_host(cos) - backend64.to_host(plain)).max() > 0.1


@pytest.mark.parametrize("kind", ["llama3", "yarn"])
def test_rope_scaling_finite_differences_and_kv_cache(numpy64, kind):
    layer = _build(dict(num_heads=2, rope_theta=100.0, causal=True,
                        rope_scaling=dict(SCALINGS[kind], original_max_position_embeddings=4)),
                   numpy64)
    x = np.random.default_rng(10).standard_normal((2, 6, D))
    finite_difference_check(layer, x, max_entries=12)
    full = layer(numpy64.from_host(x))
    cache = layer.new_cache(2, max_len=8)
    parts = [layer(numpy64.from_host(x[:, :2]), cache=cache)]
    parts += [layer(numpy64.from_host(x[:, s:s + 1]), cache=cache) for s in range(2, 6)]
    decoded = np.concatenate([numpy64.to_host(y) for y in parts], axis=1)
    assert_close(full, decoded, numpy64, rtol=1e-12, atol=1e-12)


def test_rope_scaling_config_round_trip_and_errors():
    layer = MultiHeadAttention(num_heads=2, rope_theta=5e5, causal=True, name="a",
                               rope_scaling={"rope_type": "llama3", "factor": 8,
                                             "low_freq_factor": 1, "high_freq_factor": 4,
                                             "original_max_position_embeddings": 8192})
    cfg = layer.get_config()
    assert cfg["rope_scaling"] == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}
    import json

    assert layer_from_config(json.loads(json.dumps(cfg))).get_config() == cfg
    yarn = MultiHeadAttention(num_heads=2, rope_theta=1e4, rope_scaling=SCALINGS["yarn"])
    assert yarn.rope_scaling["beta_fast"] == 32.0 and yarn.rope_scaling["truncate"] is True
    with pytest.raises(ConfigError, match="type must be one of.*'dynamic'"):
        MultiHeadAttention(num_heads=2, rope_theta=1e4,
                           rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="missing.*low_freq_factor"):
        MultiHeadAttention(num_heads=2, rope_theta=1e4,
                           rope_scaling={"type": "llama3", "factor": 8.0})
    with pytest.raises(ConfigError, match="factor must be positive"):
        MultiHeadAttention(num_heads=2, rope_theta=1e4, rope_scaling={"type": "linear",
                                                                      "factor": 0})


def test_causal_mask_is_kept_per_shape_offset_setting_and_backend(backend):
    layer = _build(dict(num_heads=4, causal=True), backend)
    first = layer._mask_bias(B, T, T, 0, None)
    assert layer._mask_bias(B, T, T, 0, None) is first  # the same call again: kept
    other = layer._mask_bias(B, T - 1, T, 1, None)  # another shape and offset: rebuilt
    assert other is not first and tuple(other.shape) == (1, 1, T - 1, T)
    layer.causal = False  # a changed setting never sees the old mask
    assert layer._mask_bias(B, T - 1, T, 1, None) is None
    layer.causal = True
    fresh = layer._mask_bias(B, T - 1, T, 1, None)
    assert_close(fresh, backend.to_host(other), backend, rtol=0, atol=0)
    layer.backend = backend.without_kernels()  # another backend object: rebuilt for it
    assert layer._mask_bias(B, T - 1, T, 1, None) is not fresh
