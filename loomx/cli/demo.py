"""``loomx demo``: the end-to-end tour, section by section.

The tour is a list of :class:`DemoSection` objects run in order on one shared
:class:`DemoContext`; further sections append themselves with :func:`add_section`. The first
section trains a grid network on scikit-learn's handwritten digits (bundled, offline) with
gradient descent and reports held-out accuracy, Loom's deviation score and the backend used.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import positive_int


@dataclass
class DemoContext:
    """What sections share: parsed arguments, the backend, data, and results by section."""

    args: argparse.Namespace
    backend: Any
    data: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)

    def say(self, text: str = "") -> None:
        """Print one indented line of the tour."""
        print(f"  {text}" if text else "", flush=True)


@dataclass(frozen=True)
class DemoSection:
    """One stop of the tour: ``run(ctx)`` prints what it does and stores its results."""

    name: str
    title: str
    run: Callable[[DemoContext], None]


SECTIONS: list[DemoSection] = []


def add_section(section: DemoSection) -> None:
    """Append ``section`` to the tour (a section with the same name is replaced)."""
    for i, s in enumerate(SECTIONS):
        if s.name == section.name:
            SECTIONS[i] = section
            return
    SECTIONS.append(section)


def digits_data(ctx: DemoContext) -> tuple[Any, Any, Any, Any]:
    """The digits split shared by every section (loaded once)."""
    if "digits" not in ctx.data:
        from ..train.data import load_digits

        ctx.data["digits"] = load_digits(test_fraction=0.2, seed=ctx.args.seed)
    return ctx.data["digits"]


def _train_section(ctx: DemoContext) -> None:
    from ..grid import Network
    from ..layers import Dense
    from ..train import evaluate, fit

    x, y, x_test, y_test = digits_data(ctx)
    ctx.say(f"data: {len(x)} training and {len(x_test)} held-out 8×8 images of the digits "
            "0-9 (scikit-learn, offline)")
    net = Network(2, 2, 1, layers=[Dense(128, activation="relu"), Dense(64, activation="relu"),
                                   Dense(32, activation="relu"), Dense(10)],
                  input_shape=(64,), backend=ctx.backend, seed=ctx.args.seed)
    ctx.say("network: a 2×2 grid, one layer per cell, visited (0,0) (0,1) (1,0) (1,1):")
    for line in net.summary().splitlines():
        ctx.say("  " + line)
    ctx.say(f"training: Adam, cosine schedule, {ctx.args.epochs} epochs, batch 32")
    start = time.perf_counter()
    history = fit(net, x, y, optimizer="adam", lr=3e-3, schedule="cosine",
                  epochs=ctx.args.epochs, batch_size=32, seed=ctx.args.seed,
                  progress=not ctx.args.no_progress)
    seconds = time.perf_counter() - start
    result = evaluate(net, x_test, y_test)
    ctx.say(f"final training loss: {history['loss'][-1]:.4f} "
            f"(first epoch {history['loss'][0]:.4f})")
    ctx.say(f"held-out accuracy: {100 * result.accuracy:.2f} % "
            f"({round(result.accuracy * result.samples)}/{result.samples})")
    ctx.say(f"deviation score: {result.deviation.score:.2f} / 100 (Loom's quality metric; "
            f"{result.deviation.failures} samples off by more than 100 %)")
    ctx.say(f"trained in {seconds:.1f} s on {ctx.backend.describe()}")
    ctx.data["network"] = net
    ctx.results["train"] = {"accuracy": result.accuracy, "score": result.deviation.score,
                            "loss": result.loss, "seconds": seconds}


add_section(DemoSection("train", "Gradient descent on handwritten digits", _train_section))


def _tween_section(ctx: DemoContext) -> None:
    from ..tween import demo_section

    for line in demo_section(ctx.backend, quick=True):
        ctx.say(line)


add_section(DemoSection("tween", "Neural Tweening next to gradient descent", _tween_section))


def _loader_section(ctx: DemoContext) -> None:
    import tempfile

    from ..models import generate, load_model, sniff
    from ..models.toy import write_toy_llama

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_toy_llama(tmp, seed=ctx.args.seed)
        ctx.say("a random Llama-shaped checkpoint (model.safetensors + config.json), "
                "written offline; no model class, only tensor names and shapes:")
        report = sniff(folder)
        for line in str(report).splitlines()[:14]:
            ctx.say("  " + line)
        model = load_model(report, backend=ctx.backend)
        prompt = [1, 17, 42, 7]
        cached = generate(model, prompt, max_new_tokens=8, use_cache=True, stop=[])
        full = generate(model, prompt, max_new_tokens=8, use_cache=False, stop=[])
        ctx.say(f"greedy continuation of token ids {prompt}: {cached.token_ids}")
        same = "identical" if cached.token_ids == full.token_ids else "DIFFERENT"
        ctx.say(f"with the KV cache and without it: {same}")
    ctx.say("real checkpoints: loomx sniff FILE, loomx generate MODEL --prompt '...'")
    ctx.results["loader"] = {"tokens": cached.token_ids, "cache_matches": same == "identical"}


add_section(DemoSection("loader", "The shape-sniffing loader", _loader_section))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None,
                        help="backend spec: auto (CuPy if a GPU is usable, else numpy), numpy, "
                             "cupy, torch, torch:mps ... (default: $LOOMX_BACKEND, else auto)")
    parser.add_argument("--epochs", type=positive_int, default=20,
                        help="training epochs, >= 1 (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data split and weights")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--sections", default=None,
                        help="comma-separated section names to run (default: all)")


def run(args: argparse.Namespace) -> int:
    from ..backends import get_backend
    from ..errors import ConfigError

    backend = get_backend(args.backend or os.environ.get("LOOMX_BACKEND") or "auto")
    wanted = None if not args.sections else [s.strip() for s in args.sections.split(",")]
    known = [s.name for s in SECTIONS]
    if wanted and set(wanted) - set(known):
        raise ConfigError(f"unknown demo sections {sorted(set(wanted) - set(known))}; "
                          f"known: {', '.join(known)}")
    sections = [s for s in SECTIONS if wanted is None or s.name in wanted]
    ctx = DemoContext(args=args, backend=backend)
    print(f"loomx demo on {backend.describe()}", flush=True)
    for i, section in enumerate(sections, 1):
        print(f"\n[{i}/{len(sections)}] {section.title}", flush=True)
        section.run(ctx)
    return 0
