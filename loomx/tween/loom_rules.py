"""Loom's per-layer-type tweening rules, reproduced for ``loom_compat=True``.

Chain mode (``nn/tween.go:1192-2222``): ``chain_backward`` maps the descent direction ``g`` on a
layer's output to one on its input; ``chain_update`` returns the parameter deltas. Legacy mode
(``nn/tween.go:1126-1184, 1734-2504``): ``legacy_target`` is the heuristic inverse and
``legacy_update`` the delta rule. Loom works on one sample; here every rule runs on a batch and
per-sample clipped steps are averaged over it (identical to Loom for a batch of one).

Loom stores weights ``[in][out]``; loomx stores PyTorch's ``[out, in]``. The formulas below are
Loom's, rewritten for loomx layouts, including Loom's mistakes (a transposed V update in
attention, the layer input in place of the SwiGLU intermediate, the ``k mod len(x)`` pairing of
Conv2D, first-time-step-only recurrent rules): they are what the reference computes.
Layer types without a rule pass the gradient through (truncated or zero-padded) and are not
updated, as in Loom.
"""

from __future__ import annotations

from typing import Any

from .config import TweenConfig
from .primitives import clip, derivative_from_output, fit_width, flat2, loom_activation

Array = Any
Update = tuple[Any, str, Array, bool]  # (layer, param key, delta, use momentum)

CHAIN_TYPES = ("dense", "layer_norm", "rms_norm", "mha", "rnn", "lstm", "swiglu", "conv2d")


def _rows(xp, a: Array, width: int) -> Array:
    return xp.reshape(a, (-1, width))


def _clip(xp, v: Array, c: float) -> Array:
    return clip(xp, v, -c, c)


def _outer_mean(xp, u: Array, v: Array, r, clip: float | None) -> tuple[Array, Array]:
    """Mean over rows of ``clip(r·u_b ⊗ v_b)`` for ``u [N, a]``, ``v [N, b]``; and the clip-hit
    fraction (0 when ``clip`` is None)."""
    o = r * (u[:, :, None] * v[:, None, :])
    if clip is None:
        return xp.mean(o, axis=0), xp.mean(o * 0.0)
    hit = xp.mean(xp.astype(xp.abs(o) > clip, o.dtype))
    return xp.mean(_clip(xp, o, clip), axis=0), hit


def _act_deriv(xp, layer, y: Array, cfg: TweenConfig) -> Array:
    return derivative_from_output(xp, loom_activation(layer, True), y, cfg)


# ---------------------------------------------------------------------------- chain backward
def chain_backward(layer, x: Array, y: Array, g: Array, ds: float, cfg: TweenConfig) -> Array:
    """Loom's chain-rule input gradient (descent direction) for one layer; ``[B, *in]``."""
    xp, backend = layer.xp, layer.backend
    t = layer.type_name
    if t == "dense":
        n_out = layer.out_features
        gy = _rows(xp, g, n_out)
        loc = _clip(xp, gy * _act_deriv(xp, layer, _rows(xp, y, n_out), cfg) * ds,
                    cfg.gradient_clip)
        nf = 1.0 / n_out ** 0.5 if n_out > 1 else 1.0
        gin = _clip(xp, nf * xp.matmul(loc, layer.params["weight"]), cfg.gradient_clip)
        return xp.reshape(gin, x.shape)
    if t in ("layer_norm", "rms_norm"):
        gamma = layer.params.get("weight")
        gin = g * ds if gamma is None else g * gamma * ds
        return gin
    if t == "mha" and _mha_square(layer):
        d = x.shape[-1]
        loc = _rows(xp, g, d) * ds
        ga = xp.matmul(loc, layer.params["o_weight"])
        p = layer.params
        gin = xp.matmul(ga, p["v_weight"]) + 0.3 * xp.matmul(ga, p["q_weight"] + p["k_weight"])
        return xp.reshape(gin, x.shape)
    if t in ("rnn", "lstm") and x.ndim == 3:
        y0 = y[:, 0, :] if y.ndim == 3 else y
        g0 = g[:, 0, :] if g.ndim == 3 else g
        loc = g0 * (1.0 - y0 * y0 + cfg.derivative_epsilon) * ds
        w = layer.params["weight_ih"]
        if t == "lstm":
            h = layer.hidden_size
            w = cfg.lstm_gate_scale * (w[:h, :] + w[h:2 * h, :] + w[2 * h:3 * h, :] + w[3 * h:, :])
        g_first = xp.matmul(loc, w)
        rest = backend.zeros((x.shape[0], x.shape[1] - 1, x.shape[2]), dtype=x.dtype)
        return xp.concat([g_first[:, None, :], rest], axis=1)
    if t == "swiglu":
        d = x.shape[-1]
        down = layer.params["down_weight"]
        if down.shape[1] >= d:
            gin = xp.matmul(_rows(xp, g, d), down[:, :d]) * ds
            return xp.reshape(gin, x.shape)
    if t == "conv2d":
        return _conv_backward(layer, x, y, g, ds, cfg)
    # Loom's default: pass through, truncated or zero-padded, no depth scale
    gin = fit_width(xp, backend, flat2(xp, g), flat2(xp, x).shape[1])
    return xp.reshape(gin, x.shape)


def _mha_square(layer) -> bool:
    p = layer.params
    if "o_weight" not in p:
        return False
    d = p["o_weight"].shape[0]
    return all(p[k].shape == (d, d) for k in ("q_weight", "k_weight", "v_weight", "o_weight"))


def _conv_blocks(xp, layer, g: Array) -> Array:
    """Per-filter mean of ``g [B, F, ...]`` → ``[B, F]``."""
    f = layer.params["weight"].shape[0]
    return xp.mean(xp.reshape(g, (g.shape[0], f, -1)), axis=2)


def _conv_backward(layer, x, y, g, ds, cfg) -> Array:
    xp, backend = layer.xp, layer.backend
    loc = g * _act_deriv(xp, layer, y, cfg) * ds
    fg = _conv_blocks(xp, layer, loc)
    w = layer.params["weight"]
    kpf = 1
    for s in w.shape[1:]:
        kpf *= int(s)
    contrib = xp.matmul(fg, xp.reshape(w, (w.shape[0], kpf)))  # [B, kpf]: pairs k with x[k]
    n = flat2(xp, x).shape[1]
    return xp.reshape(fit_width(xp, backend, contrib, n), x.shape)


# ---------------------------------------------------------------------------- chain update
def chain_update(layer, x: Array, y: Array, g: Array, r, cfg: TweenConfig
                 ) -> tuple[list[Update], Array | None]:
    """Loom's chain-rule parameter deltas for one layer at rate ``r`` (incl. depth scale)."""
    xp = layer.xp
    t = layer.type_name
    p = layer.params
    if t == "dense":
        n_out, n_in = layer.out_features, layer.in_features
        delta = _rows(xp, g, n_out) * _act_deriv(xp, layer, _rows(xp, y, n_out), cfg)
        dw, hit = _outer_mean(xp, delta, _rows(xp, x, n_in), r, cfg.update_clip)
        ups: list[Update] = [(layer, "weight", dw, True)]
        if "bias" in p:
            ups.append((layer, "bias", xp.mean(_clip(xp, r * delta, cfg.update_clip), axis=0),
                        False))
        return ups, hit
    if t in ("layer_norm", "rms_norm"):
        d = p["weight"].shape[0]
        gm = xp.mean(_rows(xp, g, d), axis=0)
        ups = [(layer, "weight", r * gm, False)]
        if "bias" in p:
            ups.append((layer, "bias", r * gm, False))
        return ups, None
    if t == "mha" and _mha_square(layer):
        return _mha_update(layer, x, g, r)
    if t in ("rnn", "lstm") and x.ndim == 3:
        return _recurrent_update(layer, x, y, g, r, cfg)
    if t == "swiglu" and p["down_weight"].shape[1] >= x.shape[-1]:
        return _swiglu_update(layer, x, g, r)
    if t == "conv2d":
        fg = _conv_blocks(xp, layer, g)  # no activation derivative (Loom)
        w = p["weight"]
        kpf = 1
        for s in w.shape[1:]:
            kpf *= int(s)
        xs = fit_width(xp, layer.backend, flat2(xp, x), kpf)
        dw = xp.mean(r * (fg[:, :, None] * xs[:, None, :]), axis=0)
        ups = [(layer, "weight", xp.reshape(dw, w.shape), False)]
        if "bias" in p:
            ups.append((layer, "bias", r * xp.mean(fg, axis=0), False))
        return ups, None
    return [], None


def _mha_update(layer, x, g, r) -> tuple[list[Update], Array]:
    xp, p = layer.xp, layer.params
    d = p["o_weight"].shape[0]
    heads = getattr(layer, "num_heads", 2) or 2
    hd = d // heads
    xs, gs = _rows(xp, x, d), _rows(xp, g, d)
    c = 0.5
    do, hit = _outer_mean(xp, gs, xs, r, c)  # layer input instead of the head outputs
    ups: list[Update] = [(layer, "o_weight", do, False)]
    hg = xp.matmul(gs, p["o_weight"] + do)  # computed with the already-updated weight
    dv, _ = _outer_mean(xp, xs, hg, r, c)  # transposed relative to the correct hg ⊗ x
    ups.append((layer, "v_weight", dv, False))
    dot = xp.sum(xs[:, None, :hd] * xp.reshape(hg, (-1, heads, hd)), axis=2)  # x[:hd] per head
    rho = _clip(xp, 0.1 * r * dot, c)  # [N, heads]
    rho_cols = xp.reshape(xp.broadcast_to(rho[:, :, None], (rho.shape[0], heads, hd)),
                          (rho.shape[0], heads * hd))
    dq = xp.mean(xs[:, :, None] * rho_cols[:, None, :], axis=0)
    ups += [(layer, "q_weight", dq, False), (layer, "k_weight", dq, False)]
    gmean = xp.mean(gs)
    for key, k in (("q_bias", 0.05), ("k_bias", 0.05), ("v_bias", 0.05)):
        if key in p:
            ups.append((layer, key, xp.zeros_like(p[key]) + gmean * k * r, False))
    if "o_bias" in p:
        ups.append((layer, "o_bias", xp.mean(_clip(xp, r * gs, c), axis=0), False))
    return ups, hit


def _recurrent_update(layer, x, y, g, r, cfg) -> tuple[list[Update], Array | None]:
    xp, p = layer.xp, layer.params
    y0 = y[:, 0, :] if y.ndim == 3 else y
    g0 = g[:, 0, :] if g.ndim == 3 else g
    x0 = x[:, 0, :]
    delta = g0 * (1.0 - y0 * y0 + cfg.derivative_epsilon)
    if layer.type_name == "rnn":
        dw, _ = _outer_mean(xp, delta, x0, r, None)
        ups: list[Update] = [(layer, "weight_ih", dw, False)]
        if "bias" in p:
            ups.append((layer, "bias", r * xp.mean(delta, axis=0), False))
        return ups, None
    delta = _clip(xp, delta, 0.5)
    base, hit = _outer_mean(xp, delta, x0, r, 0.5)
    bb = xp.mean(_clip(xp, r * delta, 0.5), axis=0)
    factors = (0.6, 0.8, 0.6, 1.0)  # loomx gate order i, f, g, o
    dw = xp.concat([f * base for f in factors], axis=0)
    ups = [(layer, "weight_ih", dw, False)]
    if "bias" in p:
        ups.append((layer, "bias", xp.concat([f * bb for f in factors], axis=0), False))
    return ups, hit


def _swiglu_update(layer, x, g, r) -> tuple[list[Update], Array | None]:
    xp, p = layer.xp, layer.params
    d = x.shape[-1]
    c = 0.5
    xs, gs = _rows(xp, x, d), _rows(xp, g, d)
    m = p["down_weight"].shape[1]
    dd, hit = _outer_mean(xp, gs, xs, r, c)  # the layer input in place of the intermediate
    pad = layer.backend.zeros((d, m - d), dtype=dd.dtype)
    ups: list[Update] = [(layer, "down_weight", xp.concat([dd, pad], axis=1), False)]
    gbar = _clip(xp, xp.mean(gs), c)
    # Gate[i] += clip(0.8·r·x[i mod D]·ḡ) over Loom's flat [in][inter] layout
    xcol = xp.mean(xs, axis=0)
    step = _clip(xp, 0.8 * r * xcol * gbar, c)
    tiled = xp.broadcast_to(step[None, :], (m, d))
    ups += [(layer, "gate_weight", tiled, False), (layer, "up_weight", tiled, False)]
    for key in ("gate_bias", "up_bias"):
        if key in p:
            ups.append((layer, key, xp.zeros_like(p[key]) + _clip(xp, 0.5 * r * gbar, c),
                        False))
    if "down_bias" in p:
        ups.append((layer, "down_bias", xp.mean(_clip(xp, r * gs, c), axis=0), False))
    return ups, hit


# ---------------------------------------------------------------------------- legacy mode
def legacy_target(layer, t_out: Array, x: Array, cfg: TweenConfig) -> Array:
    """Loom's heuristic inverse: row-L1-normalised ``Wᵀ t`` for Dense, pass-through otherwise.

    Args:
        t_out: target for the layer output, ``[B, *out]``.
        x: the layer input (only its shape is used).
    Returns:
        the (unclamped) target for the layer input, ``[B, *in]``.
    """
    xp, backend = layer.xp, layer.backend
    if layer.type_name == "dense":
        w = layer.params["weight"]
        num = xp.matmul(_rows(xp, t_out, layer.out_features), w)
        den = xp.sum(xp.abs(w), axis=0)
        ok = den > cfg.total_weight_threshold
        tin = xp.where(ok, num / xp.where(ok, den, 1.0), 0.0)
        return xp.reshape(tin, x.shape)
    return xp.reshape(fit_width(xp, backend, flat2(xp, t_out), flat2(xp, x).shape[1]), x.shape)


def legacy_update(layer, x: Array, y: Array, gap: Array, r, cfg: TweenConfig) -> list[Update]:
    """Loom's legacy delta-rule deltas (``TweenWeights``) at rate ``r`` (gating applied).

    Dense: ``b += r·0.1·gap``, ``W += r·0.01·gap ⊗ x`` (with momentum); norms: γ += 0.01·r·ḡ,
    β += 0.1·r·ḡ. Loom's other legacy rules add one input-independent scalar to whole tensors
    and are not reproduced (those layers are left unchanged).
    """
    xp, p = layer.xp, layer.params
    t = layer.type_name
    if t == "dense":
        cfg_w, cfg_b = cfg.weight_rate_multiplier, cfg.bias_rate_multiplier
        gy = _rows(xp, gap, layer.out_features)
        dw, _ = _outer_mean(xp, gy, _rows(xp, x, layer.in_features), r * cfg_w, None)
        ups: list[Update] = [(layer, "weight", dw, True)]
        if "bias" in p:
            ups.append((layer, "bias", r * cfg_b * xp.mean(gy, axis=0), False))
        return ups
    if t in ("layer_norm", "rms_norm"):
        gbar = xp.mean(gap)
        ups = [(layer, "weight", xp.zeros_like(p["weight"]) + cfg.norm_gamma_rate * r * gbar,
                False)]
        if "bias" in p:
            ups.append((layer, "bias", xp.zeros_like(p["bias"]) + cfg.norm_beta_rate * r * gbar,
                        False))
        return ups
    return []
