"""``TweenConfig``: every field of Loom's ``TweenConfig`` with its default, plus loomx's switches.

Loom's fields keep Loom's meaning (names in snake_case). Fields Loom declares but never reads
(``frontier_*``, ``batch_size``, ``attention_routing_rate``, ``attention_bias_rate``) are kept so
configs round-trip, and are no-ops here too. The loomx fields at the end choose the algorithm:

=====================  =======================================================================
``loom_compat``        True: reproduce Loom's per-layer approximations, consumer-side target
                       clamps, softplus derivative and last-sample batch pairing.
                       False (default): exact local gradients from each layer's own backward.
``use_chain_rule``     True (Loom's default): chain-rule tweening. False: Loom's legacy target
                       propagation (heuristic inverse + delta rule), reachable here.
``method``             ``"tween"`` (the two above) or ``"dtp"`` (difference target propagation).
``loss``               ``"sse"`` (Loom: ½‖y − onehot‖² on the output) or ``"softmax_ce"``.
``gradient_clip``      bound on the propagated descent directions (default 10); ``None`` or
                       ``inf``: no clip (``None`` is stored as ``inf``).
``update_clip``        bound on each parameter update element (default 1); ``None`` or ``inf``:
                       no clip.
=====================  =======================================================================
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError

METHODS = ("tween", "dtp")
LOSSES = ("sse", "softmax_ce")


@dataclass
class TweenConfig:
    """Neural Tweening hyper-parameters (Loom's ``DefaultTweenConfig`` values by default)."""

    # --- Loom fields (nn/tween.go:860-969); dead ones are marked "no-op"
    frontier_enabled: bool = True          # no-op
    frontier_min: int = -1                 # no-op (Loom resets it to L-1)
    frontier_threshold: float = 0.55       # no-op
    frontier_noise: float = 0.0            # no-op
    ignore_threshold: float = 0.2
    dense_rate: float = 1.0
    rnn_rate: float = 0.5
    lstm_rate: float = 0.5
    attention_rate: float = 0.2
    norm_rate: float = 0.1
    swiglu_rate: float = 0.2
    conv2d_rate: float = 0.1
    embedding_rate: float = 0.1
    conv1d_rate: float = 0.1
    momentum: float = 0.9
    bias_rate_multiplier: float = 0.1
    weight_rate_multiplier: float = 0.01
    tanh_clamp_min: float = -0.95
    tanh_clamp_max: float = 0.95
    sigmoid_clamp_min: float = 0.05
    sigmoid_clamp_max: float = 0.95
    relu_clamp_max: float = 10.0
    early_stop_threshold: float = 95.0
    eval_frequency: int = 5
    link_budget_scale: float = 0.5
    prune_enabled: bool = False
    prune_threshold: float = 0.1
    prune_patience: int = 10
    batch_size: int = 1                    # no-op (the batch is the array's leading axis)
    use_chain_rule: bool = True
    depth_scale_factor: float = 1.2
    gradient_scale: float = 0.1
    total_weight_threshold: float = 0.01
    relu_slope: float = 1.1
    leaky_relu_slope: float = 0.1
    derivative_epsilon: float = 0.01
    lstm_gate_scale: float = 0.25
    attention_routing_rate: float = 0.2    # no-op
    attention_bias_rate: float = 0.05      # no-op
    norm_beta_rate: float = 0.1
    norm_gamma_rate: float = 0.01
    explosion_detection: bool = False

    # --- loomx switches
    loom_compat: bool = False
    method: str = "tween"
    loss: str = "sse"
    depth_scaling: bool = True
    fanout_norm: bool = True
    gradient_clip: float = 10.0            # None: no clip (stored as inf)
    update_clip: float = 1.0               # None: no clip (stored as inf)
    dtp_inverse_rate: float = 0.05
    dtp_noise: float = 0.1
    dtp_top_rate: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"TweenConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"TweenConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"TweenConfig.momentum must be in [0, 1), got {self.momentum}")
        for name in ("gradient_clip", "update_clip"):
            v = getattr(self, name)
            if v is None:  # no clip: the bound that never binds
                setattr(self, name, math.inf)
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"TweenConfig.{name} must be a number > 0, or None (or inf) "
                                  f"for no clip, got {v!r}")
            else:
                setattr(self, name, float(v))
        if self.eval_frequency <= 0 or self.prune_patience <= 0:
            raise ConfigError("TweenConfig.eval_frequency and prune_patience must be positive, "
                              f"got {self.eval_frequency} and {self.prune_patience}")

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TweenConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TweenConfig fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def faithful(cls, **overrides) -> TweenConfig:
        """Loom's default config with ``loom_compat=True`` (reproduces the reference)."""
        return cls(loom_compat=True, **overrides)

    def type_rate(self, type_name: str) -> float:
        """Loom's per-layer-type rate multiplier for a loomx layer type name."""
        return {
            "dense": self.dense_rate, "rnn": self.rnn_rate, "gru": self.rnn_rate,
            "lstm": self.lstm_rate, "mha": self.attention_rate,
            "layer_norm": self.norm_rate, "rms_norm": self.norm_rate,
            "swiglu": self.swiglu_rate, "conv2d": self.conv2d_rate,
            "embedding": self.embedding_rate, "conv1d": self.conv1d_rate,
        }.get(type_name, self.dense_rate)
