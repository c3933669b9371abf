"""Architectures of Loom's tests 13–19, faithful (Loom's harness bugs) or fixed.

Faithful harness: Loom's test files build attention with ``HeadDim`` unset (0) and LayerNorm
with ``NormSize`` unset (0). Loom's forward pass then outputs the attention output bias alone
and all-zero norms: those networks cannot depend on their input. :class:`HeadDim0Attention`
and :class:`NormSize0LayerNorm` reproduce exactly that behaviour (same parameters, same Loom
tweening rules, input-independent outputs). The fixed harness uses loomx's real
``MultiHeadAttention`` (head_dim = d/heads) and ``LayerNorm``.

Loom counts ``N`` layers; loomx adds parameter-free ``Reshape``/``Flatten`` slots where Loom
reinterprets flat vectors (around RNN/LSTM and after Conv2D).
"""

from __future__ import annotations

import math

import loomx
from loomx.layers import (
    LSTM,
    RNN,
    Conv2D,
    Dense,
    Flatten,
    LayerNorm,
    MultiHeadAttention,
    Reshape,
    SwiGLU,
)
from loomx.layers.base import Layer

LEAKY = "loom_leaky_relu"
HIDDEN = (64, 48, 32, 24, 16)
ARCHS = ("Dense", "Conv2D", "RNN", "LSTM", "Attn", "Norm", "SwiGLU")



class HeadDim0Attention(Layer):
    """Loom's MHA with ``HeadDim = 0``: output = the output bias, whatever the input.

    Holds Loom's parameters (``q/k/v/o_weight [D, D]``, ``o_bias [D]``) so Loom's tweening
    rules update them exactly as in the reference; the exact backward is ``dx = 0``.
    """

    type_name = "mha"

    def __init__(self, num_heads: int = 4, **kw):
        super().__init__(**kw)
        self.num_heads = num_heads

    def _build(self, input_shape, rng):
        d = input_shape[-1]
        dt = self.float_dtype
        for key, scale in (("q_weight", 0.1 / 4), ("k_weight", 0.1 / 4), ("v_weight", 0.1 / 4),
                           ("o_weight", 0.1 / 8)):
            self.params[key] = rng.uniform((d, d), -scale, scale, dtype=dt)
        self.params["o_bias"] = self.backend.zeros((d,), dtype=dt)
        return input_shape

    def forward(self, x, train=False):
        xp = self.xp
        return xp.zeros_like(x) + self.params["o_bias"], x.shape

    def backward(self, dy, ctx):
        xp = self.xp
        self._accumulate("o_bias", xp.sum(xp.reshape(dy, (-1, dy.shape[-1])), axis=0))
        return xp.zeros_like(dy)


class NormSize0LayerNorm(Layer):
    """Loom's LayerNorm with ``NormSize = 0``: outputs zeros (γ = 1, β = 0 kept for the rules)."""

    type_name = "layer_norm"

    def _build(self, input_shape, rng):
        d = input_shape[-1]
        self.params["weight"] = self.backend.ones((d,), dtype=self.float_dtype)
        self.params["bias"] = self.backend.zeros((d,), dtype=self.float_dtype)
        return input_shape

    def forward(self, x, train=False):
        return self.xp.zeros_like(x), None

    def backward(self, dy, ctx):
        return self.xp.zeros_like(dy)


def _recurrent(kind: str) -> list[Layer]:
    cell = {"RNN": RNN, "LSTM": LSTM}[kind]
    return [Reshape((4, 8)), cell(8), Flatten()]


def build(arch: str, depth: int, outputs: int, faithful: bool, backend, seed: int,
          all_leaky: bool = False):
    """Loom's ``<arch>-<depth>L`` network with ``outputs`` sigmoid outputs.

    Returns ``(net, input_width)``; the network input is ``[input_width]`` except Conv2D
    (``[1, 8, 8]``) and Attn (``[1, 64]``).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {ARCHS}")
    out = Dense(outputs, activation="sigmoid")
    layers: list[Layer] = []
    if arch == "Dense":
        width, shape = 8, (8,)
        layers.append(Dense(64, activation=LEAKY))
        for i in range(1, depth - 1):
            act = LEAKY if (all_leaky or i % 2 == 1) else "tanh"
            layers.append(Dense(HIDDEN[i % 5], activation=act))
    elif arch == "Conv2D":
        width, shape = 64, (1, 8, 8)
        layers += [Conv2D(8, 3, activation=LEAKY), Flatten(), Dense(64, activation=LEAKY)]
        layers += [Dense(64, activation=LEAKY) for _ in range(depth - 3)]
    elif arch in ("RNN", "LSTM"):
        width, shape = 32, (32,)
        layers.append(Dense(32, activation=LEAKY))
        for i in range(1, depth - 1):
            layers += _recurrent(arch) if i % 2 == 1 else [Dense(32, activation=LEAKY)]
    elif arch == "Attn":
        width, shape = 64, (1, 64)
        for i in range(depth - 1):
            if i % 2 == 0:
                layers.append(HeadDim0Attention(4) if faithful else MultiHeadAttention(4))
            else:
                layers.append(Dense(64, activation=LEAKY))
    elif arch == "Norm":
        width, shape = 16, (16,)
        layers.append(Dense(32, activation=LEAKY))
        for i in range(1, depth - 1):
            if i % 2 == 1:
                layers.append(NormSize0LayerNorm() if faithful else LayerNorm())
            else:
                layers.append(Dense(32, activation=LEAKY))
    else:  # SwiGLU
        width, shape = 16, (16,)
        layers.append(Dense(32, activation=LEAKY))
        for i in range(1, depth - 1):
            layers.append(SwiGLU(32) if i % 2 == 1 else Dense(32, activation=LEAKY))
    layers.append(out)
    net = loomx.Network.chain(layers, input_shape=shape, backend=backend, seed=seed)
    return net, width


def clustered_dense(depth: int, n_in: int, backend, seed: int):
    """Tests 13–15 Dense nets: 13: 4→16 leaky→8 tanh→3; 14: 8→64→32→16→3;
    15: 8→32 then 32-wide leaky/tanh alternating, 20 layers."""
    if depth == 3:
        widths, acts = (16, 8), (LEAKY, "tanh")
    elif depth == 4:
        widths, acts = (64, 32, 16), (LEAKY, "tanh", LEAKY)
    else:
        widths = (32,) * (depth - 1)
        acts = tuple(LEAKY if i % 2 == 0 else "tanh" for i in range(depth - 1))
    layers = [Dense(w, activation=a) for w, a in zip(widths, acts, strict=True)]
    layers.append(Dense(3, activation="sigmoid"))
    return loomx.Network.chain(layers, input_shape=(n_in,), backend=backend, seed=seed)


def reshape_input(x, arch: str):
    """Host rows ``[N, width]`` → the network's input layout for ``arch``."""
    if arch == "Conv2D":
        return x.reshape(len(x), 1, 8, 8)
    if arch == "Attn":
        return x.reshape(len(x), 1, 64)
    return x


def param_count(net) -> int:
    return sum(math.prod(p.value.shape) for p in net.parameters())
