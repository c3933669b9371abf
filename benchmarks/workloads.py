"""The benchmark cases: workloads a–f (suite ``main``) and single layers (suite ``layers``).

Every case builds the same computation twice, once from loomx layers on a loomx backend and once
in PyTorch eager, on identical host data. ``quick=True`` shrinks every size for smoke runs.
FLOP counts cover the matrix products that a training step needs (3 × forward, minus the input
gradient of the first layer, which PyTorch does not compute).
"""

from __future__ import annotations

import numpy as np

from . import loomx_side as lx
from .cases import Case, loomx_attr, loomx_layer
from .plain import block_step_op, cnn_step_op, lstm_step_op, mlp_step_op


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _normal(shape, seed: int = 0) -> np.ndarray:
    return _rng(seed).standard_normal(shape).astype(np.float32)


def _labels(n: int, classes: int, seed: int = 1) -> np.ndarray:
    return _rng(seed).integers(0, classes, size=n).astype(np.int64)


def _t(host, device):
    from .torch_side import tensor

    return tensor(host, device)


# ---------------------------------------------------------------------------- a. MLP
def mlp_case(quick: bool, scale: int = 1) -> Case:
    batch, sizes = (16, [784, 64, 64, 10]) if quick else (256, [784, 512, 512, 10])
    batch *= scale
    x, y = _normal((batch, sizes[0])), _labels(batch, sizes[-1])
    fwd = sum(2 * batch * i * o for i, o in zip(sizes[:-1], sizes[1:]))
    flops = 3 * fwd - 2 * batch * sizes[0] * sizes[1]

    def loomx(backend):
        dense = loomx_layer("Dense")
        layers = [dense(h, activation="relu") for h in sizes[1:-1]] + [dense(sizes[-1])]
        net = lx.chain(layers, (sizes[0],), backend)
        return lx.train_step_op(backend, net, backend.from_host(x),
                                lx.one_hot(backend, y, sizes[-1]), "ce")

    def torch(device):
        from torch import nn

        from .torch_side import train_step_op

        mods: list = []
        for i, o in zip(sizes[:-2], sizes[1:-1]):
            mods += [nn.Linear(i, o), nn.ReLU()]
        model = nn.Sequential(*mods, nn.Linear(sizes[-2], sizes[-1]))
        return train_step_op(model, _t(x, device), _t(y, device), "ce", device)

    return Case("a_mlp", f"a. MLP {'-'.join(map(str, sizes))}, bs {batch}, train step", "main",
                batch, "samples", flops, 1.0, loomx, torch,
                plain=lambda: mlp_step_op(sizes, x, y))


# ---------------------------------------------------------------------------- b. CNN
def cnn_case(quick: bool, scale: int = 1) -> Case:
    batch, side = (4, 8) if quick else (64, 28)
    batch *= scale
    x, y = _normal((batch, 1, side, side)), _labels(batch, 10)
    half = (side + 1) // 2
    conv1 = 2 * batch * side * side * 32 * 9
    conv2 = 2 * batch * half * half * 64 * 32 * 9
    fc = 2 * batch * half * half * 64 * 10
    flops = 3 * (conv1 + conv2 + fc) - conv1

    def loomx(backend):
        conv, flat, dense = (loomx_layer(n) for n in ("Conv2D", "Flatten", "Dense"))
        net = lx.chain([conv(32, 3, padding=1, activation="relu"),
                        conv(64, 3, stride=2, padding=1, activation="relu"),
                        flat(), dense(10)], (1, side, side), backend)
        return lx.train_step_op(backend, net, backend.from_host(x),
                                lx.one_hot(backend, y, 10), "ce")

    def torch(device):
        from torch import nn

        from .torch_side import train_step_op

        model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                              nn.Flatten(), nn.Linear(64 * half * half, 10))
        return train_step_op(model, _t(x, device), _t(y, device), "ce", device)

    return Case("b_cnn", f"b. CNN conv32-conv64/s2-fc10 on {side}², bs {batch}, train step",
                "main", batch, "samples", flops, 1.2, loomx, torch,
                plain=lambda: cnn_step_op(x, y))


# ---------------------------------------------------------------------------- c. LSTM
def lstm_case(quick: bool, scale: int = 1) -> Case:
    batch, steps, inputs, hidden = (4, 4, 8, 16) if quick else (64, 32, 32, 128)
    batch *= scale
    x, y = _normal((batch, steps, inputs)), _labels(batch, 10)
    flops = 3 * 2 * batch * steps * 4 * hidden * (inputs + hidden) \
        - 2 * batch * steps * 4 * hidden * inputs + 3 * 2 * batch * hidden * 10

    def loomx(backend):
        lstm, dense = loomx_layer("LSTM"), loomx_layer("Dense")
        net = lx.chain([lstm(hidden, return_sequences=False), dense(10)], (steps, inputs),
                       backend)
        return lx.train_step_op(backend, net, backend.from_host(x),
                                lx.one_hot(backend, y, 10), "ce")

    def torch(device):
        from .torch_side import LastStepLSTM, train_step_op

        return train_step_op(LastStepLSTM(inputs, hidden, 10), _t(x, device), _t(y, device),
                             "ce", device)

    return Case("c_lstm", f"c. LSTM in {inputs}, hidden {hidden}, T {steps}, bs {batch}, "
                "train step", "main", batch, "samples", flops, 1.2, loomx, torch,
                plain=lambda: lstm_step_op(x, y, hidden))


# ---------------------------------------------------------------------------- d. transformer
def _block_flops(batch: int, seq: int, d: int, ffn: int) -> float:
    n = batch * seq
    return 2 * n * d * d * 4 + 2 * 2 * batch * seq * seq * d + 3 * 2 * n * d * ffn


def transformer_case(quick: bool, scale: int = 1) -> Case:
    batch, seq, d, heads, ffn = (2, 8, 32, 4, 64) if quick else (16, 128, 256, 4, 688)
    batch *= scale
    x, target = _normal((batch, seq, d)), _normal((batch, seq, d), seed=2)

    def loomx(backend):
        # the block as a grid network, as a loomx user writes it (docs: Residual): slots
        # [RMSNorm, MHA, Residual(0), RMSNorm, SwiGLU, Residual(3)]
        rms, mha, swiglu = (loomx_layer(n) for n in ("RMSNorm", "MultiHeadAttention", "SwiGLU"))
        residual = loomx_attr("loomx.grid", "Residual")
        net = lx.chain([rms(), mha(num_heads=heads, num_kv_heads=heads, d_model=d, causal=True),
                        residual(0), rms(), swiglu(ffn), residual(3)], (seq, d), backend)
        return lx.train_step_op(backend, net, backend.from_host(x), backend.from_host(target),
                                "mse")

    def torch(device):
        from .torch_side import Block, train_step_op

        return train_step_op(Block(d, heads, heads, ffn), _t(x, device), _t(target, device),
                             "mse", device)

    return Case("d_transformer", f"d. Transformer block d {d}, {heads} heads, T {seq}, "
                f"bs {batch}, SwiGLU {ffn}, train step", "main", batch * seq, "tokens",
                3 * _block_flops(batch, seq, d, ffn), 1.2, loomx, torch,
                plain=lambda: block_step_op(x, target, heads, ffn))


# ---------------------------------------------------------------------------- e. decoder
def _decoder_dims(quick: bool) -> dict:
    if quick:
        return dict(vocab=256, d_model=32, n_layers=2, heads=4, kv_heads=2, ffn=64)
    return dict(vocab=32000, d_model=512, n_layers=8, heads=8, kv_heads=4, ffn=1408)


def decoder_cases(quick: bool) -> list[Case]:
    dims = _decoder_dims(quick)
    prompt, new_tokens = (8, 4) if quick else (128, 32)
    ids = _rng(3).integers(0, dims["vocab"], size=(1, prompt)).astype(np.int64)
    d, ffn, kv = dims["d_model"], dims["ffn"], dims["kv_heads"] / dims["heads"]
    per_layer = 2 * prompt * d * d * (2 + 2 * kv) + 2 * 2 * prompt * prompt * d \
        + 3 * 2 * prompt * d * ffn
    prompt_flops = dims["n_layers"] * per_layer + 2 * prompt * d * dims["vocab"]
    shape = f"vocab {dims['vocab']}, d {d}, {dims['n_layers']} layers, " \
            f"{dims['heads']}/{dims['kv_heads']} heads, FFN {ffn}"
    models: dict = {}

    def loomx_model(backend):
        key = ("loomx", backend.name)
        if key not in models:
            models[key] = lx.Decoder(seq=prompt, backend=backend, **dims)
        return models[key]

    def torch_model(device):
        from .torch_side import Decoder

        key = ("torch", str(device))
        if key not in models:
            import torch

            torch.manual_seed(0)
            models[key] = Decoder(dims["vocab"], d, dims["n_layers"], dims["heads"],
                                  dims["kv_heads"], ffn)
        return models[key]

    def loomx_prompt(backend):
        ids_dev = backend.from_host(ids)
        return lx.decoder_prompt_op(backend, loomx_model(backend), ids_dev)

    def loomx_decode(backend):
        ids_dev = backend.from_host(ids)
        return lx.decoder_decode_op(backend, loomx_model(backend), ids_dev, new_tokens)

    def torch_prompt(device):
        from .torch_side import decoder_prompt_op

        return decoder_prompt_op(torch_model(device), _t(ids, device), device)

    def torch_decode(device):
        from .torch_side import decoder_decode_op

        return decoder_decode_op(torch_model(device), _t(ids, device), new_tokens, device)

    return [
        Case("e_prompt", f"e. Llama-shaped decoder ({shape}): {prompt}-token prompt forward",
             "main", prompt, "tokens", prompt_flops, 1.2, loomx_prompt, torch_prompt),
        Case("e_decode", f"e. same decoder: greedy decode of {new_tokens} tokens with KV cache",
             "main", new_tokens, "tokens", 0.0, 1.0, loomx_decode, torch_decode),
    ]


# ---------------------------------------------------------------------------- f. small network
def small_cases(quick: bool) -> list[Case]:
    width = 64
    x, target = _normal((1, width)), _normal((1, width), seed=2)

    def loomx_net(backend):
        dense = loomx_layer("Dense")
        return lx.chain([dense(width, activation="relu"), dense(width, activation="relu"),
                         dense(width)], (width,), backend)

    def torch_layers():
        from torch import nn

        return [nn.Sequential(nn.Linear(width, width), nn.ReLU()),
                nn.Sequential(nn.Linear(width, width), nn.ReLU()), nn.Linear(width, width)]

    def loomx_step(backend):
        return lx.train_step_op(backend, loomx_net(backend), backend.from_host(x),
                                backend.from_host(target), "mse")

    def torch_step(device):
        from torch import nn

        from .torch_side import train_step_op

        return train_step_op(nn.Sequential(*torch_layers()), _t(x, device), _t(target, device),
                             "mse", device)

    def loomx_tick(backend):
        return lx.stepping_tick_op(backend, loomx_net(backend), backend.from_host(x))

    def torch_tick(device):
        from .torch_side import tick_op

        return tick_op(torch_layers(), _t(x, device), device)

    return [
        Case("f_sample", "f. 3 × Dense 64, batch 1: forward+backward+SGD per sample", "main",
             1, "samples", 0.0, None, loomx_step, torch_step),
        Case("f_tick", "f. same network: one stepping tick (every layer advances once)",
             "main", 1, "ticks", 0.0, None, loomx_tick, torch_tick),
    ]


# ---------------------------------------------------------------------------- layers suite
def layer_cases(quick: bool, scale: int = 1) -> list[Case]:
    """Forward+backward of single layers: Dense, Conv2D, MaxPool2D, LSTM, attention."""
    cases = []

    batch, fin, fout = (8, 32, 32) if quick else (256, 512, 512)
    batch *= scale
    xd, dyd = _normal((batch, fin)), _normal((batch, fout), seed=2)

    def dense_l(backend):
        layer = loomx_layer("Dense")(fout)
        layer.build((fin,), backend, 0)
        return lx.forward_backward_op(backend, layer, backend.from_host(xd),
                                      backend.from_host(dyd))

    def dense_t(device):
        from torch import nn

        from .torch_side import forward_backward_op

        return forward_backward_op(nn.Linear(fin, fout), _t(xd, device).requires_grad_(),
                                   _t(dyd, device), device)

    cases.append(Case("layer_dense", f"Dense {fin}→{fout}, bs {batch}", "layers", batch,
                      "samples", 3 * 2 * batch * fin * fout, None, dense_l, dense_t))

    cb, side = (4, 8) if quick else (64, 28)
    cb *= scale
    half = (side + 1) // 2
    xc, dyc = _normal((cb, 32, side, side)), _normal((cb, 64, half, half), seed=2)

    def conv_l(backend):
        layer = loomx_layer("Conv2D")(64, 3, stride=2, padding=1)
        layer.build((32, side, side), backend, 0)
        return lx.forward_backward_op(backend, layer, backend.from_host(xc),
                                      backend.from_host(dyc))

    def conv_t(device):
        from torch import nn

        from .torch_side import forward_backward_op

        return forward_backward_op(nn.Conv2d(32, 64, 3, stride=2, padding=1),
                                   _t(xc, device).requires_grad_(), _t(dyc, device), device)

    cases.append(Case("layer_conv2d", f"Conv2D 32→64, 3×3, stride 2, pad 1 on {side}², "
                      f"bs {cb}", "layers", cb, "samples",
                      3 * 2 * cb * half * half * 64 * 32 * 9, None, conv_l, conv_t))

    # max pooling 3×3/2 over the first convolution's output: its windows overlap, so the
    # backward adds the shares of shared positions up
    xp_, dyp = _normal((cb, 32, side, side), seed=3), _normal((cb, 32, half - 1, half - 1),
                                                              seed=4)

    def pool_l(backend):
        layer = loomx_layer("MaxPool2D")(3, stride=2)
        layer.build((32, side, side), backend, 0)
        return lx.forward_backward_op(backend, layer, backend.from_host(xp_),
                                      backend.from_host(dyp))

    def pool_t(device):
        from torch import nn

        from .torch_side import forward_backward_op

        return forward_backward_op(nn.MaxPool2d(3, stride=2), _t(xp_, device).requires_grad_(),
                                   _t(dyp, device), device)

    cases.append(Case("layer_maxpool", f"MaxPool2D 3×3, stride 2 on 32 × {side}², bs {cb}",
                      "layers", cb, "samples", 0, None, pool_l, pool_t))

    lb, steps, inputs, hidden = (4, 4, 8, 16) if quick else (64, 32, 32, 128)
    lb *= scale
    xl, dyl = _normal((lb, steps, inputs)), _normal((lb, hidden), seed=2)

    def lstm_l(backend):
        layer = loomx_layer("LSTM")(hidden, return_sequences=False)
        layer.build((steps, inputs), backend, 0)
        return lx.forward_backward_op(backend, layer, backend.from_host(xl),
                                      backend.from_host(dyl))

    def lstm_t(device):
        from .torch_side import LSTMSequence, forward_backward_op

        return forward_backward_op(LSTMSequence(inputs, hidden),
                                   _t(xl, device).requires_grad_(), _t(dyl, device), device)

    cases.append(Case("layer_lstm", f"LSTM {inputs}→{hidden}, T {steps}, bs {lb}, last step",
                      "layers", lb, "samples",
                      3 * 2 * lb * steps * 4 * hidden * (inputs + hidden), None, lstm_l,
                      lstm_t))

    ab, seq, d, heads = (2, 8, 32, 4) if quick else (16, 128, 256, 4)
    ab *= scale
    xa, dya = _normal((ab, seq, d)), _normal((ab, seq, d), seed=2)

    def attn_l(backend):
        layer = loomx_layer("MultiHeadAttention")(num_heads=heads, d_model=d, causal=True)
        layer.build((seq, d), backend, 0)
        return lx.forward_backward_op(backend, layer, backend.from_host(xa),
                                      backend.from_host(dya))

    def attn_t(device):
        from .torch_side import Attention, forward_backward_op

        return forward_backward_op(Attention(d, heads, heads), _t(xa, device).requires_grad_(),
                                   _t(dya, device), device)

    cases.append(Case("layer_attention", f"causal attention d {d}, {heads} heads, T {seq}, "
                      f"bs {ab}", "layers", ab * seq, "tokens",
                      3 * (2 * ab * seq * d * d * 4 + 2 * 2 * ab * seq * seq * d), None,
                      attn_l, attn_t))
    return cases


def all_cases(quick: bool, scale: int = 1) -> list[Case]:
    """Every case of both suites, in report order; ``scale`` multiplies the batch of a–d and
    of the layer cases (larger batches for GPUs)."""
    return [mlp_case(quick, scale), cnn_case(quick, scale), lstm_case(quick, scale),
            transformer_case(quick, scale), *decoder_cases(quick), *small_cases(quick),
            *layer_cases(quick, scale)]
