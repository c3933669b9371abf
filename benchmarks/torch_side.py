"""PyTorch eager references of the workloads (no ``torch.compile``, explicit attention)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .timing import Op

LR = 0.01


def _sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def tensor(host: np.ndarray, device) -> torch.Tensor:
    """A host numpy array on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(host)).to(device)


def train_step_op(model: nn.Module, x, target, loss: str, device) -> Op:
    """Op of one step: ``zero_grad``, forward, loss, backward, ``SGD(lr=0.01).step()``."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = F.cross_entropy if loss == "ce" else F.mse_loss

    def run() -> Any:
        opt.zero_grad()
        value = loss_fn(model(x), target)
        value.backward()
        opt.step()
        return value

    return Op(run=run, sync=_sync(device))


def forward_backward_op(module: nn.Module, x, dy, device) -> Op:
    """Op of one forward and backward of a single module (parameter gradients accumulate)."""
    module.to(device)

    def run() -> Any:
        module(x).backward(dy)

    return Op(run=run, sync=_sync(device))


class LastStepLSTM(nn.Module):
    """``nn.LSTM`` (batch first) whose last time step feeds a linear head."""

    def __init__(self, inputs: int, hidden: int, classes: int):
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc(self.lstm(x)[0][:, -1])


class LSTMSequence(nn.Module):
    """``nn.LSTM`` returning the last hidden state only (the layer benchmark)."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)

    def forward(self, x):
        return self.lstm(x)[0][:, -1]


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _rope(x, pos0: int, theta: float):
    """Rotate-half RoPE of ``x [B, H, T, hd]`` for positions ``pos0 …``."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    pos = torch.arange(pos0, pos0 + x.shape[2], device=x.device, dtype=torch.float32)
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    """Causal multi-head attention with GQA, as explicit matmul + softmax (no SDPA)."""

    def __init__(self, d: int, heads: int, kv_heads: int, rope_theta: float | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.q = nn.Linear(d, heads * self.hd, bias=False)
        self.k = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(heads * self.hd, d, bias=False)
        self.rope_theta = rope_theta

    def forward(self, x, cache: dict | None = None):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2)
        pos0 = cache["len"] if cache is not None else 0
        if self.rope_theta is not None:
            q, k = _rope(q, pos0, self.rope_theta), _rope(k, pos0, self.rope_theta)
        if cache is not None:
            cache["k"][:, :, pos0:pos0 + t] = k
            cache["v"][:, :, pos0:pos0 + t] = v
            cache["len"] = pos0 + t
            k, v = cache["k"][:, :, :pos0 + t], cache["v"][:, :, :pos0 + t]
        rep = self.heads // self.kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        tk = k.shape[2]
        if t > 1:
            mask = torch.ones(t, tk, dtype=torch.bool, device=x.device).triu(tk - t + 1)
            s = s.masked_fill(mask, float("-inf"))
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        return self.o(y)


class Block(nn.Module):
    """Pre-RMSNorm transformer block: causal attention then SwiGLU, both residual."""

    def __init__(self, d: int, heads: int, kv_heads: int, ffn: int,
                 rope_theta: float | None = None):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.attn = Attention(d, heads, kv_heads, rope_theta)
        self.ffn = SwiGLU(d, ffn)

    def forward(self, x, cache: dict | None = None):
        h = x + self.attn(self.norm1(x), cache)
        return h + self.ffn(self.norm2(h))


class Decoder(nn.Module):
    """Llama-shaped decoder with random weights (RoPE, GQA, SwiGLU, untied LM head)."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, kv_heads, ffn, 10000.0)
                                    for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.kv_heads, self.hd = kv_heads, d // heads

    def new_caches(self, max_len: int, device) -> list[dict]:
        shape = (1, self.kv_heads, max_len, self.hd)
        return [{"k": torch.zeros(shape, device=device), "v": torch.zeros(shape, device=device),
                 "len": 0} for _ in self.blocks]

    def forward(self, ids, caches: list[dict] | None = None):
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.norm(x))


def decoder_prompt_op(model: Decoder, ids, device) -> Op:
    model.to(device).eval()

    def run() -> Any:
        with torch.inference_mode():
            return model(ids)

    return Op(run=run, sync=_sync(device))


def decoder_decode_op(model: Decoder, ids, new_tokens: int, device) -> Op:
    model.to(device).eval()
    state: dict = {}

    def setup() -> None:
        with torch.inference_mode():
            caches = model.new_caches(ids.shape[1] + new_tokens + 1, device)
            logits = model(ids, caches)
            state["caches"], state["next"] = caches, logits[:, -1].argmax(-1, keepdim=True)

    def run() -> Any:
        with torch.inference_mode():
            tok, caches = state["next"], state["caches"]
            for _ in range(new_tokens):
                tok = model(tok, caches)[:, -1].argmax(-1, keepdim=True)
            return tok

    return Op(run=run, setup=setup, sync=_sync(device))


def tick_op(layers: list[nn.Module], x, device) -> Op:
    """One stepping tick: every layer runs once on the previous tick's output (no autograd)."""
    for layer in layers:
        layer.to(device)
    buffers = [x]
    with torch.no_grad():
        for layer in layers:
            buffers.append(layer(buffers[-1]))

    def run() -> Any:
        with torch.no_grad():
            outs = [layer(buffers[i]) for i, layer in enumerate(layers)]
        buffers[1:] = outs
        return outs[-1]

    return Op(run=run, sync=_sync(device))
