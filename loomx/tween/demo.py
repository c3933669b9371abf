"""The tweening section of ``loomx demo``: tweening next to plain SGD on the digits data."""

from __future__ import annotations

import time

from ..backends import get_backend
from ..grid.network import Network
from ..layers.dense import Dense
from .config import TweenConfig
from .trainer import TweenTrainer


def _digits(backend):
    from sklearn.datasets import load_digits

    d = load_digits()
    order = backend.random(0).permutation(len(d.target))
    x, y = d.data[order] / 16.0, d.target[order]
    cut = 1400
    return ((backend.from_host(x[:cut]), backend.from_host(y[:cut])),
            (backend.from_host(x[cut:]), backend.from_host(y[cut:])))


def _net(backend) -> Network:
    return Network.chain([Dense(32, activation="tanh"), Dense(10)], input_shape=(64,),
                         backend=backend, seed=0)


def _sgd(net, backend, train, epochs: int, lr: float, batch: int) -> None:
    from ..train.optim import SGD

    xp = backend.xp
    x, y = train
    opt = SGD(net, lr=lr)
    rng = backend.random(1)
    for _ in range(epochs):
        order = rng.permutation(x.shape[0])
        for i in range(0, len(order), batch):
            idx = backend.asarray(order[i:i + batch], dtype=xp.int64)
            xb, yb = xp.take(x, idx, axis=0), xp.take(y, idx, axis=0)
            opt.zero_grad()
            out, ctx = net.forward(xb, True)
            z = out - xp.max(out, axis=1, keepdims=True)
            p = xp.exp(z) / xp.sum(xp.exp(z), axis=1, keepdims=True)
            onehot = xp.astype(xp.reshape(yb, (-1, 1)) == backend.arange(10, dtype=yb.dtype),
                               backend.float_dtype)
            net.backward((p - onehot) / xb.shape[0], ctx, need_input_grad=False)
            opt.step()


def demo_section(backend=None, quick: bool = True) -> list[str]:
    """Train a 64→32→10 network on scikit-learn's digits with (1) corrected chain tweening,
    (2) plain SGD (same data, batches, epochs and loss) and (3) gradient-free difference
    target propagation; return printable lines with held-out accuracy and time."""
    backend = get_backend(backend)
    try:
        train, test = _digits(backend)
    except ImportError:
        return ["tweening demo skipped: scikit-learn is not installed (pip install scikit-learn)"]
    epochs = 3 if quick else 15
    lines = [f"Neural Tweening vs SGD on digits (1400 train / 397 held-out, {epochs} epochs, "
             f"batch 16, backend {backend.name})"]
    same = {"loss": "softmax_ce", "early_stop_threshold": 101.0}  # every run: all epochs
    runs = (("tweening (corrected chain rule)", TweenConfig(**same), 0.2),
            ("difference target propagation", TweenConfig(method="dtp", **same), 0.1))
    for label, cfg, rate in runs:
        net = _net(backend)
        t0 = time.perf_counter()
        tr = TweenTrainer(net, cfg, telemetry=False)
        tr.fit(*train, epochs=epochs, rate=rate, batch_size=16, metric="accuracy")
        acc = backend.to_host(tr.evaluate(*test)["accuracy"]).tolist()
        lines.append(f"  {label:<34} held-out accuracy {100 * acc:5.1f} %  "
                     f"({time.perf_counter() - t0:.1f} s)")
    net = _net(backend)
    t0 = time.perf_counter()
    _sgd(net, backend, train, epochs, 0.2, 16)
    acc = backend.to_host(TweenTrainer(net, telemetry=False).evaluate(*test)["accuracy"])
    lines.append(f"  {'plain SGD (lr 0.2, cross-entropy)':<34} held-out accuracy "
                 f"{100 * acc.tolist():5.1f} %  ({time.perf_counter() - t0:.1f} s)")
    lines.append("  Corrected chain tweening is gradient descent with per-layer gains; "
                 "see docs/tweening.md.")
    return lines
