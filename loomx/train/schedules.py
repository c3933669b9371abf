"""Loom's learning-rate schedules as stateless callables ``step → lr``.

``step`` counts optimizer updates from 0. Every schedule has ``get_config()`` and is rebuilt by
:func:`get_schedule` from that dict (checkpoints store it). A resumed ``fit`` given a schedule
object (a subclass of :class:`Schedule` included) keeps that object and hands it what its
``state_dict()`` saved (nothing, for the built-in schedules).

==========================  =======================================================
name                        lr(step)
==========================  =======================================================
constant                    lr
linear                      lr + (final_lr - lr)·s/T, then final_lr
cosine                      min_lr + (lr - min_lr)(1 + cos(π s/T))/2, then min_lr
cosine_restarts             cosine with progress (s mod P)/P
exponential                 lr·rate^(s/decay_steps)
step                        lr·factor^⌊s/step_size⌋
polynomial                  (lr - final_lr)(1 - s/T)^power + final_lr, then final_lr
warmup                      start_lr + (lr - start_lr)·s/W for s < W, then after(s - W)
==========================  =======================================================

Unlike Loom, schedules that need a horizon (linear, cosine, polynomial) refuse to be built
without one (``fit`` fills it in from epochs × steps per epoch), and a restart period of 0 is an
error rather than a division by zero.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError


class Schedule:
    """Base class: ``__call__(step) -> lr``; ``get_config()`` round-trips via get_schedule."""

    name = ""
    needs_total = False

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """State beyond the config that a resumed run needs (none for the built-in schedules,
        which depend on the step alone); ``fit`` checkpoints store it. JSON-serialisable."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (``fit`` calls it on the schedule passed to a
        resumed run)."""

    def get_config(self) -> dict:
        cfg = {"name": self.name}
        cfg.update({k: v for k, v in vars(self).items() if not k.startswith("_")})
        if isinstance(cfg.get("after"), Schedule):
            cfg["after"] = cfg["after"].get_config()
        return cfg

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _positive(label: str, v: float | int | None, schedule: str) -> None:
    if v is None or v <= 0:
        raise ConfigError(f"the {schedule} schedule needs {label} > 0, got {v}")


class Constant(Schedule):
    """``lr`` at every step."""

    name = "constant"

    def __init__(self, lr: float):
        self.lr = float(lr)

    def __call__(self, step: int) -> float:
        return self.lr


class LinearDecay(Schedule):
    """Linear from ``lr`` to ``final_lr`` over ``total_steps``; ``final_lr`` after."""

    name = "linear"
    needs_total = True

    def __init__(self, lr: float, total_steps: int, final_lr: float | None = None):
        _positive("total_steps", total_steps, self.name)
        self.lr, self.total_steps = float(lr), int(total_steps)
        self.final_lr = 0.01 * self.lr if final_lr is None else float(final_lr)

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return self.final_lr
        return self.lr + (self.final_lr - self.lr) * step / self.total_steps


class Cosine(Schedule):
    """Cosine annealing from ``lr`` to ``min_lr`` over ``total_steps``."""

    name = "cosine"
    needs_total = True

    def __init__(self, lr: float, total_steps: int, min_lr: float = 0.0):
        _positive("total_steps", total_steps, self.name)
        self.lr, self.total_steps, self.min_lr = float(lr), int(total_steps), float(min_lr)

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return self.min_lr
        progress = step / self.total_steps
        return self.min_lr + (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress)) / 2


class CosineRestarts(Schedule):
    """Cosine annealing restarted every ``period`` steps."""

    name = "cosine_restarts"

    def __init__(self, lr: float, period: int, min_lr: float = 0.0):
        _positive("period", period, self.name)
        self.lr, self.period, self.min_lr = float(lr), int(period), float(min_lr)

    def __call__(self, step: int) -> float:
        progress = (step % self.period) / self.period
        return self.min_lr + (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress)) / 2


class Exponential(Schedule):
    """``lr · rate^(step / decay_steps)`` (continuous exponent)."""

    name = "exponential"

    def __init__(self, lr: float, rate: float = 0.96, decay_steps: int = 1000):
        _positive("decay_steps", decay_steps, self.name)
        self.lr, self.rate, self.decay_steps = float(lr), float(rate), int(decay_steps)

    def __call__(self, step: int) -> float:
        return self.lr * self.rate ** (step / self.decay_steps)


class StepDecay(Schedule):
    """``lr · factor^⌊step / step_size⌋``."""

    name = "step"

    def __init__(self, lr: float, factor: float = 0.1, step_size: int = 10000):
        _positive("step_size", step_size, self.name)
        self.lr, self.factor, self.step_size = float(lr), float(factor), int(step_size)

    def __call__(self, step: int) -> float:
        return self.lr * self.factor ** (step // self.step_size)


class Polynomial(Schedule):
    """``(lr - final_lr)(1 - step/total_steps)^power + final_lr``; ``final_lr`` after."""

    name = "polynomial"
    needs_total = True

    def __init__(self, lr: float, total_steps: int, final_lr: float = 0.0, power: float = 1.0):
        _positive("total_steps", total_steps, self.name)
        self.lr, self.total_steps = float(lr), int(total_steps)
        self.final_lr, self.power = float(final_lr), float(power)

    def __call__(self, step: int) -> float:
        if step >= self.total_steps:
            return self.final_lr
        return (self.lr - self.final_lr) * (1.0 - step / self.total_steps) ** self.power \
            + self.final_lr


class Warmup(Schedule):
    """Linear warm-up from ``start_lr`` to ``lr`` over ``warmup_steps``, then ``after``
    (a schedule, evaluated at ``step - warmup_steps``) or constant ``lr``."""

    name = "warmup"

    def __init__(self, lr: float, warmup_steps: int, start_lr: float = 0.0,
                 after: Schedule | dict | None = None):
        _positive("warmup_steps", warmup_steps, self.name)
        self.lr, self.warmup_steps, self.start_lr = float(lr), int(warmup_steps), float(start_lr)
        self.after = get_schedule(after) if isinstance(after, dict) else after

    @property
    def needs_total(self) -> bool:  # type: ignore[override]
        return self.after is not None and self.after.needs_total

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_lr + (self.lr - self.start_lr) * step / self.warmup_steps
        if self.after is None:
            return self.lr
        return self.after(step - self.warmup_steps)


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (Constant, LinearDecay, Cosine, CosineRestarts, Exponential,
                              StepDecay, Polynomial, Warmup)}


def get_schedule(spec: Schedule | dict | str | None, lr: float | None = None,
                 total_steps: int | None = None) -> Schedule:
    """Build a schedule from a name, a config dict, or return the instance.

    ``lr`` and ``total_steps`` fill in missing ``lr`` / ``total_steps`` entries (and those of a
    warm-up's ``after`` schedule, whose horizon is ``total_steps - warmup_steps``).

    Example: ``get_schedule({"name": "warmup", "warmup_steps": 100,
    "after": {"name": "cosine"}}, lr=1e-3, total_steps=1000)``.
    """
    if isinstance(spec, Schedule):
        return spec
    if spec is None:
        spec = "constant"
    cfg: dict[str, Any] = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = str(cfg.pop("name", "")).lower()
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    if "lr" not in cfg:
        if lr is None:
            raise ConfigError(f"the {name} schedule needs lr")
        cfg["lr"] = lr
    if name != "warmup" and cls.needs_total and "total_steps" not in cfg:
        cfg["total_steps"] = total_steps
    if name == "warmup" and isinstance(cfg.get("after"), (dict, str)):
        after = cfg["after"]
        try:
            warmup = int(cfg["warmup_steps"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the warmup schedule needs warmup_steps (an integer > 0), got "
                              f"{cfg.get('warmup_steps')!r}") from exc
        rest = None if total_steps is None else max(1, total_steps - warmup)
        cfg["after"] = get_schedule(after, lr=cfg["lr"], total_steps=rest)
    try:
        return cls(**cfg)
    except TypeError as exc:
        raise ConfigError(f"bad options for the {name} schedule: {exc}") from exc
