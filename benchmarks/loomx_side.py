"""loomx sides of the workloads: networks built from loomx layers and their training steps.

Everything here runs through ``backend.xp`` exactly as user code would; the loss and the SGD
update use ``loomx.train`` when it provides them and the same math written with ``xp`` otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .cases import Missing, loomx_attr, loomx_layer
from .timing import Op

LR = 0.01

#: Set by the worker while it builds a ``numpy+workers`` contender: the number of CPU threads
#: a training step splits its batch over (``loomx.train.parallel.BatchParallel``); ``None``
#: otherwise. ``WORKERS_USED`` records whether the op built actually used them.
WORKERS: int | None = None
WORKERS_USED = False


def _sync(backend):
    return backend.sync if backend.library != "numpy" else None


def one_hot(backend, labels: np.ndarray, classes: int):
    """Host int labels ``[B]`` → float one-hot ``[B, classes]`` on ``backend``."""
    host = np.zeros((labels.shape[0], classes), dtype=np.float32)
    host[np.arange(labels.shape[0]), labels] = 1.0
    return backend.from_host(host)


def softmax_cross_entropy(xp, logits, onehot):
    """Mean cross-entropy of ``logits [B, N]`` against ``onehot [B, N]`` and its gradient."""
    m = xp.max(logits, axis=-1, keepdims=True)
    shifted = logits - m
    e = xp.exp(shifted)
    s = xp.sum(e, axis=-1, keepdims=True)
    loss = -xp.mean(xp.sum(onehot * (shifted - xp.log(s)), axis=-1))
    return loss, (e / s - onehot) * (1.0 / logits.shape[0])


def mean_squared_error(xp, y, target):
    """Mean squared error over all elements and its gradient."""
    diff = y - target
    n = 1
    for d in y.shape:
        n *= int(d)
    return xp.mean(diff * diff), diff * (2.0 / n)


def loss_function(backend, loss: str):
    """``(output, target) → (value, grad)``: ``loomx.train.losses`` when present, else ``xp``."""
    name = "cross_entropy" if loss == "ce" else "mse"
    try:
        return loomx_attr("loomx.train.losses", name), f"loomx.train.losses.{name}"
    except Missing:
        xp = backend.xp
        fallback = softmax_cross_entropy if loss == "ce" else mean_squared_error
        return (lambda y, t: fallback(xp, y, t)), "xp"


class SGDStep:
    """Plain SGD over every parameter of ``model`` (``loomx.train.optim.SGD`` when present)."""

    def __init__(self, model, lr: float = LR):
        self.params = list(model.parameters())
        self.lr = lr
        self.optimizer = None
        try:
            sgd = loomx_attr("loomx.train.optim", "SGD")
            self.optimizer = sgd(self.params, lr=lr)
        except Missing:
            self.optimizer = None
        except Exception:  # noqa: BLE001 - an optimizer with another signature: use the xp path
            self.optimizer = None

    @property
    def source(self) -> str:
        return "loomx.train.optim.SGD" if self.optimizer is not None else "xp update"

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()
            return
        lr = self.lr
        for p in self.params:
            p.value = p.value - lr * p.grad


def train_step_op(backend, model, x, target, loss: str) -> Op:
    """Op of one training step: zero_grad, forward, loss + gradient, backward, SGD.

    The backward skips the input gradient (``need_input_grad=False``) where loomx offers it:
    nothing reads it, and PyTorch does not compute it for a leaf input either.
    """
    loss_fn, _ = loss_function(backend, loss)
    opt = SGDStep(model)
    if WORKERS is not None:
        return _parallel_step_op(backend, model, x, target, loss_fn, opt)
    try:
        call_backward = loomx_attr("loomx.layers.base", "call_backward")
    except Missing:
        call_backward = None

    def run() -> Any:
        model.zero_grad()
        y, ctx = model.forward(x, True)
        value, dy = loss_fn(y, target)
        if call_backward is None:
            model.backward(dy, ctx)
        else:
            call_backward(model, dy, ctx, need_input_grad=False)
        opt.step()
        return value

    return Op(run=run, sync=_sync(backend))


def _parallel_step_op(backend, model, x, target, loss_fn, opt) -> Op:
    """The training step with the batch split over ``WORKERS`` CPU threads."""
    global WORKERS_USED
    layer_cls = loomx_attr("loomx.layers.base", "Layer")
    if not isinstance(model, layer_cls):
        raise Missing("BatchParallel for a model that is not a loomx Layer")
    parallel = loomx_attr("loomx.train.parallel", "BatchParallel")(model, WORKERS)
    WORKERS_USED = True

    def run() -> Any:
        model.zero_grad()
        results = parallel.forward_backward(x, target, loss_fn)
        opt.step()
        return results[0].value

    return Op(run=run, sync=_sync(backend))


def chain(layers: list, input_shape: tuple[int, ...], backend):
    """A built ``Network.chain`` of ``layers`` (seed 0)."""
    from loomx.grid import Network

    return Network.chain(layers, input_shape=input_shape, backend=backend, seed=0)


def forward_backward_op(backend, layer, x, dy, **forward_kw) -> Op:
    """Op of one forward (train mode) and backward of a single built layer."""

    def run() -> Any:
        _, ctx = layer.forward(x, True, **forward_kw)
        return layer.backward(dy, ctx)

    return Op(run=run, sync=_sync(backend))


class PreNormBlock:
    """A pre-norm transformer block composed from loomx layers.

    ``h = x + attn(rmsnorm(x))``, ``y = h + swiglu(rmsnorm(h))``. Shapes: ``[B, T, D]`` →
    ``[B, T, D]``. Implements the parts of the layer protocol a training step uses.
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int, ffn: int, seq: int, backend,
                 rng, rope_theta: float | None = None):
        rms, mha, swiglu = (loomx_layer(n) for n in ("RMSNorm", "MultiHeadAttention", "SwiGLU"))
        self.norm1, self.norm2 = rms(), rms()
        self.attn = mha(num_heads=heads, num_kv_heads=kv_heads, d_model=d_model, causal=True,
                        rope_theta=rope_theta)
        self.ffn = swiglu(ffn)
        for layer in (self.norm1, self.attn, self.norm2, self.ffn):
            layer.build((seq, d_model), backend, rng)

    def layers(self) -> list:
        return [self.norm1, self.attn, self.norm2, self.ffn]

    def parameters(self):
        for i, layer in enumerate(self.layers()):
            yield from layer.parameters(f"{i}.")

    def zero_grad(self) -> None:
        for layer in self.layers():
            layer.zero_grad()

    def forward(self, x, train: bool = False, cache=None):
        a, c1 = self.norm1.forward(x, train)
        if cache is None:
            b, c2 = self.attn.forward(a, train)
        else:
            b, c2 = self.attn.forward(a, train, cache=cache)
        h = x + b
        f, c3 = self.norm2.forward(h, train)
        g, c4 = self.ffn.forward(f, train)
        return h + g, (c1, c2, c3, c4)

    def backward(self, dy, ctx):
        c1, c2, c3, c4 = ctx
        dh = dy + self.norm2.backward(self.ffn.backward(dy, c4), c3)
        return dh + self.norm1.backward(self.attn.backward(dh, c2), c1)


class Decoder:
    """A Llama-shaped decoder from loomx layers: embedding, pre-norm blocks, RMSNorm, LM head.

    ``forward(ids [B, T] int, caches=None) → logits [B, T, vocab]``; ``caches`` is one KV cache
    per block (``new_caches``) for incremental decoding.
    """

    def __init__(self, vocab: int, d_model: int, n_layers: int, heads: int, kv_heads: int,
                 ffn: int, seq: int, backend):
        emb, rms, dense = (loomx_layer(n) for n in ("Embedding", "RMSNorm", "Dense"))
        rng = backend.random(0)
        self.backend = backend
        self.embed = emb(vocab, d_model)
        self.embed.build((seq,), backend, rng)
        self.blocks = [PreNormBlock(d_model, heads, kv_heads, ffn, seq, backend, rng,
                                    rope_theta=10000.0) for _ in range(n_layers)]
        self.norm = rms()
        self.norm.build((seq, d_model), backend, rng)
        self.head = dense(vocab, bias=False)
        self.head.build((seq, d_model), backend, rng)

    def new_caches(self, batch: int, max_len: int) -> list:
        return [b.attn.new_cache(batch, max_len) for b in self.blocks]

    def forward(self, ids, caches=None):
        x, _ = self.embed.forward(ids)
        for i, block in enumerate(self.blocks):
            x, _ = block.forward(x, False, None if caches is None else caches[i])
        x, _ = self.norm.forward(x)
        return self.head.forward(x)[0]


def decoder_prompt_op(backend, model: Decoder, ids) -> Op:
    """Op of one full-logits forward pass over the prompt ``ids [1, T]``."""
    return Op(run=lambda: model.forward(ids), sync=_sync(backend))


def decoder_decode_op(backend, model: Decoder, ids, new_tokens: int) -> Op:
    """Op of ``new_tokens`` greedy steps with KV caches prefilled (untimed) from ``ids``."""
    xp = backend.xp
    state: dict = {}
    prompt_len = int(ids.shape[1])

    def setup() -> None:
        caches = model.new_caches(1, prompt_len + new_tokens + 1)
        logits = model.forward(ids, caches)
        state["caches"] = caches
        state["next"] = xp.reshape(xp.argmax(logits[:, -1, :], axis=-1), (1, 1))

    def run() -> Any:
        tok = state["next"]
        caches = state["caches"]
        for _ in range(new_tokens):
            logits = model.forward(tok, caches)
            tok = xp.reshape(xp.argmax(logits[:, -1, :], axis=-1), (1, 1))
        return tok

    return Op(run=run, setup=setup, sync=_sync(backend))


def stepping_tick_op(backend, net, x) -> Op:
    """Op of one tick of ``loomx.grid.stepping.Stepper`` over ``net`` fed with ``x [1, ...]``."""
    stepper = loomx_attr("loomx.grid.stepping", "Stepper")(net)
    stepper.set_input(x)
    return Op(run=stepper.step, sync=_sync(backend))
