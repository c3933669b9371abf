"""Heatmaps of per-layer tweening telemetry over time (matplotlib, optional).

Loom's documentation promises a visualisation of the gaps between forward activations and
backward targets; its code only prints a link-budget bar. :func:`plot_heatmaps` draws one
heatmap per metric: rows are layers (grid flat indices), columns are steps (or epochs).
"""

from __future__ import annotations

import math

from ..errors import LoomxError
from .telemetry import METRICS, TweenTelemetry


def layer_matrix(telemetry: TweenTelemetry, metric: str, per_epoch: bool = False
                 ) -> tuple[list[int], list[list[float]]]:
    """``(layer ids, rows)``: ``rows[i][t]`` is ``metric`` of layer ``ids[i]`` at step (or
    epoch) ``t``; NaN where the layer was absent (pruned or not yet recorded)."""
    if metric not in METRICS:
        raise LoomxError(f"unknown telemetry metric {metric!r}; choose from {METRICS}")
    telemetry.flush()
    if per_epoch:
        cols = [(e["layers"], e["per_layer"][metric]) for e in telemetry.epochs]
    else:
        cols = list(zip(telemetry.layers, telemetry.history[metric], strict=True))
    ids = sorted({i for layers, _ in cols for i in layers})
    rows = [[math.nan] * len(cols) for _ in ids]
    pos = {i: k for k, i in enumerate(ids)}
    for t, (layers, values) in enumerate(cols):
        for i, v in zip(layers, values, strict=False):
            rows[pos[i]][t] = v
    return ids, rows


def plot_heatmaps(telemetry: TweenTelemetry, metrics: tuple[str, ...] = ("gap", "budget"),
                  per_epoch: bool = False, log_gap: bool = True, path: str | None = None):
    """One heatmap per metric (layers × time). Returns the matplotlib figure; saves it to
    ``path`` when given. Gaps are drawn on a log10 scale by default (they span decades)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise LoomxError("plotting needs matplotlib: pip install matplotlib") from exc
    fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 2.2 * len(metrics) + 0.6),
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        ids, rows = layer_matrix(telemetry, metric, per_epoch)
        label = metric
        if metric == "gap" and log_gap:
            rows = [[math.log10(v) if v > 0 else math.nan for v in r] for r in rows]
            label = "log10 gap"
        im = ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="viridis",
                       vmin=0.0 if metric == "budget" else None,
                       vmax=1.0 if metric == "budget" else None)
        ax.set_yticks(range(len(ids)), [str(i) for i in ids])
        ax.set_ylabel("layer")
        ax.set_title(label)
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("epoch" if per_epoch else "step")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
