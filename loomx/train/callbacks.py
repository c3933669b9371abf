"""Callbacks: hooks ``fit`` calls during training.

Subclass :class:`Callback` and override what you need. ``state`` is the live
:class:`~loomx.train.fit.FitState` (network, optimizer, step, epoch, history); set
``state.stop_training = True`` to end training after the current step. ``logs`` hold host
floats; they exist only at log intervals and epoch ends, the declared sync points.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Callback:
    """No-op hooks; override any of them."""

    def on_train_begin(self, state: Any) -> None:
        """Before the first step (also after resuming from a checkpoint)."""

    def on_step_end(self, state: Any) -> None:
        """After every optimizer update (no host values: keep this cheap)."""

    def on_log(self, state: Any, logs: dict[str, float]) -> None:
        """At every log interval: ``{"step", "epoch", "loss", "lr"}``."""

    def on_epoch_end(self, state: Any, logs: dict[str, float]) -> None:
        """After each epoch with that epoch's metrics (``loss``, ``val_loss``, ...)."""

    def on_train_end(self, state: Any) -> None:
        """After the last step, early stop included."""


class LambdaCallback(Callback):
    """A callback from plain functions, e.g. ``LambdaCallback(on_epoch_end=print_it)``."""

    def __init__(self, **hooks: Callable):
        unknown = set(hooks) - {n for n in vars(Callback) if n.startswith("on_")}
        if unknown:
            raise TypeError(f"unknown callback hooks {sorted(unknown)}")
        for name, fn in hooks.items():
            setattr(self, name, fn)


def as_callback(cb: Callback | Callable) -> Callback:
    """A :class:`Callback`; a plain callable becomes an ``on_epoch_end(state, logs)`` hook."""
    if isinstance(cb, Callback):
        return cb
    if callable(cb):
        return LambdaCallback(on_epoch_end=cb)
    raise TypeError(f"callbacks must be Callback objects or callables, got {type(cb)}")
