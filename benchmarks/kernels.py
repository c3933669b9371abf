"""Fused kernels against the unfused array-API composition they replace.

``python -m benchmarks.kernels --backend cupy`` times, for every fast kernel the backend
registers, the loomx call that uses it twice in the same process: once on the backend as it is
(the kernel runs) and once on the same backend with no kernels (the layer's array-API reference
path runs, the "unfused composition"). Inputs are identical; the two are timed in alternating
blocks (:func:`benchmarks.timing.time_alternating`) and the report gives both medians and the
speedup unfused/fused (target on a GPU: ≥ 1.5×).

Each timed call runs ``--inner`` launches and then waits for the device, so the per-launch time
does not carry a full synchronisation. Rows × columns default to 8192 × 4096 (float32, 128 MiB
per array) on a GPU and 1024 × 1024 on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .timing import Op, paired_ratio, time_alternating


@dataclass
class KernelCase:
    """One loomx call that a backend kernel speeds up.

    ``make(backend, rows, cols)`` builds the inputs on ``backend`` (from fixed seeds, so both
    sides get equal data) and returns the call; ``kernels`` are the names it needs.
    """

    name: str
    kernels: tuple[str, ...]
    make: Callable[..., Callable[[], object]]
    #: the unfused side drops only ``kernels`` (the backend's other kernels stay) instead of
    #: taking the reference path everywhere
    only_these: bool = False


def _rand(backend, shape, seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    host = (rng.standard_normal(shape) * scale).astype(np.float32)
    return backend.from_host(host)


def _activation(name: str, inplace: bool = False) -> KernelCase:
    """Bias + activation; ``inplace``: written over a fresh matrix product (``owned``, a Dense
    or convolution forward). The same array is then overwritten at every call; timing does
    not mind."""

    def make(backend, rows, cols):
        from loomx.layers.activations import ACTIVATIONS, bias_activation

        act = ACTIVATIONS[name]
        x, b = _rand(backend, (rows, cols), 0, 2.0), _rand(backend, (cols,), 1)
        return lambda: bias_activation(backend, act, x, b, owned=inplace)

    if inplace:
        return KernelCase(f"bias + {name}, in place", (f"bias_act_inplace:{name}",), make)
    return KernelCase(f"bias + {name}", (f"bias_act:{name}",), make)


def _activation_backward(name: str, inplace: bool = False) -> KernelCase:
    """The activation's gradient; ``inplace``: written over ``dy`` (``owned``, a convolution's
    own copy of it)."""

    def make(backend, rows, cols):
        from loomx.layers.activations import ACTIVATIONS, activation_backward

        act = ACTIVATIONS[name]
        z = _rand(backend, (rows, cols), 0, 2.0)
        y, dy = act.forward(backend, z), _rand(backend, (rows, cols), 2)
        return lambda: activation_backward(backend, act, z, y, dy, owned=inplace)

    if inplace:
        return KernelCase(f"{name} backward, in place", (f"act_backward_inplace:{name}",),
                          make)
    return KernelCase(f"{name} backward", (f"act_backward:{name}",), make)


def _window_scatter() -> KernelCase:
    """The input gradient's col2im of a 3×3 stride-2 convolution with 32 input channels
    (benchmark b's second convolution at ``rows`` = 1024: 64 images of 28², padded to 30²)."""

    def make(backend, rows, cols):
        from loomx.layers._windows import scatter_windows

        batch = max(1, rows // 16)
        windows = _rand(backend, (batch, 14, 14, 9, 32), 14)
        return lambda: scatter_windows(backend, windows, (30, 30), (3, 3), (2, 2), (1, 1))

    return KernelCase("conv window gradient (col2im), 3×3/2, 32 ch", ("window_scatter_add",),
                      make)


def _conv_chunks() -> KernelCase:
    """Forward + backward of benchmark b's second convolution (``[64, 32, 28, 28]`` at
    ``rows`` = 1024, 3×3, stride 2, 64 filters, ReLU), in chunks against the same backend's
    whole-batch path (its other kernels, im2col and the window scatter included, stay)."""

    def make(backend, rows, cols):
        from loomx.layers import Conv2D

        batch = max(1, rows // 16)
        layer = Conv2D(64, 3, stride=2, padding=1, activation="relu")
        layer.build((32, 28, 28), backend, rng=0)
        x, dy = _rand(backend, (batch, 32, 28, 28), 15), _rand(backend, (batch, 64, 14, 14), 16)

        def call():
            y, ctx = layer.forward(x, True)
            return layer.backward(dy, ctx)

        return call

    return KernelCase("conv 32→64, 3×3/2, forward + backward, against the gather path",
                      ("window_matmul", "window_matmul_backward"), make, only_these=True)


def _softmax(log: bool, backward: bool) -> KernelCase:
    name = ("log_softmax" if log else "softmax") + ("_backward" if backward else "")

    def make(backend, rows, cols):
        from loomx.layers import softmax as sm

        xp = backend.xp
        kernel = backend.kernel(name)
        x = _rand(backend, (rows, cols), 3, 3.0)
        if not backward:
            ref = sm.log_softmax if log else sm.softmax
            return (lambda: kernel(x)) if kernel else (lambda: ref(xp, x))
        y = (sm.log_softmax if log else sm.softmax)(xp, x)
        g = _rand(backend, (rows, cols), 4)
        ref = sm.log_softmax_vjp if log else sm.softmax_vjp
        return (lambda: kernel(y, g)) if kernel else (lambda: ref(xp, y, g))

    return KernelCase(name.replace("_", " "), (name,), make)


def _norm(kind: str, backward: bool) -> KernelCase:
    prefix = "layer_norm" if kind == "LayerNorm" else "rms_norm"

    def make(backend, rows, cols):
        import loomx.layers as layers

        layer = getattr(layers, kind)()
        layer.build((cols,), backend)
        x = _rand(backend, (rows, cols), 5)
        if not backward:
            return lambda: layer.forward(x, train=True)
        _, ctx = layer.forward(x, train=True)
        dy = _rand(backend, (rows, cols), 6)
        return lambda: layer.backward(dy, ctx)

    part = "backward" if backward else "forward"
    return KernelCase(f"{kind} {part}", (f"{prefix}_{part}",), make)


def _adam() -> KernelCase:
    def make(backend, rows, cols):
        import loomx.layers as layers
        from loomx.train.optim import AdamW

        layer = layers.Dense(cols, bias=False)
        layer.build((rows,), backend)
        layer.grads["weight"] = _rand(backend, tuple(layer.params["weight"].shape), 7, 1e-2)
        opt = AdamW(layer, lr=1e-3)
        return opt.step

    return KernelCase("AdamW step", ("adam_update",), make)


def _lstm_cell(backward: bool) -> KernelCase:
    name = "lstm_cell_backward" if backward else "lstm_cell_forward"

    def make(backend, rows, cols):
        from functools import partial

        from loomx.layers import recurrent

        xp, hidden = backend.xp, cols // 4
        forward = (backend.kernel("lstm_cell_forward")
                   or partial(recurrent.lstm_cell_forward, xp))
        xw, hw = _rand(backend, (rows, 4 * hidden), 8), _rand(backend, (rows, 4 * hidden), 9)
        c_prev = _rand(backend, (rows, hidden), 10)
        if not backward:
            return lambda: forward(xw, hw, c_prev)
        saved = forward(xw, hw, c_prev)
        i, f, g, o, _, tc, _ = saved
        dh, dc = _rand(backend, (rows, hidden), 11), _rand(backend, (rows, hidden), 12)
        dpx = backend.zeros((1, rows, 4 * hidden))
        cell = backend.kernel(name) or partial(recurrent.lstm_cell_backward, xp)
        return lambda: cell(i, f, g, o, c_prev, tc, dh, dc, dpx, 0)

    return KernelCase(f"LSTM cell {'backward' if backward else 'forward'}", (name,), make)


def _sgd() -> KernelCase:
    def make(backend, rows, cols):
        import loomx.layers as layers
        from loomx.train.optim import SGD

        layer = layers.Dense(cols, bias=False)
        layer.build((rows,), backend)
        layer.grads["weight"] = _rand(backend, tuple(layer.params["weight"].shape), 17, 1e-2)
        return SGD(layer, lr=1e-3).step

    return KernelCase("SGD step", ("sgd_update",), make)


def _silu_gate(backward: bool) -> KernelCase:
    name = "silu_gate_backward" if backward else "silu_gate_forward"

    def make(backend, rows, cols):
        from functools import partial

        from loomx.layers import ffn

        g, u = _rand(backend, (rows, cols), 18), _rand(backend, (rows, cols), 19)
        if not backward:
            forward = (backend.kernel(name) or partial(ffn.silu_gate_forward, backend.xp))
            return lambda: forward(g, u)
        s, dh = _rand(backend, (rows, cols), 20), _rand(backend, (rows, cols), 21)
        cell = backend.kernel(name) or partial(ffn.silu_gate_backward, backend.xp)
        return lambda: cell(g, u, s, dh)

    return KernelCase(f"SwiGLU gate {'backward' if backward else 'forward'}", (name,), make)


def _cross_entropy() -> KernelCase:
    def make(backend, rows, cols):
        from functools import partial

        from loomx.train.losses import cross_entropy_reference

        x = _rand(backend, (rows, 10), 22, 3.0)
        t = backend.from_host(np.eye(10, dtype=np.float32)[np.arange(rows) % 10])
        loss = (backend.kernel("softmax_cross_entropy")
                or partial(cross_entropy_reference, backend.xp))
        return lambda: loss(x, t)

    return KernelCase("cross-entropy loss + gradient, [rows, 10]", ("softmax_cross_entropy",),
                      make)


def _rope() -> KernelCase:
    def make(backend, rows, cols):
        from loomx.layers.rope import apply_rope_reference

        heads, steps = 8, 128
        x = _rand(backend, (max(1, rows // steps), heads, steps, 64), 23)
        cos, sin = _rand(backend, (steps, 32), 24), _rand(backend, (steps, 32), 25)
        fused = backend.kernel("rope")
        if fused is None:
            return lambda: apply_rope_reference(backend.xp, x, cos, sin, 64, "half")
        return lambda: fused(x, cos, sin, 64, "half")

    return KernelCase("RoPE of queries, 8 heads × 128 steps × 64", ("rope",), make)


def _sum_rows() -> KernelCase:
    def make(backend, rows, cols):
        from loomx.layers.dense import sum_rows

        a = _rand(backend, (49 * rows, 32), 13)  # a convolution's dz over B·P rows, 32 filters
        return lambda: sum_rows(backend, a)

    return KernelCase("bias gradient, [49·rows, 32]", ("sum_rows",), make)


def kernel_cases() -> list[KernelCase]:
    """Every case, in report order."""
    cases = []
    for act in ("relu", "gelu", "silu"):
        cases += [_activation(act), _activation_backward(act)]
    cases += [_activation("relu", inplace=True), _activation_backward("relu", inplace=True),
              _window_scatter(), _conv_chunks()]
    cases += [_softmax(log, bwd) for log in (False, True) for bwd in (False, True)]
    cases += [_norm(kind, bwd) for kind in ("LayerNorm", "RMSNorm") for bwd in (False, True)]
    cases += [_adam(), _sgd(), _lstm_cell(False), _lstm_cell(True), _sum_rows()]
    cases += [_silu_gate(False), _silu_gate(True), _cross_entropy(), _rope()]
    return cases


def _op(backend, fn, inner: int) -> Op:
    def run():
        for _ in range(inner):
            fn()

    return Op(run=run, sync=backend.sync)


def run_cases(backend, rows: int, cols: int, inner: int, rounds: int,
              only: list[str] | None = None) -> list[dict]:
    """Time every registered case on ``backend`` fused and unfused; one dict per case."""
    results = []
    plain = backend.without_kernels()
    for case in kernel_cases():
        if only and not any(k in case.name or any(k in n for n in case.kernels)
                            for k in only):
            continue
        missing = [k for k in case.kernels if backend.kernel(k) is None]
        row = {"case": case.name, "kernels": list(case.kernels), "shape": [rows, cols]}
        if missing:
            results.append({**row, "skipped": f"not registered: {', '.join(missing)}"})
            continue
        unfused = backend.without_kernels(*case.kernels) if case.only_these else plain
        with backend.activate():
            ops = {"fused": _op(backend, case.make(backend, rows, cols), inner),
                   "unfused": _op(unfused, case.make(unfused, rows, cols), inner)}
            timing = time_alternating(ops, warmup=2, rounds=rounds, block=3)
        fused, unfused = timing["fused"].median / inner, timing["unfused"].median / inner
        # paired by round, as the side-by-side ratios (benchmarks.timing.paired_ratio)
        speedup = paired_ratio(timing["unfused"].as_dict(), timing["fused"].as_dict())
        results.append({**row, "fused_s": fused, "unfused_s": unfused, "speedup": speedup})
    return results


def markdown(results: list[dict], header: str) -> str:
    """The results as a Markdown table under a one-line ``header``."""
    lines = [header, "", "| call | kernel | fused ms | unfused ms | speedup |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        kernels = ", ".join(f"`{k}`" for k in r["kernels"])
        if "skipped" in r:
            lines.append(f"| {r['case']} | {kernels} | — | — | {r['skipped']} |")
        else:
            lines.append(f"| {r['case']} | {kernels} | {r['fused_s'] * 1e3:.3f} | "
                         f"{r['unfused_s'] * 1e3:.3f} | {r['speedup']:.2f}× |")
    return "\n".join(lines)


def _describe(backend) -> str:
    from .machine import machine_info

    m = machine_info()
    on_gpu = backend.library == "cupy" or "cuda" in str(backend.device)
    where = f"GPU {m['cuda_device']}" if on_gpu and "cuda_device" in m else f"CPU {m['cpu']}"
    return (f"{backend.describe()} on {where}; CuPy {m['cupy']}, PyTorch {m['torch']}, "
            f"numpy {m['numpy']}, commit {m['git_commit']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels",
        description="Time each fused kernel against the unfused composition it replaces.")
    parser.add_argument("--backend", default="cupy",
                        help="loomx backend spec (default cupy; also torch, torch:cuda, numpy)")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--cols", type=int, default=None)
    parser.add_argument("--inner", type=int, default=None,
                        help="launches per timed call (default 10 on a GPU, 1 on a CPU)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=None,
                        help="comma-separated case or kernel names (substring match)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--json", metavar="PATH", default=None)
    args = parser.parse_args(argv)

    from loomx.backends import get_backend

    backend = get_backend(args.backend)
    gpu = backend.library == "cupy" or "cuda" in str(backend.device)
    rows = args.rows or (16 if args.quick else 8192 if gpu else 1024)
    cols = args.cols or (32 if args.quick else 4096 if gpu else 1024)
    if rows < 1 or cols < 4:
        parser.error("--rows must be at least 1 and --cols at least 4 (the LSTM cases use "
                     "cols / 4 hidden units)")
    inner = args.inner or (10 if gpu and not args.quick else 1)
    rounds = 2 if args.quick else args.rounds
    only = args.only.split(",") if args.only else None
    results = run_cases(backend, rows, cols, inner, rounds, only)
    command = " ".join(["python -m benchmarks.kernels",
                        *(argv if argv is not None else sys.argv[1:])])
    header = f"{_describe(backend)}. Command: `{command}`"
    print(markdown(results, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
