"""The record ``fit`` returns: per-epoch metrics and per-log-interval losses."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class History:
    """Training record.

    Attributes:
        epochs: completed epoch numbers (0-based).
        metrics: ``{name: [value per epoch]}`` with ``loss``, ``accuracy`` (classification),
            ``lr`` (at the end of the epoch), and ``val_loss`` / ``val_accuracy`` when
            validating.
        log: one dict per log interval: ``{"step", "epoch", "loss", "lr"}``.
        stopped_epoch: epoch at which early stopping ended training (``None`` if it did not).
        best_epoch, best_value: the best monitored value and its epoch (early stopping).
        steps: optimizer updates made.
    """

    epochs: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    stopped_epoch: int | None = None
    best_epoch: int | None = None
    best_value: float | None = None
    steps: int = 0

    def __getitem__(self, name: str) -> list[float]:
        return self.metrics[name]

    def __contains__(self, name: str) -> bool:
        return name in self.metrics

    def append_epoch(self, epoch: int, values: dict[str, float]) -> None:
        """Record the metrics of one finished epoch."""
        self.epochs.append(epoch)
        for k, v in values.items():
            self.metrics.setdefault(k, []).append(v)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable form (checkpoints)."""
        return {"epochs": list(self.epochs), "metrics": {k: list(v) for k, v in
                                                         self.metrics.items()},
                "log": list(self.log), "stopped_epoch": self.stopped_epoch,
                "best_epoch": self.best_epoch, "best_value": self.best_value,
                "steps": self.steps}

    @classmethod
    def from_dict(cls, doc: dict) -> History:
        return cls(**doc)

    def __repr__(self) -> str:
        last = {k: round(v[-1], 5) for k, v in self.metrics.items() if v}
        return f"History(epochs={len(self.epochs)}, steps={self.steps}, last={last})"
