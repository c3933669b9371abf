"""One run of one mode: the static tasks (tests 13–16) and the adaptation task (tests 17–19).

Budgets are update counts (samples trained on), never wall clock. Every run is seeded: the
network initialisation, the data and the sampling order come from ``seed``.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from loomx.grid.stepping import Stepper
from loomx.train.optim import SGD, Adam
from loomx.tween import TweenConfig, TweenTrainer
from loomx.tween.stepping import SteppingTween

from .data import AVOID, CHASE, ChaseAvoid

STATIC_MODES = ("NormalBP", "NormTween", "Step+BP", "StepTween", "TChain", "BatchTween",
                "StepBatch")
ADAPT_MODES = ("NormalBP", "Step+BP", "Tween", "TweenChain", "StepTweenChain")
TWEEN_RATE_16 = 0.15   # Loom's test 16 tween rate
TWEEN_RATE_17 = 0.02   # Loom's tests 17–19 tween rate
BP_RATE = 0.02         # Loom's NormalBP / Step+BP rate


def tween_config(faithful: bool, chain: bool = True) -> TweenConfig:
    """Faithful harness: Loom's config (chain rule on unless asked). Fixed harness: exact local
    gradients; ``chain=False`` gives Loom's legacy target propagation (what the docs meant by
    "StepTween" and "Tween")."""
    if faithful:
        return TweenConfig.faithful()
    return TweenConfig(use_chain_rule=chain)


def _onehot(labels, n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)[np.asarray(labels)]


def _flat_out(xp, y, n: int):
    return xp.reshape(y, (y.shape[0], -1))[:, :n]


def predict(net, backend, x_host: np.ndarray, n_out: int) -> np.ndarray:
    """Argmax class of every row (ordinary forward pass, in chunks of 512)."""
    xp = backend.xp
    out = []
    for i in range(0, len(x_host), 512):
        y, _ = net.forward(backend.from_host(x_host[i:i + 512]), False)
        out.append(backend.to_host(xp.argmax(_flat_out(xp, y, n_out), axis=1)))
    return np.concatenate(out)


def bp_step(net, backend, x, onehot, optimizer, grad_scale: float = 1.0,
            clip_norm: float | None = None) -> None:
    """One gradient step on ``grad_scale·(y − onehot)`` (MSE), with optional global clipping."""
    xp = backend.xp
    net.zero_grad()
    y, ctx = net.forward(x, True)
    n = onehot.shape[1]
    y2 = xp.reshape(y, (y.shape[0], -1))
    d = (y2[:, :n] - onehot) * (grad_scale / y.shape[0])
    if y2.shape[1] > n:
        d = xp.concat([d, xp.zeros_like(y2[:, n:])], axis=1)
    net.backward(xp.reshape(d, y.shape), ctx)
    if clip_norm is not None:
        total = sum(xp.sum(p.grad * p.grad) for p in net.parameters())
        scale = xp.minimum(clip_norm / (xp.sqrt(total) + 1e-12), backend.scalar(1.0))
        for p in net.parameters():
            p.grad = p.grad * scale
    optimizer.step()


# ---------------------------------------------------------------------------- static tasks
def run_static(mode: str, net, backend, train, test, budget: int, faithful: bool, seed: int,
               n_out: int = 3, rate: float | None = None) -> dict:
    """Train ``net`` with ``mode`` for ``budget`` sample updates; accuracies on both splits.

    ``mode`` is one of :data:`STATIC_MODES` or ``"SGD"`` / ``"Adam"`` (minibatch 16, rate
    ``rate``). ``train`` and ``test`` are host ``(x, y)`` pairs in the network's input layout.
    """
    rng = np.random.default_rng(seed + 7)
    xtr, ytr = train
    t0 = time.perf_counter()
    if mode in ("SGD", "Adam"):
        opt = (SGD if mode == "SGD" else Adam)(net, lr=rate)
        for _ in range(max(1, budget // 16)):
            idx = rng.integers(0, len(xtr), 16)
            bp_step(net, backend, backend.from_host(xtr[idx]),
                    backend.from_host(_onehot(ytr[idx], n_out)), opt)
    elif mode == "NormalBP":
        opt = SGD(net, lr=BP_RATE if rate is None else rate)
        for i in range(budget):
            k = i % len(xtr)
            bp_step(net, backend, backend.from_host(xtr[k:k + 1]),
                    backend.from_host(_onehot(ytr[k:k + 1], n_out)), opt,
                    grad_scale=2.0 / n_out, clip_norm=1.0)
    elif mode == "NormTween":
        tr = TweenTrainer(net, tween_config(faithful), output_size=n_out, telemetry=False)
        for i in range(budget):
            k = i % len(xtr)
            tr.step(backend.from_host(xtr[k:k + 1]), [int(ytr[k])], rate or TWEEN_RATE_16)
    elif mode == "BatchTween":
        tr = TweenTrainer(net, tween_config(faithful), output_size=n_out, telemetry=False)
        for _ in range(max(1, budget // 32)):
            idx = rng.permutation(len(xtr))[:32]
            tr.batch_step(backend.from_host(xtr[idx]), backend.from_host(ytr[idx]),
                          rate or TWEEN_RATE_16)
    elif mode == "Step+BP":
        _step_bp_static(net, backend, xtr, ytr, budget, rng, n_out)
    elif mode in ("StepTween", "TChain", "StepBatch"):
        chain = mode != "StepTween"
        tr = TweenTrainer(net, tween_config(faithful, chain), output_size=n_out,
                          telemetry=False)
        step_mode = {"StepTween": "step_tween", "TChain": "tchain",
                     "StepBatch": "step_batch"}[mode]
        st = SteppingTween(tr, step_mode, tween_every=5, batch=32)
        every = 1 if mode == "StepBatch" else 5
        k = 0
        for tick in range(budget * every):
            if tick % 20 == 0:
                k = int(rng.integers(0, len(xtr)))
            st.tick(backend.from_host(xtr[k:k + 1]), [int(ytr[k])], rate or TWEEN_RATE_16)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    seconds = time.perf_counter() - t0
    return {"train_acc": float((predict(net, backend, xtr, n_out) == ytr).mean() * 100),
            "test_acc": float((predict(net, backend, test[0], n_out) == test[1]).mean() * 100),
            "seconds": seconds}


def _step_bp_static(net, backend, xtr, ytr, budget, rng, n_out) -> None:
    """Loom's Step+BP: the sample changes every 20 ticks, targets wait in a queue of the
    pipeline latency, lr 0.02·0.9999^t (≥ 0.001)."""
    xp = backend.xp
    stepper = Stepper(net)
    queue: deque = deque()
    opt = SGD(net, lr=BP_RATE)
    k, done, tick = 0, 0, 0
    while done < budget:
        if tick % 20 == 0:
            k = int(rng.integers(0, len(xtr)))
        tick += 1
        stepper.set_input(backend.from_host(xtr[k:k + 1]))
        y = stepper.step(train=True)
        queue.append(int(ytr[k]))
        if len(queue) <= stepper.latency:
            continue
        t = backend.from_host(_onehot([queue.popleft()], n_out))
        net.zero_grad()
        y2 = xp.reshape(y, (1, -1))
        d = y2[:, :n_out] - t
        if y2.shape[1] > n_out:
            d = xp.concat([d, xp.zeros_like(y2[:, n_out:])], axis=1)
        stepper.step_backward(xp.reshape(d, y.shape))
        opt.lr = max(0.001, BP_RATE * 0.9999 ** done)
        opt.step()
        done += 1


# ---------------------------------------------------------------------------- adaptation
def run_adaptation(mode: str, net, backend, arch_input, seed: int, iters: int,
                   windows: int = 10, faithful: bool = True, batch_every: int = 50,
                   rate: float | None = None, width: int = 8) -> dict:
    """The chase/avoid task: AVOID from ``iters/3`` to ``2·iters/3``, CHASE otherwise.

    ``mode``: one of :data:`ADAPT_MODES`, or the baselines ``"Persistence"`` (act = the
    previous step's optimal action), ``"SGD"`` / ``"Adam"`` (one online update per step at
    rate ``rate``). ``arch_input`` reshapes a host observation batch to the network's layout.
    Returns per-window accuracy and Loom's adaptation metrics.
    """
    rng = np.random.default_rng(seed)
    env = ChaseAvoid(rng, width)
    xp = backend.xp
    changes = (iters // 3, 2 * iters // 3)
    correct = np.zeros(windows)
    counts = np.zeros(windows)
    buffer: list[tuple[np.ndarray, int]] = []
    prev_opt = 0
    tr = st = stepper = opt = None
    if mode in ("Tween", "TweenChain", "StepTweenChain"):
        chain = mode != "Tween" or faithful
        tr = TweenTrainer(net, tween_config(faithful, chain), output_size=4, telemetry=False)
        if mode == "StepTweenChain":
            st = SteppingTween(tr, "step_tween_chain")
    elif mode == "Step+BP":
        stepper = Stepper(net)
        opt = SGD(net, lr=BP_RATE)
        queue: deque = deque()
    elif mode in ("NormalBP", "SGD", "Adam"):
        lr = BP_RATE if rate is None else rate
        opt = (Adam if mode == "Adam" else SGD)(net, lr=lr)
    t0 = time.perf_counter()
    for i in range(iters):
        env.task = AVOID if changes[0] <= i < changes[1] else CHASE
        obs = env.observe()
        target = env.optimal()
        x = backend.from_host(arch_input(obs[None, :]))
        if mode == "Persistence":
            action = prev_opt
        elif st is not None:
            y = st.tick(x, [target], rate or TWEEN_RATE_17)
            action = int(backend.to_host(xp.argmax(_flat_out(xp, y, 4), axis=1))[0])
        elif stepper is not None:
            stepper.set_input(x)
            y = stepper.step(train=True)
            action = int(backend.to_host(xp.argmax(_flat_out(xp, y, 4), axis=1))[0])
            queue.append(target)
            aligned = len(queue) > stepper.latency
            label = queue.popleft() if (not faithful and aligned) else target
            if faithful or aligned:
                net.zero_grad()
                y2 = xp.reshape(y, (1, -1))
                d = y2[:, :4] - backend.from_host(_onehot([label], 4))
                if y2.shape[1] > 4:
                    d = xp.concat([d, xp.zeros_like(y2[:, 4:])], axis=1)
                stepper.step_backward(xp.reshape(d, y.shape))
                opt.step()
        else:
            y, _ = net.forward(x, False)
            action = int(backend.to_host(xp.argmax(_flat_out(xp, y, 4), axis=1))[0])
        w = i * windows // iters
        correct[w] += action == target
        counts[w] += 1
        env.act(action)
        prev_opt = target
        if mode in ("SGD", "Adam"):
            bp_step(net, backend, x, backend.from_host(_onehot([target], 4)), opt)
        elif mode in ("NormalBP", "Tween", "TweenChain"):
            buffer.append((obs, target))
            if len(buffer) >= batch_every:
                for o, t in buffer:
                    xb = backend.from_host(arch_input(o[None, :]))
                    if tr is not None:
                        tr.step(xb, [t], rate or TWEEN_RATE_17)
                    else:
                        bp_step(net, backend, xb, backend.from_host(_onehot([t], 4)), opt,
                                grad_scale=0.5)
                buffer.clear()
    acc = 100.0 * correct / np.maximum(counts, 1)
    # Loom: the post-change window holds the first output after the change; pre = the one before
    post1, post2 = changes[0] * windows // iters, changes[1] * windows // iters
    pre1, pre2 = post1 - 1, post2 - 1

    def recovery(post):
        hits = [k - post for k in range(post, windows) if acc[k] >= 50.0]
        return hits[0] if hits else -1

    return {"windows": acc.tolist(), "avgAccuracy": float(acc.mean()),
            "preChange1Acc": float(acc[pre1]), "change1Adapt": float(acc[post1]),
            "preChange2Acc": float(acc[pre2]), "change2Adapt": float(acc[post2]),
            "recovery1": recovery(post1), "recovery2": recovery(post2),
            "totalOutputs": int(counts.sum()), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- digits
DIGITS_MODES = ("ChainCorrected", "ChainFaithful", "Legacy", "DTP", "SGD", "Adam")


def run_digits(mode: str, backend, seed: int, rate: float, tuning: bool, epochs: int = 5
               ) -> dict:
    """scikit-learn digits, 64 → 32 tanh → 10, batch 16, ``epochs`` epochs at ``rate``.

    Softmax cross-entropy for every mode except ``ChainFaithful`` (Loom's SSE on sigmoid
    outputs) and ``Legacy`` (Loom's legacy targets are one-hot outputs, sigmoid). Split per
    seed: 1000 train / 397 validation (tuning) / 400 test.
    """
    from sklearn.datasets import load_digits

    import loomx
    from loomx.layers import Dense

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x, y = (d.data[order] / 16.0).astype(np.float32), d.target[order]
    ev = slice(1000, 1397) if tuning else slice(1397, None)
    sse = mode in ("ChainFaithful", "Legacy")
    net = loomx.Network.chain([Dense(32, activation="tanh"),
                               Dense(10, activation="sigmoid" if sse else "identity")],
                              input_shape=(64,), backend=backend, seed=seed)
    xtr, ytr = backend.from_host(x[:1000]), backend.from_host(y[:1000])
    t0 = time.perf_counter()
    if mode in ("SGD", "Adam"):
        xp = backend.xp
        opt = (SGD if mode == "SGD" else Adam)(net, lr=rate)
        rng = np.random.default_rng(seed + 1)
        for _ in range(epochs):
            perm = rng.permutation(1000)
            for i in range(0, 1000, 16):
                idx = perm[i:i + 16]
                net.zero_grad()
                out, ctx = net.forward(backend.from_host(x[idx]), True)
                z = out - xp.max(out, axis=1, keepdims=True)
                p = xp.exp(z) / xp.sum(xp.exp(z), axis=1, keepdims=True)
                net.backward((p - backend.from_host(_onehot(y[idx], 10))) / len(idx), ctx)
                opt.step()
    else:
        cfg = {"ChainCorrected": TweenConfig(loss="softmax_ce"),
               "ChainFaithful": TweenConfig.faithful(),
               "Legacy": TweenConfig(use_chain_rule=False),
               "DTP": TweenConfig(method="dtp", loss="softmax_ce")}[mode]
        cfg.early_stop_threshold = 101.0
        tr = TweenTrainer(net, cfg, telemetry=False, seed=seed)
        tr.fit(xtr, ytr, epochs=epochs, rate=rate, batch_size=16, metric="accuracy")
    seconds = time.perf_counter() - t0
    acc = (predict(net, backend, x[ev], 10) == y[ev]).mean() * 100
    return {"test_acc": float(acc), "seconds": seconds}
