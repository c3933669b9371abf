"""Weight initialisation schemes (documented, seeded, backend-independent).

=================  ===========================================================
scheme             distribution
=================  ===========================================================
``he``             N(0, sqrt(2 / fan_in))  (Loom's ``Init*Layer`` for Dense/Conv)
``xavier``         N(0, sqrt(2 / (fan_in + fan_out)))  (Loom's RNN/LSTM)
``xavier_uniform`` U(±sqrt(6 / (fan_in + fan_out)))
``torch``          U(±1/sqrt(fan_in))  (PyTorch's ``nn.Linear`` default)
``loom_uniform``   U(-1, 1) / fan_in   (Loom's ``InitializeWeights``)
``normal``         N(0, 0.02)  (transformer convention)
``zeros``          0
=================  ===========================================================
"""

from __future__ import annotations

import math
from typing import Any

from ..backends import RandomSource
from ..errors import ConfigError

INIT_SCHEMES = ("he", "xavier", "xavier_uniform", "torch", "loom_uniform", "normal", "zeros")


def init_weight(rng: RandomSource, scheme: str, shape: tuple[int, ...], fan_in: int,
                fan_out: int, dtype: Any) -> Any:
    """Draw a weight array of ``shape`` and ``dtype`` on ``rng``'s backend with ``scheme``."""
    if scheme == "he":
        return rng.normal(shape, std=math.sqrt(2.0 / fan_in), dtype=dtype)
    if scheme == "xavier":
        return rng.normal(shape, std=math.sqrt(2.0 / (fan_in + fan_out)), dtype=dtype)
    if scheme == "xavier_uniform":
        a = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(shape, -a, a, dtype=dtype)
    if scheme == "torch":
        a = 1.0 / math.sqrt(fan_in)
        return rng.uniform(shape, -a, a, dtype=dtype)
    if scheme == "loom_uniform":
        return rng.uniform(shape, -1.0 / fan_in, 1.0 / fan_in, dtype=dtype)
    if scheme == "normal":
        return rng.normal(shape, std=0.02, dtype=dtype)
    if scheme == "zeros":
        return rng.backend.zeros(shape, dtype=dtype)
    raise ConfigError(f"unknown init scheme {scheme!r}; known: {', '.join(INIT_SCHEMES)}")
