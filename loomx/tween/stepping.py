"""Stepping tween modes: act through the stepping pipeline while training by tweening.

Built on :class:`loomx.grid.stepping.Stepper` (one tick advances every layer by one stage; the
output lags the input by ``depth − 1`` ticks). As in Loom, the "Step" changes only inference:
training calls the tween trainer, which runs its own full forward pass on the current sample.

=================  ==========================================================================
mode               training per tick
=================  ==========================================================================
step_tween         every ``tween_every``-th tick (Loom: 5) a tween step on the current sample.
                   With Loom's default config (chain rule on) this is *identical* to
                   ``tchain``; use ``use_chain_rule=False`` for the legacy algorithm the docs
                   name.
tchain             the same with the chain rule.
step_tween_chain   a tween step on every tick (tests 17–19).
step_batch         accumulate every tick, apply once ``batch`` samples are accumulated.
=================  ==========================================================================
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..grid.stepping import Stepper

Array = Any
STEP_MODES = ("step_tween", "tchain", "step_tween_chain", "step_batch")


class SteppingTween:
    """Drives a :class:`~loomx.tween.TweenTrainer` from a stepping pipeline.

    Args:
        trainer: the tween trainer (its network is the one stepped).
        mode: one of :data:`STEP_MODES`.
        tween_every: ticks between tween steps for ``step_tween`` / ``tchain``.
        batch: samples per apply for ``step_batch``.
    """

    def __init__(self, trainer, mode: str = "step_tween_chain", tween_every: int = 5,
                 batch: int = 32):
        if mode not in STEP_MODES:
            raise ConfigError(f"stepping tween mode must be one of {STEP_MODES}, got {mode!r}")
        self.trainer = trainer
        self.mode = mode
        self.tween_every = 1 if mode == "step_tween_chain" else int(tween_every)
        self.batch = int(batch)
        self.stepper = Stepper(trainer.net)
        self.ticks = 0

    def tick(self, x: Array, label, rate: float) -> Array:
        """Set ``x [1, ...]``, advance the pipeline one tick, train on ``(x, label)``.

        Returns the pipeline output after the tick (it reflects the input of ``depth − 1``
        ticks ago).
        """
        self.stepper.set_input(x)
        y = self.stepper.step()
        self.ticks += 1
        tr = self.trainer
        if self.mode == "step_batch":
            tr.accumulate(x, label)
            count = tr._batch["count"] if tr._batch else 0
            if count >= self.batch:
                tr.apply_batch(rate)
        elif self.ticks % self.tween_every == 0:
            tr.step(x, label, rate)
        return y

    def settle(self, x: Array, ticks: int | None = None) -> Array:
        """Hold ``x`` for ``ticks`` ticks (default ``depth + 2``, Loom's stepping evaluation)
        without training; returns the output."""
        self.stepper.set_input(x)
        for _ in range(self.stepper.depth + 2 if ticks is None else ticks):
            y = self.stepper.step()
        return y
