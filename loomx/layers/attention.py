"""Multi-head scaled-dot-product attention with GQA/MQA, RoPE, qk-norm and a KV cache.

Shapes: ``x [B, T, D]`` → ``y [B, T, D]``. ``T`` may change between calls (decoding feeds one
token at a time), only ``D`` is fixed by ``build``.

Forward, with ``H`` query heads, ``KV`` key/value heads (``H % KV == 0``, ``G = H / KV``) and
head size ``hd``::

    q = x W_qᵀ (+ b_q) → [B, H, T, hd];   k, v = x W_kᵀ, x W_vᵀ (+ b) → [B, KV, T, hd]
    q, k = rms_norm(q)·q_norm, rms_norm(k)·k_norm        (qk_norm=True, per head over hd)
    q, k = rope(q, p), rope(k, p)                         (rope_theta set; p absolute positions)
    s    = q kᵀ / sqrt(hd) + mask                         (query head h reads KV head h // G)
    a    = softmax(s) v  → [B, T, H·hd];   y = a W_oᵀ (+ b_o)

The masks (causal, key padding) are additive large negative values built with ``xp.where``.
GQA is computed without copying keys: the ``G`` query heads that share a KV head are stacked
along the query axis, so one batched product serves them all and the backward pass sums their
key/value gradients by construction.
"""

from __future__ import annotations

import math
from typing import Any

from ..backends import RandomSource
from ..errors import ConfigError, LoomxError, ShapeError
from .base import Array, Layer, Shape, config_float, config_int, register_layer
from .dense import backend_linear, linear_backward, sum_rows
from .init import init_weight
from .norm import rms_input_grad, rms_inverse
from .rope import ROPE_STYLES, RopeCache, apply_rope, check_rope_scaling, rotary_dims
from .softmax import softmax_vjp_with, softmax_with

#: the largest causal mask (query × key positions) a layer keeps for its next call
_CAUSAL_CACHE_ITEMS = 1 << 20


class KVCache:
    """Keys and values of earlier positions, for incremental decoding.

    Storage is preallocated: ``k``, ``v`` are ``[B, KV, max_len, hd]`` and ``length`` (a host
    int) counts the filled positions, which is also the RoPE position of the next token.
    Create it with :meth:`MultiHeadAttention.new_cache`; one cache per layer.
    """

    def __init__(self, k: Array, v: Array):
        self.k, self.v = k, v
        self.length = 0

    @property
    def batch(self) -> int:
        return int(self.k.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.k.shape[2])

    def reset(self) -> None:
        """Forget every cached position (the storage is reused)."""
        self.length = 0

    def append(self, k: Array, v: Array) -> tuple[Array, Array]:
        """Write ``k, v [B, KV, T, hd]`` at ``length``; return all keys/values so far."""
        t = int(k.shape[2])
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise LoomxError(f"KV cache overflow: {self.length} cached + {t} new positions "
                             f"exceed max_len={self.max_len}; create a larger cache with "
                             "new_cache(batch, max_len)")
        self.k[:, :, start:end, :] = k
        self.v[:, :, start:end, :] = v
        self.length = end
        return self.k[:, :, :end, :], self.v[:, :, :end, :]


class AttentionContext:
    """Saved forward values for :meth:`MultiHeadAttention.backward`.

    ``qg`` holds the (normed, rotated) queries grouped per KV head, ``[B, KV, G·T, hd]``,
    already multiplied by ``1/sqrt(hd)``; ``p`` the attention weights ``[B, H, T, Tk]``.
    """

    __slots__ = ("x2", "shape", "q_raw", "k_raw", "q_r", "k_r", "qg", "k", "v", "p", "merged",
                 "cos", "sin", "cached")

    def __init__(self, **kw):
        for name in self.__slots__:
            setattr(self, name, kw.get(name))


@register_layer
class MultiHeadAttention(Layer):
    """Multi-head attention (see the module docstring for the formulas).

    Parameters (PyTorch layout ``[out, in]``): ``q_weight [H·hd, D]``, ``k_weight [KV·hd, D]``,
    ``v_weight [KV·hd, D]``, ``o_weight [D, H·hd]``; optional ``q_bias [H·hd]``,
    ``k_bias [KV·hd]``, ``v_bias [KV·hd]``, ``o_bias [D]``; ``q_norm [hd]``, ``k_norm [hd]`` with
    ``qk_norm``. Initialisation: Xavier uniform projections, zero biases, unit norms.

    Args:
        num_heads: H, the number of query heads.
        head_dim: hd; ``d_model / num_heads`` when ``None`` (then it must divide).
        num_kv_heads: KV (GQA; 1 = MQA); ``num_heads`` when ``None``.
        d_model: D; inferred from the input shape at build when ``None``.
        q_bias, k_bias, v_bias, o_bias: learn a bias for that projection.
        causal: position i attends only to positions ≤ i.
        rope_theta: RoPE base (e.g. 10000.0); ``None`` disables RoPE.
        rope_style: ``"half"`` (rotate-half, Hugging Face) or ``"interleaved"`` (pairs 2i, 2i+1).
        rope_fraction: rotate only the first ``int(rope_fraction·hd)`` dims of each head.
        rope_scaling: ``None`` (plain RoPE) or a frequency scaling for long context, e.g.
            ``{"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}``; types
            ``"linear"``, ``"llama3"`` and ``"yarn"`` (see :mod:`loomx.layers.rope`).
        qk_norm: per-head RMSNorm of q and k (after projection, before RoPE).
        qk_norm_eps: ε of that RMSNorm.
    """

    type_name = "mha"
    aliases = ("attention", "multi_head_attention")
    config_fields = ("num_heads", "head_dim", "num_kv_heads", "d_model", "q_bias", "k_bias",
                     "v_bias", "o_bias", "causal", "rope_theta", "rope_style", "rope_fraction",
                     "rope_scaling", "qk_norm", "qk_norm_eps")

    def __init__(self, num_heads: int, head_dim: int | None = None,
                 num_kv_heads: int | None = None, d_model: int | None = None,
                 q_bias: bool = False, k_bias: bool = False, v_bias: bool = False,
                 o_bias: bool = False, causal: bool = False, rope_theta: float | None = None,
                 rope_style: str = "half", rope_fraction: float = 1.0, qk_norm: bool = False,
                 qk_norm_eps: float = 1e-6, rope_scaling: dict | None = None, **kw):
        super().__init__(**kw)
        owner = type(self).__name__
        self.num_heads = config_int(num_heads, "num_heads", owner)
        self.head_dim = config_int(head_dim, "head_dim", owner, optional=True)
        self.num_kv_heads = config_int(num_kv_heads, "num_kv_heads", owner, optional=True)
        self.d_model = config_int(d_model, "d_model", owner, optional=True)
        self.q_bias, self.k_bias = bool(q_bias), bool(k_bias)
        self.v_bias, self.o_bias = bool(v_bias), bool(o_bias)
        self.causal = bool(causal)
        self.rope_theta = (None if rope_theta is None
                           else config_float(rope_theta, "rope_theta", owner))
        self.rope_style = rope_style
        self.rope_fraction = config_float(rope_fraction, "rope_fraction", owner)
        self.rope_scaling = check_rope_scaling(rope_scaling, f"{type(self).__name__} rope_scaling")
        self.qk_norm = bool(qk_norm)
        self.qk_norm_eps = config_float(qk_norm_eps, "qk_norm_eps", owner)
        self._rope = RopeCache()
        # the last causal mask: (key, backend, mask), for masks of up to _CAUSAL_CACHE_ITEMS
        self._causal: tuple[tuple, Any, Array] | None = None
        self._validate()

    def _validate(self) -> None:
        name = type(self).__name__
        if self.num_heads <= 0:
            raise ConfigError(f"{name} num_heads must be positive, got {self.num_heads}")
        kv = self.kv_heads
        if kv <= 0 or self.num_heads % kv:
            raise ConfigError(f"{name} num_kv_heads={kv} must be positive and divide "
                              f"num_heads={self.num_heads}")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"{name} head_dim must be positive, got {self.head_dim}")
        if self.rope_style not in ROPE_STYLES:
            raise ConfigError(f"{name} rope_style must be one of {ROPE_STYLES}, "
                              f"got {self.rope_style!r}")
        if self.rope_theta is not None and self.rope_theta <= 0:
            raise ConfigError(f"{name} rope_theta must be positive (or None for no RoPE), "
                              f"got {self.rope_theta}")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ConfigError(f"{name} rope_fraction must be in (0, 1], got {self.rope_fraction}")
        if self.rope_scaling is not None and self.rope_theta is None:
            raise ConfigError(f"{name} rope_scaling needs RoPE: set rope_theta (e.g. 10000.0) "
                              "or drop rope_scaling")
        if not self.qk_norm_eps > 0.0:
            raise ConfigError(f"{name} qk_norm_eps must be positive, got {self.qk_norm_eps}")
        if self.head_dim is not None and self.rope_theta is not None:
            rotary_dims(self.head_dim, self.rope_fraction)

    @property
    def kv_heads(self) -> int:
        """KV, the number of key/value heads."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    # ------------------------------------------------------------------ build
    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        if len(input_shape) != 2:
            raise ShapeError(f"{self.describe()} expects per-sample input [T, D] but the input "
                             f"shape is {list(input_shape)}")
        d = input_shape[-1]
        if self.d_model is None:
            self.d_model = d
        elif self.d_model != d:
            raise ShapeError(f"{self.describe()} expected d_model={self.d_model} input features "
                             f"but the input shape is {list(input_shape)}")
        if self.head_dim is None:
            if d % self.num_heads:
                raise ConfigError(f"{self.describe()}: d_model={d} is not divisible by "
                                  f"num_heads={self.num_heads}; set head_dim explicitly")
            self.head_dim = d // self.num_heads
        self._validate()
        h, kv, hd, dt = self.num_heads, self.kv_heads, self.head_dim, self.float_dtype
        shapes = {"q": (h * hd, d), "k": (kv * hd, d), "v": (kv * hd, d), "o": (d, h * hd)}
        for p, shape in shapes.items():
            self.params[f"{p}_weight"] = init_weight(rng, "xavier_uniform", shape, shape[1],
                                                     shape[0], dt)
        for p, shape in shapes.items():
            if getattr(self, f"{p}_bias"):
                self.params[f"{p}_bias"] = self.backend.zeros((shape[0],), dtype=dt)
        if self.qk_norm:
            self.params["q_norm"] = self.backend.ones((hd,), dtype=dt)
            self.params["k_norm"] = self.backend.ones((hd,), dtype=dt)
        return input_shape

    @property
    def rotary(self) -> int:
        """Number of rotated dims per head (0 without RoPE)."""
        if self.rope_theta is None:
            return 0
        return rotary_dims(self.head_dim, self.rope_fraction)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` positions."""
        if not self.built:
            raise self._not_built()
        owner = f"{self.describe()} new_cache"
        shape = (config_int(batch, "batch", owner), self.kv_heads,
                 config_int(max_len, "max_len", owner), self.head_dim)
        return KVCache(self.backend.zeros(shape, dtype=self.float_dtype),
                       self.backend.zeros(shape, dtype=self.float_dtype))

    # ------------------------------------------------------------------ checks
    def check_input(self, x: Array) -> None:
        self.check_sequence(x, self.d_model)

    # ------------------------------------------------------------------ pieces
    def _split_heads(self, y: Array, b: int, t: int, heads: int) -> Array:
        """``y [B·T, heads·hd]`` → ``[B, heads, T, hd]``."""
        xp = self.xp
        return xp.permute_dims(xp.reshape(y, (b, t, heads, self.head_dim)), (0, 2, 1, 3))

    def _project(self, x2: Array, p: str, heads: int, b: int, t: int) -> Array:
        """``x2 [B·T, D]`` → ``[B, heads, T, hd]``."""
        y = backend_linear(self.backend, x2, self.params[f"{p}_weight"],
                           self.params.get(f"{p}_bias"))
        return self._split_heads(y, b, t, heads)

    def _project_back(self, g: Array, p: str, x2: Array,
                      need_input_grad: bool = True) -> Array | None:
        """Gradient of ``[B, heads, T, hd]`` → weight/bias grads; returns its ``dx2 [B·T, D]``
        (``None`` when ``need_input_grad`` is ``False``)."""
        xp = self.xp
        b, heads, t, hd = g.shape
        g2 = xp.reshape(xp.permute_dims(g, (0, 2, 1, 3)), (b * t, heads * hd))
        return linear_backward(self, x2, g2, f"{p}_weight", self._bias_key(p), need_input_grad)

    def _bias_key(self, p: str) -> str | None:
        """``"{p}_bias"`` when projection ``p`` (q, k, v, o) has a bias, else ``None``."""
        return f"{p}_bias" if getattr(self, f"{p}_bias") else None

    def _rms(self, z: Array, key: str) -> tuple[Array, Array]:
        """Per-head RMSNorm over ``hd``: returns ``(z·r·w, r)`` with ``r = 1/sqrt(mean z² + ε)``."""
        r = rms_inverse(self.xp, z, self.qk_norm_eps)
        return z * r * self.params[key], r

    def _rms_back(self, g: Array, z: Array, r: Array, key: str) -> Array:
        """Backward of :meth:`_rms`: adds the ``key`` gradient, returns the gradient of ``z``."""
        xp = self.xp
        self._accumulate(key, sum_rows(self.backend, xp.reshape(g * z * r, (-1, z.shape[-1]))))
        return rms_input_grad(xp, z, r, g * self.params[key])

    def _mask_bias(self, b: int, t: int, tk: int, offset: int,
                   key_padding_mask: Array | None) -> Array | None:
        """Additive mask ``[B or 1, 1, T or 1, Tk]`` (0 or a large negative), or ``None``.

        A causal mask alone is kept for the next call of the same shape and offset (training
        steps and equal-length prompts rebuild the same one: five array calls each, which
        count on a GPU, where the host issuing them is the bottleneck)."""
        xp, dev = self.xp, self.backend.device
        key = (self.causal, t, tk, offset, str(self.float_dtype))
        cached = self._causal  # read once: another thread may replace it
        if (key_padding_mask is None and cached is not None and cached[0] == key
                and cached[1] is self.backend):
            return cached[2]
        masked = None
        if self.causal and not (t == 1 and offset + 1 == tk):
            qpos = xp.arange(offset, offset + t, dtype=xp.int64, device=dev)
            kpos = xp.arange(0, tk, dtype=xp.int64, device=dev)
            masked = (kpos[None, :] > qpos[:, None])[None, None, ...]
        if key_padding_mask is not None:
            m = key_padding_mask
            if tuple(m.shape) != (b, tk) or m.dtype != xp.bool:
                raise ShapeError(f"{self.describe()} expected key_padding_mask of shape [{b}, "
                                 f"{tk}] and dtype bool (True = padding) but received "
                                 f"{list(m.shape)} of {m.dtype}")
            pad = m[:, None, None, :]
            masked = pad if masked is None else xp.logical_or(masked, pad)
        if masked is None:
            return None
        dt = self.float_dtype
        neg = self.backend.full((), -0.5 * float(xp.finfo(dt).max), dtype=dt)
        bias = xp.where(masked, neg, self.backend.zeros((), dtype=dt))
        if key_padding_mask is None and t * tk <= _CAUSAL_CACHE_ITEMS:
            self._causal = (key, self.backend, bias)
        return bias

    # ------------------------------------------------------------------ forward / backward
    def forward(self, x: Array, train: bool = False, cache: KVCache | None = None,
                key_padding_mask: Array | None = None) -> tuple[Array, AttentionContext]:
        """``x [B, T, D]`` → ``(y [B, T, D], ctx)``; with ``cache``, append and attend to it."""
        self.check_input(x)
        xp = self.xp
        b, t, d = x.shape
        h, kv, hd = self.num_heads, self.kv_heads, self.head_dim
        g = h // kv
        if cache is not None and (cache.batch != b or tuple(cache.k.shape[1::2]) != (kv, hd)):
            raise ShapeError(f"{self.describe()} got a KV cache of shape {list(cache.k.shape)} "
                             f"for input {list(x.shape)}; expected [{b}, {kv}, max_len, {hd}]: "
                             "create it with this layer's new_cache(batch, max_len)")
        offset = 0 if cache is None else cache.length
        x2 = xp.reshape(x, (b * t, d))
        q = self._project(x2, "q", h, b, t)
        k = self._project(x2, "k", kv, b, t)
        v = self._project(x2, "v", kv, b, t)
        q_raw, k_raw, q_r, k_r = q, k, None, None
        if self.qk_norm:
            q, q_r = self._rms(q, "q_norm")
            k, k_r = self._rms(k, "k_norm")
        cos = sin = None
        rot = self.rotary
        if rot:
            cos, sin = self._rope.tables(self.backend, self.float_dtype, offset, t, rot,
                                         self.rope_theta, self.rope_scaling)
            q = apply_rope(xp, q, cos, sin, rot, self.rope_style, self.backend)
            k = apply_rope(xp, k, cos, sin, rot, self.rope_style, self.backend)
        if cache is not None:
            k, v = cache.append(k, v)
        tk = k.shape[2]
        # the 1/sqrt(hd) scale is applied to q ([.., T, hd]), not to the scores ([.., T, Tk])
        qg = xp.reshape(q, (b, kv, g * t, hd)) * (1.0 / math.sqrt(hd))
        s = xp.reshape(xp.matmul(qg, xp.matrix_transpose(k)), (b, h, t, tk))
        bias = self._mask_bias(b, t, tk, offset, key_padding_mask)
        if bias is not None:
            s = s + bias
        p = softmax_with(self.backend, s)
        a = xp.matmul(xp.reshape(p, (b, kv, g * t, tk)), v)
        merged = xp.reshape(xp.permute_dims(xp.reshape(a, (b, h, t, hd)), (0, 2, 1, 3)),
                            (b * t, h * hd))
        y = backend_linear(self.backend, merged, self.params["o_weight"],
                           self.params.get("o_bias"))
        ctx = AttentionContext(x2=x2, shape=(b, t, d), q_raw=q_raw, k_raw=k_raw, q_r=q_r,
                               k_r=k_r, qg=qg, k=k, v=v, p=p, merged=merged, cos=cos, sin=sin,
                               cached=cache is not None)
        return xp.reshape(y, (b, t, d)), ctx

    def backward(self, dy: Array, ctx: AttentionContext,
                 need_input_grad: bool = True) -> Array | None:
        """``dy [B, T, D]`` → ``dx [B, T, D]``; adds every parameter gradient into ``grads``
        (returns ``None`` without the three input products when ``need_input_grad=False``)."""
        if ctx.cached:
            raise LoomxError(f"{self.describe()}: backward through a forward that used a KV "
                             "cache is not supported; train with cache=None")
        self.check_grad(dy, ctx.shape)
        xp = self.xp
        b, t, d = ctx.shape
        h, kv, hd = self.num_heads, self.kv_heads, self.head_dim
        g, tk = h // kv, ctx.k.shape[2]
        dmerged = linear_backward(self, ctx.merged, xp.reshape(dy, (b * t, d)), "o_weight",
                                  self._bias_key("o"))
        dag = xp.reshape(self._split_heads(dmerged, b, t, h), (b, kv, g * t, hd))
        pg = xp.reshape(ctx.p, (b, kv, g * t, tk))
        dv = xp.matmul(xp.matrix_transpose(pg), dag)
        dp = xp.matmul(dag, xp.matrix_transpose(ctx.v))
        ds = softmax_vjp_with(self.backend, pg, dp)
        dq = xp.reshape(xp.matmul(ds, ctx.k), (b, h, t, hd)) * (1.0 / math.sqrt(hd))
        dk = xp.matmul(xp.matrix_transpose(ds), ctx.qg)  # qg carries the scale
        rot = self.rotary
        if rot:
            dq = apply_rope(xp, dq, ctx.cos, -ctx.sin, rot, self.rope_style, self.backend)
            dk = apply_rope(xp, dk, ctx.cos, -ctx.sin, rot, self.rope_style, self.backend)
        if self.qk_norm:
            dq = self._rms_back(dq, ctx.q_raw, ctx.q_r, "q_norm")
            dk = self._rms_back(dk, ctx.k_raw, ctx.k_r, "k_norm")
        if not need_input_grad:
            for grad, p in ((dq, "q"), (dk, "k"), (dv, "v")):
                self._project_back(grad, p, ctx.x2, False)
            return None
        dx2 = (self._project_back(dq, "q", ctx.x2) + self._project_back(dk, "k", ctx.x2)
               + self._project_back(dv, "v", ctx.x2))
        return xp.reshape(dx2, (b, t, d))

    def __call__(self, x: Array, train: bool = False, cache: KVCache | None = None,
                 key_padding_mask: Array | None = None) -> Array:
        return self.forward(x, train, cache, key_padding_mask)[0]
