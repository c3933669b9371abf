"""Difference target propagation (Lee, Zhang, Fischer & Bengio, 2015): gradient-free tweening.

For a chain of Dense layers ``h_{l+1} = f_l(h_l) = φ_l(h_l W_lᵀ + b_l)`` (``h_0 = x``):

1. **Top target.** ``t_L = h_L + β·e`` with ``e`` the descent direction of the loss on the
   output only (``onehot − y`` for SSE, ``onehot − softmax(y)`` for cross-entropy).
2. **Difference-corrected targets.** Each layer ``l ≥ 1`` owns a learned inverse
   ``g_l(h) = φ_{l−1}(h V_lᵀ + c_l)`` that maps ``h_{l+1}`` back to ``h_l``; then
   ``t_l = h_l + g_l(t_{l+1}) − g_l(h_{l+1})``.
3. **Local layer updates.** Each layer moves toward its target with its own delta rule on
   ``½‖f_l(h_l) − t_{l+1}‖²`` (``h_l`` held fixed): ``ΔW_l = −η·δ_lᵀ h_l / B`` with
   ``δ_l = (f_l(h_l) − t_{l+1}) ⊙ φ_l'``.
4. **Inverse updates.** ``g_l`` learns to reconstruct a noisy ``h̃_l = h_l + σε`` from
   ``f_l(h̃_l)`` with the same local delta rule.

No gradient flows through the network: no layer's ``backward`` is called, and each update uses
only quantities local to one layer (its input, its output, its target).
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError
from ..layers.activations import get_activation
from .primitives import flat2, link_metrics, norm

Array = Any


class DTPState:
    """Inverse mappings and the DTP step for a :class:`~loomx.tween.TweenTrainer`."""

    def __init__(self, trainer):
        self.trainer = trainer
        layers = trainer.active_layers()
        bad = [f"{i}: {layer.describe()}" for i, layer in layers if layer.type_name != "dense"]
        if bad:
            raise ConfigError("difference target propagation needs a chain of Dense layers; "
                              f"found {bad}. Use method='tween' for other layer types")
        self.inverses: dict[int, dict[str, Array]] = {}
        rng = trainer.rng
        for pos in range(1, len(layers)):
            layer = layers[pos][1]
            n_in, n_out = layer.in_features, layer.out_features
            self.inverses[id(layer)] = {
                "weight": rng.normal((n_in, n_out), std=math.sqrt(1.0 / n_out),
                                     dtype=trainer.backend.float_dtype),
                "bias": trainer.backend.zeros((n_in,)),
            }

    @staticmethod
    def _dense(backend, layer_w, layer_b, act, h):
        xp = backend.xp
        z = xp.matmul(h, xp.matrix_transpose(layer_w))
        if layer_b is not None:
            z = z + layer_b
        return z, act.forward(backend, z)

    def _f(self, layer, h):
        return self._dense(layer.backend, layer.params["weight"], layer.params.get("bias"),
                           get_activation(layer.activation), h)

    def _g(self, layer, producer, h):
        inv = self.inverses[id(layer)]
        return self._dense(layer.backend, inv["weight"], inv["bias"],
                           get_activation(producer.activation), h)

    def _local_step(self, backend, act, params: dict, keys, h_in, z, y, target, rate):
        """Delta rule on ``½‖y − target‖²`` for one affine+activation map."""
        xp = backend.xp
        dz = act.backward(backend, z, y, y - target)  # elementwise φ'(z)·(y − t)
        n = h_in.shape[0]
        wk, bk = keys
        params[wk] = params[wk] - rate * xp.matmul(xp.matrix_transpose(dz), h_in) / n
        if bk in params and params[bk] is not None:
            params[bk] = params[bk] - rate * xp.mean(dz, axis=0)

    def step(self, x: Array, labels, rate: float) -> Array:
        tr = self.trainer
        cfg, backend = tr.config, tr.backend
        xp = backend.xp
        layers = tr.active_layers()
        n = len(layers)
        hs, zs = [flat2(xp, x)], []
        for _, layer in layers:
            z, h = self._f(layer, hs[-1])
            zs.append(z)
            hs.append(h)
        onehot = tr.onehot(labels, tr.output_size)
        g_top, loss = tr._output_error(hs[-1], onehot)
        targets: list[Array | None] = [None] * (n + 1)
        targets[n] = hs[n] + cfg.dtp_top_rate * g_top
        for pos in range(n - 1, 0, -1):
            layer, producer = layers[pos][1], layers[pos - 1][1]
            _, g_t = self._g(layer, producer, targets[pos + 1])
            _, g_h = self._g(layer, producer, hs[pos + 1])
            targets[pos] = hs[pos] + g_t - g_h
        rows = []
        for pos, (_, layer) in enumerate(layers):
            gap, budget = link_metrics(xp, hs[pos + 1], targets[pos + 1])
            self._local_step(backend, get_activation(layer.activation), layer.params,
                             ("weight", "bias"), hs[pos], zs[pos], hs[pos + 1],
                             targets[pos + 1], rate)
            zero = backend.scalar(0.0)
            rows.append([gap, budget, norm(xp, targets[pos + 1] - hs[pos + 1]),
                         norm(xp, targets[pos + 1]), zero, zero + rate])
        self._train_inverses(layers, hs)
        tr.steps += 1
        table = xp.stack([xp.stack([xp.reshape(r[k], ()) for r in rows])
                          for k in range(len(rows[0]))])
        tr.telemetry.record(loss, table, tuple(i for i, _ in layers))
        return loss

    def _train_inverses(self, layers, hs) -> None:
        tr = self.trainer
        cfg, backend = tr.config, tr.backend
        for pos in range(1, len(layers)):
            layer, producer = layers[pos][1], layers[pos - 1][1]
            h = hs[pos]
            noisy = h + tr.rng.normal(tuple(h.shape), std=cfg.dtp_noise, dtype=h.dtype)
            _, fx = self._f(layer, noisy)
            z, rec = self._g(layer, producer, fx)
            self._local_step(backend, get_activation(producer.activation),
                             self.inverses[id(layer)], ("weight", "bias"), fx, z, rec, noisy,
                             cfg.dtp_inverse_rate)
