"""``TweenTrainer``: Neural Tweening over any loomx :class:`~loomx.grid.Network`, any backend.

One :meth:`TweenTrainer.step` = forward → backward targets/gradients → gaps and link budgets →
adaptive rate → parameter updates, returning the pre-update loss as a 0-d device array. The
algorithm is chosen by :class:`TweenConfig`:

- ``use_chain_rule=True, loom_compat=True``: Loom's chain-rule tweening with its per-layer-type
  approximations (:mod:`loomx.tween.loom_rules`);
- ``use_chain_rule=True, loom_compat=False`` (default): the same scheme (depth scale, 1/√fan-out,
  clipping, EMA momentum) with exact local gradients from each layer's own ``backward``;
- ``use_chain_rule=False``: Loom's legacy target propagation (heuristic inverse + delta rule);
- ``method="dtp"``: difference target propagation (:mod:`loomx.tween.dtp`), gradient-free.

Batches: a step on ``x [B, ...]`` takes the update of the batch-mean gradient (the average of
the per-sample outer products), which for ``B = 1`` is Loom's step. The clips differ by mode:
the corrected mode (``loom_compat=False``) bounds each sample's propagated direction by
``±gradient_clip`` and the batch-averaged update by ``±update_clip`` (elementwise), while the
faithful mode clips each sample's update before averaging, as Loom does per sample.
:meth:`accumulate` / :meth:`apply_batch` reproduce Loom's ``TweenStepAccumulate`` /
``TweenBatchApply`` (faithful: averaged gaps paired with the last sample's activations; fixed:
one step on the accumulated samples).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, LoomxError, ShapeError, TrainingError
from . import loom_rules
from .config import TweenConfig
from .primitives import (
    clamp_target,
    clip,
    depth_scale,
    fit_width,
    flat2,
    link_metrics,
    loom_activation,
    norm,
    safe_grad,
)
from .telemetry import METRICS, TweenTelemetry

Array = Any


class AdaptiveRate:
    """Loom's explosion-detection rate multiplier (``getAdaptiveRateMultiplier``), on device.

    Off (multiplier 1) unless ``config.explosion_detection``; the state is 0-d device arrays, so
    it never syncs.
    """

    def __init__(self, backend):
        self.backend = backend
        self.calls = 0
        self.value = backend.scalar(1.0)
        self.baseline = backend.scalar(0.0)
        self.prev = backend.scalar(0.0)
        self.count = backend.scalar(0.0)

    def update(self, avg_gap: Array) -> Array:
        xp = self.backend.xp
        self.calls += 1
        if self.calls <= 10:
            self.baseline = self.baseline + (avg_gap - self.baseline) / self.calls
            self.prev = avg_gap
            return self.value
        growth = xp.where(self.prev > 1e-4, avg_gap / xp.where(self.prev > 1e-4, self.prev, 1.0),
                          1.0)
        exploding = (growth > 1.5) | (avg_gap > 10.0 * self.baseline)
        self.count = xp.where(exploding, self.count + 1.0, 0.0)
        one = xp.ones_like(self.count)
        factor = xp.where(self.count > 10.0, 0.3 * one, xp.where(self.count > 5.0, 0.5 * one, 0.7))
        damped = xp.maximum(self.value * factor, self.backend.scalar(0.01))
        recovered = xp.minimum(self.value * 1.05, self.backend.scalar(1.0))
        self.value = xp.where(exploding, damped, recovered)
        self.prev = avg_gap
        return self.value


class StepRecord:
    """What the last step computed (device arrays), Loom's per-step buffers.

    ``acts[0..L]``, ``targets[0..L]``, ``chain[0..L]`` (descent directions w.r.t. each
    activation), ``gaps[L]`` and ``budgets[L]`` (0-d), ``layers`` = ``(flat index, layer)``.
    """

    def __init__(self, layers, acts, ctxs, sources):
        self.layers, self.acts, self.ctxs = layers, acts, ctxs
        self.sources: dict[int, int] = sources  # residual position -> position of its skip
        n = len(acts)
        self.targets: list[Array | None] = [None] * n
        self.chain: list[Array | None] = [None] * n
        self.gaps: list[Array] = []
        self.budgets: list[Array] = []


class TweenTrainer:
    """Trains a built network by Neural Tweening.

    Args:
        net: a built :class:`~loomx.grid.Network` (any layers; see the module docstring for
            which layers each mode updates).
        config: a :class:`TweenConfig` (default: Loom's defaults with exact local gradients).
        output_size: classes read from the output (default: the flattened output width).
        log_interval: steps between host copies of the telemetry.
        seed: seed for shuffling in :meth:`fit` and for DTP's noise.
        telemetry: record per-layer telemetry every step (False skips it, for speed; the
            legacy mode still computes the budgets it gates on, and with
            ``config.prune_enabled`` every step still adds its link budgets to a device tally
            that :meth:`fit` reads once per epoch for pruning).

    Shapes: ``x [B, *input_shape]``, ``labels`` int ``[B]`` (device array or Python list).
    """

    def __init__(self, net, config: TweenConfig | None = None, *, output_size: int | None = None,
                 log_interval: int = 50, seed: int = 0, telemetry: bool = True):
        if not getattr(net, "built", False):
            raise ConfigError("TweenTrainer needs a built network: pass input_shape= to the "
                              "Network or call net.build(input_shape) first")
        self.net = net
        self.config = config or TweenConfig()
        self.backend = net.backend
        self.xp = net.backend.xp
        out_width = 1
        for d in net.output_shape:
            out_width *= int(d)
        self.output_size = int(output_size or out_width)
        if self.output_size > out_width:
            raise ShapeError(f"output_size {self.output_size} exceeds the network output width "
                             f"{out_width}")
        self.telemetry = TweenTelemetry(self.backend, log_interval)
        self.record = bool(telemetry)
        self.rng = self.backend.random(seed)
        self.adaptive = AdaptiveRate(self.backend)
        self.velocity: dict[tuple[int, str], Array] = {}
        self.dead_epochs: dict[int, int] = {}
        self.removed: list[int] = []
        self.steps = 0
        # the best evaluation of the current fit (reset at the start of each fit)
        self.best_score = -1.0
        self.best_state: dict[str, dict] | None = None
        # pruning without telemetry: [layer ids, summed budgets (device), steps] of this epoch
        self._budget_tally: list | None = None
        self.last: StepRecord | None = None
        self._batch: dict | None = None
        self._dtp = None
        if self.config.method == "dtp":
            from .dtp import DTPState

            self._dtp = DTPState(self)

    # ------------------------------------------------------------------ helpers
    def active_layers(self) -> list[tuple[int, Any]]:
        """``(flat index, layer)`` of every enabled layer, in forward order."""
        return [(i, layer) for i, layer in self.net.layers() if not layer.disabled]

    def onehot(self, labels, width: int) -> Array:
        """``labels [B]`` → one-hot ``[B, width]`` in the float dtype (out-of-range → zeros)."""
        xp, b = self.xp, self.backend
        if not b.is_array(labels):
            labels = b.asarray(list(labels), dtype=xp.int64)
        cols = b.arange(width, dtype=labels.dtype)
        return xp.astype(xp.reshape(labels, (-1, 1)) == xp.reshape(cols, (1, -1)),
                         b.float_dtype)

    def forward(self, x: Array, train: bool = True) -> StepRecord:
        """Forward over the enabled layers (residual skips included); keeps every activation
        ``acts[0..L]`` and context."""
        layers = self.active_layers()
        indices = [i for i, _ in layers]
        acts, ctxs, sources = [x], [], {}
        for pos, (i, layer) in enumerate(layers):
            if getattr(layer, "needs_skip", False):
                src = bisect_left(indices, self.net.resolve_source(layer.source, i))
                sources[pos] = src
                x, ctx = layer.forward(x, train, skip=acts[src])
            else:
                x, ctx = layer.forward(x, train)
            acts.append(x)
            ctxs.append(ctx)
        return StepRecord(layers, acts, ctxs, sources)

    def _output_error(self, y: Array, onehot: Array) -> tuple[Array, Array]:
        """``(descent direction on the output [B, *out], loss 0-d)``."""
        xp = self.xp
        y2 = flat2(xp, y)
        w = y2.shape[1]
        t = fit_width(xp, self.backend, onehot, w)
        if self.config.loss == "softmax_ce":
            z = y2 - xp.max(y2, axis=1, keepdims=True)
            ez = xp.exp(z)
            p = ez / xp.sum(ez, axis=1, keepdims=True)
            loss = -xp.mean(xp.sum(t * (z - xp.log(xp.sum(ez, axis=1, keepdims=True))), axis=1))
            return xp.reshape(t - p, y.shape), loss
        d = t - y2
        return xp.reshape(d, y.shape), xp.mean(xp.sum(d * d, axis=1))

    def _clamp(self, rec: StepRecord, l: int, t: Array, legacy: bool) -> Array:
        """Clamp the target of activation ``a_l``: by the consumer (layer l, Loom) or the
        producer (layer l−1, fixed)."""
        cfg = self.config
        if cfg.loom_compat:
            act = loom_activation(rec.layers[l][1], True) if l < len(rec.layers) else "identity"
        else:
            act = loom_activation(rec.layers[l - 1][1], False) if l > 0 else "identity"
        return clamp_target(self.xp, t, act, cfg, legacy)

    def _ds(self, l: int, n_layers: int) -> float:
        cfg = self.config
        return depth_scale(n_layers - 1 - l, cfg.depth_scale_factor) if cfg.depth_scaling \
            else 1.0

    # ------------------------------------------------------------------ backward passes
    def _chain_backward(self, rec: StepRecord, g_top: Array) -> None:
        xp, cfg = self.xp, self.config
        n = len(rec.layers)
        rec.chain[n] = g_top
        g = g_top
        batch = g_top.shape[0]
        pending: dict[int, Array] = {}
        for l in range(n - 1, -1, -1):
            layer = rec.layers[l][1]
            x, y = rec.acts[l], rec.acts[l + 1]
            ds = self._ds(l, n)
            if cfg.loom_compat:
                g_in = loom_rules.chain_backward(layer, x, y, g, ds, cfg)
            else:
                layer.zero_grad()
                dx = layer.backward(-g / batch, rec.ctxs[l])
                if l in rec.sources:
                    dx, dskip = dx
                    src = rec.sources[l]
                    d = -dskip * (batch * ds)
                    pending[src] = d if src not in pending else pending[src] + d
                nf = 1.0
                if cfg.fanout_norm and layer.type_name == "dense" and layer.out_features > 1:
                    nf = 1.0 / layer.out_features ** 0.5
                g_in = -dx * (batch * ds * nf)
            if l in pending:
                g_in = g_in + pending.pop(l)
            g = safe_grad(xp, g_in, cfg.gradient_clip)
            rec.chain[l] = g
            raw = x + cfg.gradient_scale * g
            t = xp.where(xp.isfinite(raw), raw, x)
            rec.targets[l] = self._clamp(rec, l, t, legacy=False)

    def _legacy_backward(self, rec: StepRecord, top_target: Array) -> None:
        n = len(rec.layers)
        t = top_target
        for l in range(n - 1, -1, -1):
            layer = rec.layers[l][1]
            t = loom_rules.legacy_target(layer, t, rec.acts[l], self.config)
            t = self._clamp(rec, l, t, legacy=True)
            rec.targets[l] = t

    # ------------------------------------------------------------------ updates
    def _apply(self, updates) -> None:
        m = self.config.momentum
        for layer, key, delta, use_momentum in updates:
            if use_momentum and m > 0:
                k = (id(layer), key)
                v = self.velocity.get(k)
                v = (1.0 - m) * delta if v is None else m * v + (1.0 - m) * delta
                self.velocity[k] = v
                delta = v
            layer.params[key] = layer.params[key] + delta

    def _exact_updates(self, layer, r) -> tuple[list, Array]:
        """Deltas ``−r·∇`` from ``layer.grads`` (filled by the backward pass), clip-hit rate."""
        xp, limit = self.xp, self.config.update_clip
        ups, hits, total = [], None, 0
        for ref in layer.parameters():
            d = -r * ref.grad
            if self.record:
                h = xp.sum(xp.astype(xp.abs(d) > limit, d.dtype))
                hits = h if hits is None else hits + h
            size = 1
            for s in d.shape:
                size *= int(s)
            total += size
            ups.append((ref.layer, ref.key, clip(xp, d, -limit, limit), d.ndim >= 2))
        return ups, (hits / max(total, 1) if hits is not None else None)

    def _layer_rate(self, layer, l: int, n: int, eta, mult) -> Any:
        return eta * mult * self.config.type_rate(layer.type_name) * self._ds(l, n)

    # ------------------------------------------------------------------ the step
    def step(self, x: Array, labels, rate: float) -> Array:
        """One tween step on ``x [B, ...]`` with class ``labels [B]`` at rate η; returns the
        pre-update loss (0-d device array: per-sample SSE, or cross-entropy, averaged)."""
        if self._dtp is not None:
            return self._dtp.step(x, labels, rate)
        xp, cfg = self.xp, self.config
        rec = self.forward(x)
        n = len(rec.layers)
        if n == 0:
            raise TrainingError("the network has no enabled layers to tween")
        y = rec.acts[-1]
        onehot = self.onehot(labels, self.output_size)
        g_top, loss = self._output_error(y, onehot)
        top_target = xp.reshape(fit_width(xp, self.backend, onehot, flat2(xp, y).shape[1]),
                                y.shape)
        rec.targets[n] = top_target
        if cfg.use_chain_rule:
            self._chain_backward(rec, g_top)
        else:
            self._legacy_backward(rec, top_target)
        if self.record or not cfg.use_chain_rule or cfg.explosion_detection or \
                cfg.prune_enabled:
            self._link(rec)
        if cfg.prune_enabled and not self.record:
            self._tally_budgets(rec)
        mult = self._rate_multiplier(rec)
        rows = []
        for l, (_, layer) in enumerate(rec.layers):
            x_l, y_l = rec.acts[l], rec.acts[l + 1]
            hit = None
            if cfg.use_chain_rule:
                r = self._layer_rate(layer, l, n, rate, mult)
                g = rec.chain[l + 1]
                if cfg.loom_compat:
                    ups, hit = loom_rules.chain_update(layer, x_l, y_l, g, r, cfg)
                else:
                    ups, hit = self._exact_updates(layer, r)
            else:
                b = rec.budgets[l]
                gate = xp.where(b >= cfg.ignore_threshold, xp.ones_like(b), 0.0)
                s = cfg.link_budget_scale
                r = rate * mult * (s + s * b) * gate * cfg.type_rate(layer.type_name)
                gap = rec.targets[l + 1] - y_l
                ups = loom_rules.legacy_update(layer, x_l, y_l, gap, r, cfg)
            self._apply(ups)
            if self.record:
                rows.append(self._row(rec, l, r, hit))
        if self.record:
            self._record(rec, loss, rows)
        self.last = rec
        self.steps += 1
        return loss

    def _link(self, rec: StepRecord) -> None:
        for l in range(len(rec.layers)):
            gap, budget = link_metrics(self.xp, rec.acts[l + 1], rec.targets[l + 1])
            rec.gaps.append(gap)
            rec.budgets.append(budget)

    def _tally_budgets(self, rec: StepRecord) -> None:
        """Add this step's link budgets ``[L]`` to the epoch tally (device; no sync)."""
        ids = tuple(i for i, _ in rec.layers)
        budgets = self.xp.stack(rec.budgets)
        tally = self._budget_tally
        if tally is None or tally[0] != ids:  # the enabled layers changed: count afresh
            self._budget_tally = [ids, budgets, 1]
        else:
            tally[1] = tally[1] + budgets
            tally[2] += 1

    def epoch_budgets(self, summary: dict) -> dict[int, float]:
        """Epoch-mean link budget of each layer (flat index → budget) for pruning: from the
        telemetry ``summary`` when recording, else from the device tally (one host copy)."""
        if self.record:
            return dict(zip(summary["layers"], summary["per_layer"]["budget"], strict=False))
        tally, self._budget_tally = self._budget_tally, None
        if tally is None:
            return {}
        means = self.backend.to_host(tally[1] / tally[2]).tolist()
        return dict(zip(tally[0], means, strict=False))

    def _rate_multiplier(self, rec: StepRecord):
        if not self.config.explosion_detection:
            return 1.0
        return self.adaptive.update(self.xp.mean(self.xp.stack(rec.gaps)))

    def _row(self, rec: StepRecord, l: int, r, hit) -> list:
        xp, b = self.xp, self.backend
        g = rec.chain[l + 1]
        if g is None:
            g = rec.targets[l + 1] - rec.acts[l + 1]
        zero = b.scalar(0.0)
        return [rec.gaps[l], rec.budgets[l], norm(xp, g), norm(xp, rec.targets[l + 1]),
                zero if hit is None else hit, r + zero if not b.is_array(r) else r]

    def _record(self, rec: StepRecord, loss: Array, rows: list[list]) -> None:
        xp = self.xp
        table = xp.stack([xp.stack([xp.reshape(row[k], ()) for row in rows])
                          for k in range(len(METRICS))])
        self.telemetry.record(loss, table, tuple(i for i, _ in rec.layers))

    # ------------------------------------------------------------------ batch API (Loom's)
    def reset_batch(self) -> None:
        """Forget the accumulated batch (Loom's ``ResetBatch``)."""
        self._batch = None

    def accumulate(self, x: Array, labels) -> Array:
        """Loom's ``TweenStepAccumulate``: backward and telemetry without touching weights.

        Faithful mode keeps summed gaps ``target − activation`` per layer and the last sample's
        activations; fixed mode keeps the samples, so :meth:`apply_batch` takes one :meth:`step`
        on all of them at the weights they were seen with (the update of their mean gradient,
        clipped after averaging). Returns the loss (0-d)."""
        xp, cfg = self.xp, self.config
        if not cfg.loom_compat:
            b = self._batch or {"x": [], "labels": [], "count": 0}
            if not self.backend.is_array(labels):
                labels = self.backend.asarray(list(labels), dtype=xp.int64)
            b["x"].append(x)
            b["labels"].append(labels)
            b["count"] += x.shape[0]
            self._batch = b
            rec = self.forward(x)
            onehot = self.onehot(labels, self.output_size)
            return self._output_error(rec.acts[-1], onehot)[1]
        rec = self.forward(x)
        n = len(rec.layers)
        y = rec.acts[-1]
        onehot = self.onehot(labels, self.output_size)
        g_top, loss = self._output_error(y, onehot)
        rec.targets[n] = xp.reshape(fit_width(xp, self.backend, onehot, flat2(xp, y).shape[1]),
                                    y.shape)
        if cfg.use_chain_rule:
            self._chain_backward(rec, g_top)
        else:
            self._legacy_backward(rec, rec.targets[n])
        self._link(rec)
        b = self._batch
        if b is None or len(b["gaps"]) != n:
            b = {"gaps": [None] * n, "count": 0}
        for l in range(n):
            d = xp.sum(rec.targets[l + 1] - rec.acts[l + 1], axis=0)
            b["gaps"][l] = d if b["gaps"][l] is None else b["gaps"][l] + d
        b["count"] += x.shape[0]
        b["last"] = rec
        self._batch = b
        self.steps += 1
        return loss

    def apply_batch(self, rate: float) -> None:
        """Loom's ``TweenBatchApply``: one update from the accumulated batch, then reset."""
        b, cfg, xp = self._batch, self.config, self.xp
        if b is None or b["count"] == 0:
            return
        self._batch = None
        if not cfg.loom_compat:
            self.step(xp.concat(b["x"], axis=0), xp.concat(b["labels"], axis=0), rate)
            return
        rec: StepRecord = b["last"]
        n = len(rec.layers)
        rows = []
        for l, (_, layer) in enumerate(rec.layers):
            last = slice(rec.acts[l].shape[0] - 1, None)
            x_l, y_l = rec.acts[l][last, ...], rec.acts[l + 1][last, ...]
            avg = xp.reshape(b["gaps"][l] / b["count"], (1, *y_l.shape[1:]))
            budget = rec.budgets[l]
            gate = xp.where(budget >= cfg.ignore_threshold, xp.ones_like(budget), 0.0)
            if cfg.use_chain_rule:
                r = self._layer_rate(layer, l, n, rate, 1.0) * gate
                ups, hit = loom_rules.chain_update(layer, x_l, y_l, avg, r, cfg)
            else:
                s = cfg.link_budget_scale
                r = rate * (s + s * budget) * cfg.type_rate(layer.type_name) * gate
                ups, hit = loom_rules.legacy_update(layer, x_l, y_l, avg, r, cfg), None
            self._apply(ups)
            if self.record:
                rows.append(self._row(rec, l, r, hit))
        if self.record:
            self._record(rec, self.backend.scalar(0.0), rows)

    def batch_step(self, x: Array, labels, rate: float) -> Array:
        """Loom's ``TweenBatch``: reset, accumulate every sample of ``x``, apply."""
        self.reset_batch()
        if self.config.loom_compat:
            losses = [self.accumulate(x[i:i + 1, ...], _take(self, labels, i))
                      for i in range(x.shape[0])]
            loss = self.xp.mean(self.xp.stack(losses))
        else:
            loss = self.accumulate(x, labels)
        self.apply_batch(rate)
        return loss

    # ------------------------------------------------------------------ evaluation and fit
    def predict(self, x: Array) -> Array:
        """Argmax class of the first ``output_size`` outputs, int ``[B]``."""
        y = self.forward(x, train=False).acts[-1]
        return self.xp.argmax(flat2(self.xp, y)[:, :self.output_size], axis=1)

    def evaluate(self, x: Array, labels) -> dict[str, Array]:
        """``{"accuracy", "score"}`` as 0-d device arrays; ``score`` is Loom's deviation score
        (partial credit ``max(0, 100 − |pred − exp|/|exp|·100)``, in percent)."""
        xp, b = self.xp, self.backend
        if not b.is_array(labels):
            labels = b.asarray(list(labels), dtype=xp.int64)
        pred = self.predict(x)
        acc = xp.mean(xp.astype(pred == labels, b.float_dtype))
        p = xp.astype(pred, b.float_dtype)
        e = xp.astype(labels, b.float_dtype)
        dev = xp.where(e != 0, xp.abs(p - e) / xp.where(e != 0, xp.abs(e), 1.0), xp.abs(p - e))
        score = xp.mean(xp.maximum(100.0 - 100.0 * dev, b.scalar(0.0)))
        return {"accuracy": acc, "score": score}

    def _check_labels(self, labels: Array, what: str) -> None:
        """Refuse labels outside ``[0, output_size)`` (one host copy of two numbers): the
        one-hot target of such a label would be all zeros."""
        xp = self.xp
        lo, hi = self.backend.to_host(xp.stack([xp.min(labels), xp.max(labels)])).tolist()
        if lo < 0 or hi >= self.output_size:
            raise LoomxError(f"{what} lie in [{lo}, {hi}] but the trainer reads "
                             f"{self.output_size} classes, so labels must lie in "
                             f"[0, {self.output_size - 1}]")

    def save_best(self) -> None:
        """Keep what :meth:`restore_best` needs to rebuild the network as it is now.

        ``best_state = {"params": {(id(layer), key): copy}, "layers": {slot: (layer,
        disabled)}}``: a copy of every parameter of every layer (Loom kept Dense/Conv only),
        and every occupied slot's layer with its ``disabled`` flag. Holding the layers keeps
        a layer that pruning later removes (and its ``id``) alive, so it can be put back.
        """
        params = {(id(ref.layer), ref.key): self.xp.asarray(ref.value, copy=True)
                  for ref in self.net.parameters()}
        layers = {i: (layer, bool(layer.disabled)) for i, layer in self.net.layers()}
        self.best_state = {"params": params, "layers": layers}

    def restore_best(self) -> None:
        """Restore the network saved by :meth:`save_best` (no-op if none): the ``disabled``
        flags, every parameter, and any layer that pruning removed after the save while it
        was enabled (it goes back into its slot; one disabled at the save stays out, since a
        disabled layer is the identity, as is an empty slot)."""
        if self.best_state is None:
            return
        slots = self.net.slots
        for i, (layer, disabled) in self.best_state["layers"].items():
            if slots[i] is None and not disabled:
                slots[i] = layer
                if i in self.removed:
                    self.removed.remove(i)
            if slots[i] is layer and bool(layer.disabled) != disabled:
                layer.disabled = disabled
                self.dead_epochs.pop(i, None)  # its pruning count restarts
        saved_params = self.best_state["params"]
        for ref in self.net.parameters():
            saved = saved_params.get((id(ref.layer), ref.key))
            if saved is not None:  # a copy: an optimizer may later update weights in place
                ref.value = self.xp.asarray(saved, copy=True)

    def fit(self, x: Array, labels, epochs: int, rate: float, *, batch_size: int = 1,
            eval_data: tuple[Array, Any] | None = None, metric: str = "score",
            callback: Callable[[dict], None] | None = None, verbose: bool = False,
            print_fn: Callable[[str], None] = print) -> list[dict]:
        """Loom's ``Train``: shuffled epochs of tween steps, evaluation every
        ``eval_frequency`` epochs (and the last), best-state restore, early stop when
        ``metric`` (``"score"`` or ``"accuracy"``, percent) reaches ``early_stop_threshold``,
        pruning when enabled. Returns the per-epoch summaries (means over the epoch's steps).

        Each call starts its own best: ``best_score`` and ``best_state`` are reset first, so
        the restore at the end puts back the best network of this call. At an evaluated epoch
        the best is saved before pruning acts, so it is the network that was evaluated
        (its ``disabled`` flags included, see :meth:`restore_best`).

        Raises:
            LoomxError: labels outside ``[0, output_size)`` (checked once, on entry).
        """
        from .pruning import prune_epoch

        if metric not in ("score", "accuracy"):
            raise ConfigError(f"fit metric must be 'score' or 'accuracy', got {metric!r}")
        xp, b, cfg = self.xp, self.backend, self.config
        if not b.is_array(labels):
            labels = b.asarray(list(labels), dtype=xp.int64)
        n = x.shape[0]
        ex, ey = eval_data if eval_data is not None else (x, labels)
        if not b.is_array(ey):
            ey = b.asarray(list(ey), dtype=xp.int64)
        self._check_labels(labels, "labels")
        if ey is not labels:
            self._check_labels(ey, "eval_data labels")
        self.best_score = -1.0
        self.best_state = None
        self._budget_tally = None
        summaries = []
        for epoch in range(1, epochs + 1):
            start = len(self.telemetry)
            self._budget_tally = None
            order = self.rng.permutation(n)
            for i in range(0, n, batch_size):
                idx = b.asarray(order[i:i + batch_size], dtype=xp.int64)
                self.step(xp.take(x, idx, axis=0), xp.take(labels, idx, axis=0), rate)
            extra = {}
            if epoch % cfg.eval_frequency == 0 or epoch == epochs:
                ev = self.evaluate(ex, ey)
                host = b.to_host(xp.stack([ev["accuracy"], ev["score"]])).tolist()
                extra = {"accuracy": 100.0 * host[0], "score": host[1]}
            summary = self.telemetry.epoch_summary(start, len(self.telemetry), epoch, extra)
            summaries.append(summary)
            # the best is the network just evaluated: saved before pruning changes it
            if extra and extra[metric] > self.best_score:
                self.best_score = extra[metric]
                self.save_best()
            if cfg.prune_enabled:
                for msg in prune_epoch(self, self.epoch_budgets(summary)):
                    if verbose:
                        print_fn(msg)
            if extra:
                value = extra[metric]
                if verbose:
                    print_fn(self.telemetry.console_line(summary, epochs, cfg.ignore_threshold))
                if callback is not None:
                    callback(summary)
                if value >= cfg.early_stop_threshold:
                    break
        self.restore_best()
        return summaries


def _take(trainer: TweenTrainer, labels, i: int):
    if trainer.backend.is_array(labels):
        return labels[i:i + 1]
    return [list(labels)[i]]
