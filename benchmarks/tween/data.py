"""Loom's tweening benchmark data, re-generated with seeded numpy generators.

- :func:`clustered` — tests 13–15: 4 samples per class, features ``clip(c/3 + U(±0.15), 0, 1)``.
- :func:`quadrant` — test 16: ``x ~ U(−1, 1)^n``, class from the signs of ``x0·x1`` and
  ``x2·x3`` and of ``Σ_{j≥4} x_j``, then 10 % of labels replaced by a uniform class. Its prior
  is 48.3 / 25.8 / 25.8 % and the Bayes accuracy on fresh samples is 90 % + 10 %/3 = 93.3 %.
- :class:`ChaseAvoid` — tests 17–19: the chase/avoid environment (8-d observation, cyclic
  tiling to wider inputs, agent speed 0.02, target random walk ±0.005 clamped to [0.1, 0.9]).
"""

from __future__ import annotations

import numpy as np


def clustered(n_features: int, rng: np.random.Generator, per_class: int = 4
              ) -> tuple[np.ndarray, np.ndarray]:
    """Tests 13–15: ``3·per_class`` samples ``[N, n_features]`` and labels ``[N]``."""
    labels = np.repeat(np.arange(3), per_class)
    x = np.clip(labels[:, None] / 3.0 + rng.uniform(-0.15, 0.15, (len(labels), n_features)),
                0.0, 1.0)
    return x.astype(np.float32), labels


def quadrant_rule(x: np.ndarray) -> np.ndarray:
    """The noiseless test-16 class of each row of ``x`` (the Bayes-optimal prediction)."""
    q = (x[:, 0] * x[:, 1] > 0).astype(int) + 2 * (x[:, 2] * x[:, 3] > 0).astype(int)
    if x.shape[1] > 4:
        q = np.where(x[:, 4:].sum(axis=1) > 0, (q + 1) % 4, q)
    return q % 3


def quadrant(n: int, n_features: int, rng: np.random.Generator, noise: float = 0.1
             ) -> tuple[np.ndarray, np.ndarray]:
    """Test 16: ``n`` samples ``[n, n_features]`` with 10 % uniform label noise."""
    x = rng.uniform(-1.0, 1.0, (n, n_features))
    y = quadrant_rule(x)
    flip = rng.random(n) < noise
    y = np.where(flip, rng.integers(0, 3, n), y)
    return x.astype(np.float32), y


CHASE, AVOID = 0, 1
UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3
_OPPOSITE = {UP: DOWN, DOWN: UP, LEFT: RIGHT, RIGHT: LEFT}
_MOVES = {UP: (0.0, 1.0), DOWN: (0.0, -1.0), LEFT: (-1.0, 0.0), RIGHT: (1.0, 0.0)}


class ChaseAvoid:
    """The test 17–19 environment. ``observe()`` → ``[width]``; ``optimal()`` → action."""

    def __init__(self, rng: np.random.Generator, width: int = 8):
        self.rng = rng
        self.width = width
        self.agent = np.array([0.5, 0.5])
        self.target = rng.random(2)
        self.task = CHASE

    def observe(self) -> np.ndarray:
        ax, ay = self.agent
        tx, ty = self.target
        rx, ry = tx - ax, ty - ay
        base = np.array([ax, ay, tx, ty, rx, ry, np.hypot(rx, ry), float(self.task)])
        return np.resize(base, self.width).astype(np.float32)

    def optimal(self) -> int:
        rx, ry = self.target - self.agent
        if abs(rx) > abs(ry):
            a = RIGHT if rx > 0 else LEFT
        else:
            a = UP if ry > 0 else DOWN
        return a if self.task == CHASE else _OPPOSITE[a]

    def act(self, action: int) -> None:
        dx, dy = _MOVES[int(action)]
        self.agent = np.clip(self.agent + 0.02 * np.array([dx, dy]), 0.0, 1.0)
        self.target = np.clip(self.target + self.rng.uniform(-0.005, 0.005, 2), 0.1, 0.9)
