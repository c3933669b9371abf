"""Per-step, per-layer tweening telemetry: device values in, host histories out once per interval.

Every tween step records, for each active layer, the metrics in :data:`METRICS` as 0-d device
arrays (stacked into one ``[len(METRICS), L]`` array). Nothing reaches the host until
:meth:`TweenTelemetry.flush`, which runs once per ``log_interval`` steps (one copy for all the
pending steps). Host histories are plain Python lists, so they can be plotted or dumped to JSON.

Metrics per layer l (``a`` = the layer output, ``t`` = its backward target):

==============  =========================================================================
gap             mean of ``(a − t)²`` (Loom's MSE gap)
budget          batch mean of ``(cos(a, t) + 1)/2`` (0.5 when either norm² ≤ 0.001)
grad_norm       ‖g‖ of the descent direction on the layer output
target_norm     ‖t‖ of the backward target of the layer output
clip_hit        fraction of update (or propagated) elements that hit a clip
rate            effective rate ``η·A·TypeRate·ds`` (× ``(s + s·budget)`` in legacy mode)
==============  =========================================================================

The depth barrier is the cumulative product of budgets (computed on the host).
"""

from __future__ import annotations

import json
import math
from typing import Any

METRICS = ("gap", "budget", "grad_norm", "target_norm", "clip_hit", "rate")
HEAT_GLYPHS = ((0.8, "█"), (0.6, "▓"), (0.4, "▒"), (0.2, "░"))


def heat_bar(budgets: list[float], ignore_threshold: float = 0.2) -> str:
    """Loom's link-budget heat bar: one glyph per layer (X below ``ignore_threshold``)."""
    out = []
    for b in budgets:
        if b < ignore_threshold:
            out.append("X")
            continue
        out.append(next((g for lim, g in HEAT_GLYPHS if b > lim), "·"))
    return "".join(out)


def depth_barrier(budgets: list[float]) -> list[float]:
    """Cumulative product of budgets: ``barrier_l = Π_{k≤l} budget_k``."""
    out, p = [], 1.0
    for b in budgets:
        p *= b
        out.append(p)
    return out


def _mean_columns(rows: list[list[float]]) -> list[float]:
    if not rows:
        return []
    width = min(len(r) for r in rows)
    return [sum(r[j] for r in rows) / len(rows) for j in range(width)]


class TweenTelemetry:
    """Buffers per-step device metrics and keeps host histories.

    Attributes (host, filled by :meth:`flush`):
        loss: loss per step.
        history: ``{metric: [[value per layer] per step]}``.
        layers: flat grid indices of the layers of each step (changes when layers are pruned).
        epochs: per-epoch aggregate dicts (see :meth:`epoch_summary`).
    """

    def __init__(self, backend, log_interval: int = 50):
        self.backend = backend
        self.log_interval = max(1, int(log_interval))
        self._pending: list[tuple[Any, Any, tuple[int, ...]]] = []
        self.loss: list[float] = []
        self.history: dict[str, list[list[float]]] = {m: [] for m in METRICS}
        self.layers: list[tuple[int, ...]] = []
        self.epochs: list[dict] = []

    def __len__(self) -> int:
        return len(self.loss) + len(self._pending)

    def record(self, loss, table, layer_ids: tuple[int, ...]) -> None:
        """Queue one step: ``loss`` 0-d and ``table [len(METRICS), L]`` device arrays."""
        self._pending.append((loss, table, tuple(layer_ids)))
        if len(self._pending) >= self.log_interval:
            self.flush()

    def flush(self) -> None:
        """Copy every pending step to the host in one transfer."""
        if not self._pending:
            return
        xp = self.backend.xp
        flat = xp.concat([xp.concat([xp.reshape(loss, (1,)), xp.reshape(table, (-1,))])
                          for loss, table, _ in self._pending])
        host = self.backend.to_host(flat).tolist()
        pos = 0
        for _, _, ids in self._pending:
            n = len(ids)
            self.loss.append(host[pos])
            pos += 1
            for m in METRICS:
                self.history[m].append(host[pos:pos + n])
                pos += n
            self.layers.append(ids)
        self._pending.clear()

    def last(self, metric: str) -> list[float]:
        """The most recent per-layer values of ``metric`` (flushes first)."""
        self.flush()
        return self.history[metric][-1] if self.history[metric] else []

    def epoch_summary(self, start: int, stop: int, epoch: int, extra: dict | None = None
                      ) -> dict:
        """Means over steps ``[start, stop)`` (flushes first) and Loom's epoch-metric fields."""
        self.flush()
        means = {m: _mean_columns(self.history[m][start:stop]) for m in METRICS}
        budgets, gaps = means["budget"], means["gap"]
        losses = self.loss[start:stop]
        bottleneck = min(range(len(budgets)), key=budgets.__getitem__) if budgets else -1
        summary = {
            "epoch": epoch,
            "avg_loss": sum(losses) / len(losses) if losses else math.nan,
            "avg_link_budget": sum(budgets) / len(budgets) if budgets else math.nan,
            "min_link_budget": min(budgets) if budgets else math.nan,
            "max_link_budget": max(budgets) if budgets else math.nan,
            "avg_gap": sum(gaps) / len(gaps) if gaps else math.nan,
            "max_gap": max(gaps) if gaps else math.nan,
            "depth_barrier": depth_barrier(budgets)[-1] if budgets else math.nan,
            "bottleneck_layer": bottleneck,
            "layers": list(self.layers[stop - 1]) if stop > start else [],
            "per_layer": means,
        }
        if extra:
            summary.update(extra)
        self.epochs.append(summary)
        return summary

    def console_line(self, summary: dict, total_epochs: int, ignore_threshold: float = 0.2
                     ) -> str:
        """Loom's verbose line: epoch, loss, score, budget avg (min @ layer), gap, barrier, bar."""
        score = summary.get("score")
        score_txt = f" | Score {score:5.1f}%" if score is not None else ""
        return (f"Epoch {summary['epoch']}/{total_epochs} | Loss {summary['avg_loss']:.4f}"
                f"{score_txt} | LinkBudget {summary['avg_link_budget']:.3f} "
                f"(min {summary['min_link_budget']:.3f} @L{summary['bottleneck_layer']}) | "
                f"Gap {summary['avg_gap']:.4g} | DepthBarrier {summary['depth_barrier']:.3f} | "
                f"[{heat_bar(summary['per_layer']['budget'], ignore_threshold)}]")

    def to_loom_json(self, config: dict | None = None) -> dict:
        """Loom's ``TweenState`` histories and ``TweenEpochMetrics`` (Loom's field names),
        plus loomx's per-step per-layer histories."""
        self.flush()
        metrics = [{
            "Epoch": e["epoch"], "AvgLoss": e["avg_loss"], "Score": e.get("score", 0.0),
            "AvgLinkBudget": e["avg_link_budget"], "MinLinkBudget": e["min_link_budget"],
            "MaxLinkBudget": e["max_link_budget"], "AvgGap": e["avg_gap"],
            "MaxGap": e["max_gap"], "DepthBarrier": e["depth_barrier"],
            "BottleneckLayer": e["bottleneck_layer"]} for e in self.epochs]
        return {
            "EpochMetrics": metrics,
            "LossHistory": [e["avg_loss"] for e in self.epochs],
            "LinkBudgetHistory": [e["per_layer"]["budget"] for e in self.epochs],
            "GapHistory": [e["per_layer"]["gap"] for e in self.epochs],
            "DepthBarrierHistory": [e["depth_barrier"] for e in self.epochs],
            "steps": {"loss": self.loss, "layers": [list(ids) for ids in self.layers],
                      **self.history},
            "config": config or {},
        }

    def save_json(self, path: str, config: dict | None = None) -> None:
        """Write :meth:`to_loom_json` to ``path``."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_loom_json(config), fh)
