"""Sparse mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE), inference only.

``x [B, ..., D]`` → ``y [B, ..., D]``. Per token ``t`` with router probabilities
``p = softmax(x Wᵣᵀ)`` over ``E`` experts, the ``k`` largest are kept (``S`` = their indices)::

    w_e = p_e / Σ_{j∈S} p_j  for e ∈ S (renormalised; plain p_e with normalize_topk=False), else 0
    y   = Σ_e w_e · expert_e(x)  (+ σ(x w_sᵀ) · shared(x))

Every expert is a gated MLP ``down_e(act(gate_e(x)) ⊙ up_e(x))`` (SwiGLU). The block computes
**every expert for every token** with one batched matmul and combines them with the dense
``[N, E]`` weight matrix ``w`` (zero outside the top-k): no data-dependent shapes, exact, and
cheap for small models (the cost is ``E/k`` times that of a sparse dispatch).
"""

from __future__ import annotations

from ..backends import RandomSource
from ..errors import ConfigError, LoomxError
from .activations import get_activation, sigmoid
from .base import Array, Layer, Shape, config_int, register_layer
from .init import init_weight
from .softmax import softmax


@register_layer
class MoE(Layer):
    """Top-k routed mixture of SwiGLU experts with an optional gated shared expert.

    Shapes: ``x [B, ..., D]`` → ``y [B, ..., D]``; ``E = num_experts``, ``M = hidden_features``,
    ``S = shared_hidden_features``.
    Parameters: ``router_weight [E, D]``, ``gate_weight [E, M, D]``, ``up_weight [E, M, D]``,
    ``down_weight [E, D, M]``; with a shared expert also ``shared_expert_gate_weight [S, D]``,
    ``shared_expert_up_weight [S, D]``, ``shared_expert_down_weight [D, S]`` and its sigmoid
    gate ``shared_gate_weight [1, D]``. Weights use the PyTorch ``[out, in]`` layout per expert.

    Args:
        num_experts: ``E``.
        top_k: experts mixed per token (``num_experts_per_tok``).
        hidden_features: ``M``, the width of each expert.
        activation: the experts' gate activation (any :mod:`loomx.layers.activations` name).
        normalize_topk: renormalise the kept probabilities to sum to 1 (Mixtral: always;
            Qwen2-MoE: its ``norm_topk_prob`` flag).
        shared_hidden_features: ``S``; adds a shared expert that every token passes through,
            scaled by ``σ(x w_sᵀ)`` (Qwen2-MoE). ``None``: no shared expert.

    ``backward`` raises: this block is for inference (loaded checkpoints).
    """

    type_name = "moe"
    config_fields = ("num_experts", "top_k", "hidden_features", "activation", "normalize_topk",
                     "shared_hidden_features")

    def __init__(self, num_experts: int, top_k: int, hidden_features: int,
                 activation: str = "silu", normalize_topk: bool = True,
                 shared_hidden_features: int | None = None, **kw):
        super().__init__(**kw)
        self.num_experts = config_int(num_experts, "num_experts", "MoE")
        self.hidden_features = config_int(hidden_features, "hidden_features", "MoE")
        self.top_k = config_int(top_k, "top_k", "MoE")
        if self.top_k > self.num_experts:
            raise ConfigError(f"MoE top_k must be in 1..num_experts={num_experts}, got {top_k}")
        self.shared_hidden_features = config_int(shared_hidden_features,
                                                 "shared_hidden_features", "MoE", optional=True)
        self.activation = activation
        self.normalize_topk = bool(normalize_topk)
        self._act = get_activation(activation)
        self.features: int | None = None

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        self.features = d = self.last_axis_size(input_shape)
        e, m, s, dt = self.num_experts, self.hidden_features, self.shared_hidden_features, \
            self.float_dtype
        shapes = {"router_weight": ((e, d), d), "gate_weight": ((e, m, d), d),
                  "up_weight": ((e, m, d), d), "down_weight": ((e, d, m), m)}
        if s is not None:
            shapes.update(shared_expert_gate_weight=((s, d), d),
                          shared_expert_up_weight=((s, d), d),
                          shared_expert_down_weight=((d, s), s), shared_gate_weight=((1, d), d))
        for name, (shape, fan_in) in shapes.items():
            self.params[name] = init_weight(rng, "torch", shape, fan_in, shape[-2], dt)
        return input_shape

    def check_input(self, x: Array) -> None:
        self.check_last_axis(x, self.features)

    def routing_weights(self, x2: Array) -> Array:
        """``x2 [N, D]`` → the dense mixing weights ``[N, E]`` (zero outside each top-k).

        Raises :class:`~loomx.errors.ShapeError` unless ``x2`` is a real floating
        ``[N, D]`` (any number of leading axes is accepted: ``[..., D]`` → ``[..., E]``).
        """
        self.check_last_axis(x2, self.features)
        return self._route(x2)

    def _route(self, x2: Array) -> Array:
        """:meth:`routing_weights` without the input check (the forward checked ``x``)."""
        xp = self.xp
        p = softmax(xp, xp.matmul(x2, xp.matrix_transpose(self.params["router_weight"])))
        order = xp.argsort(p, axis=-1, descending=True, stable=True)
        rank = xp.argsort(order, axis=-1, stable=True)  # rank of each expert per token
        w = xp.where(rank < self.top_k, p, 0.0)
        if self.normalize_topk:
            w = w / xp.sum(w, axis=-1, keepdims=True)
        return w

    def _gated(self, h: Array, gate: Array, up: Array, down: Array) -> Array:
        xp = self.xp
        g = xp.matmul(h, xp.matrix_transpose(gate))
        u = xp.matmul(h, xp.matrix_transpose(up))
        if self._act.name == "silu":
            a = g * sigmoid(xp, g)
        else:
            a = self._act.forward(self.backend, g)
        return xp.matmul(a * u, xp.matrix_transpose(down))

    def forward(self, x: Array, train: bool = False) -> tuple[Array, tuple]:
        self.check_input(x)
        xp, p = self.xp, self.params
        lead = tuple(x.shape[:-1])
        x2 = xp.reshape(x, (-1, self.features))
        w = self._route(x2)  # [N, E]
        out = self._gated(x2[None, ...], p["gate_weight"], p["up_weight"], p["down_weight"])
        y = xp.sum(xp.permute_dims(w, (1, 0))[..., None] * out, axis=0)  # [N, D]
        if self.shared_hidden_features is not None:
            sh = self._gated(x2, p["shared_expert_gate_weight"], p["shared_expert_up_weight"],
                             p["shared_expert_down_weight"])
            y = y + sigmoid(xp, xp.matmul(x2, xp.matrix_transpose(p["shared_gate_weight"]))) * sh
        return xp.reshape(y, (*lead, self.features)), ()

    def backward(self, dy: Array, ctx: tuple) -> Array:
        raise LoomxError("MoE supports inference only: backward is not implemented; "
                         "freeze or remove the MoE block to train the rest of the model")
