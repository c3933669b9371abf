"""Where one loomx benchmark call spends its time, layer by layer.

``python -m benchmarks.profile --case b_cnn --backend cupy --batch-scale 8`` builds the loomx
side of one case from :mod:`benchmarks.workloads`, times the whole call (median, as the side by
side benchmark does), then runs it again with every layer's ``forward`` and ``backward`` wrapped
in device synchronisations and timers. The table gives each layer class's exclusive time
(nested layers' time is subtracted from their container's) per call, and what is left over:
the loss, the optimizer, and the glue between layers.

The synchronisations cost a little and remove overlap between the host and the device, so the
per-layer times add up to more than the plain median; they say where the time goes, not how
fast the call is.

``--host`` answers the other question a GPU run raises: is the call bound by the host issuing
work? It times the call without its final synchronisation (the host's time to queue it; close
to the median when the device waits for the host) and lists the Python functions the host spends
that time in (``cProfile``, exclusive time and calls per call): how many array-library calls a
step makes, and which wrappers cost the most.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace

from .timing import time_call
from .workloads import all_cases


def _layer_classes() -> list[type]:
    from loomx.layers.base import Layer

    seen, todo = [], [Layer]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.append(sub)
                todo.append(sub)
    return seen


#: helpers timed on their own (module, function): the window gather and scatter of the
#: convolutions, as the convolution module imported them
FUNCTIONS = (("loomx.layers.conv", "gather_windows"), ("loomx.layers.conv", "scatter_windows"))


class Recording:
    """What :func:`instrument` yields: ``records`` maps ``(name, part)`` to seconds of
    exclusive time; nothing is recorded inside ``with recording.paused():``."""

    def __init__(self):
        self.records: dict[tuple[str, str], float] = defaultdict(float)
        self.on = True

    @contextmanager
    def paused(self):
        self.on = False
        try:
            yield
        finally:
            self.on = True


@contextmanager
def instrument(sync, backend=None):
    """Wrap every layer class's ``forward``/``backward``, the :data:`FUNCTIONS` and the
    backend's kernels; yields a :class:`Recording`. Everything is restored on exit."""
    import importlib

    recording = Recording()
    records = recording.records
    stack: list[float] = []  # time spent in nested calls of the call on top
    undo = []

    def timed(fn, key):
        def call(*args, **kwargs):
            if not recording.on:
                return fn(*args, **kwargs)
            sync()
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                spent = time.perf_counter() - t0
                nested = stack.pop()
                records[key(args)] += spent - nested
                if stack:
                    stack[-1] += spent

        return call

    def patch(owner, attr, value):
        undo.append((owner, attr, owner[attr] if isinstance(owner, dict)
                     else getattr(owner, attr)))
        if isinstance(owner, dict):
            owner[attr] = value
        else:
            setattr(owner, attr, value)

    for cls in _layer_classes():
        for method in ("forward", "backward"):
            if method in cls.__dict__:
                patch(cls, method, timed(cls.__dict__[method],
                                         lambda a, m=method: (type(a[0]).__name__, m)))
    for module, name in FUNCTIONS:
        mod = importlib.import_module(module)
        if hasattr(mod, name):
            patch(mod, name, timed(getattr(mod, name), lambda a, n=name: (n, "")))
    if backend is not None:
        for name, fn in list(backend.kernels.items()):
            patch(backend.kernels, name, timed(fn, lambda a, n=name: (f"kernel {n}", "")))
    try:
        yield recording
    finally:
        for owner, attr, original in reversed(undo):
            if isinstance(owner, dict):
                owner[attr] = original
            else:
                setattr(owner, attr, original)


def _warmed(key: str, spec: str, scale: int, calls: int, quick: bool):
    """``(case, backend, op, median seconds)`` of case ``key``'s loomx side on ``spec``, after
    three untimed calls; call it with the backend active."""
    from loomx.backends import get_backend

    cases = {c.key: c for c in all_cases(quick=quick, scale=scale)}
    if key not in cases:
        raise SystemExit(f"unknown case {key!r}; known: {', '.join(cases)}")
    case = cases[key]
    backend = get_backend(spec)
    with backend.activate():
        op = case.loomx(backend)
        for _ in range(3):
            time_call(op)
        plain = statistics.median(time_call(op) for _ in range(calls))
    return case, backend, op, plain


def profile(key: str, spec: str, scale: int = 1, calls: int = 10, quick: bool = False) -> str:
    """The Markdown profile of case ``key`` on backend ``spec``."""
    case, backend, op, plain = _warmed(key, spec, scale, calls, quick)
    with backend.activate():
        sync = op.sync or (lambda: None)
        run_only = replace(op, setup=None)
        total = 0.0
        with instrument(sync, backend) as recording:
            for _ in range(calls):  # the untimed setup (a decode's prefill) is not recorded
                if op.setup is not None:
                    with recording.paused():
                        op.setup()
                total += time_call(run_only)
        total /= calls
        records = recording.records
    rows = sorted(records.items(), key=lambda kv: -kv[1])
    layers = sum(records.values()) / calls
    lines = [f"{case.title} on {backend.describe()}: median {plain * 1e3:.3f} ms per call; "
             f"instrumented {total * 1e3:.3f} ms", "",
             "| layer or function | method | ms per call | share |", "|---|---|---:|---:|"]
    for (name, method), spent in rows:
        lines.append(f"| {name} | {method} | {spent / calls * 1e3:.3f} | "
                     f"{spent / calls / total:.0%} |")
    rest = total - layers
    lines.append(f"| (loss, optimizer, glue) | | {rest * 1e3:.3f} | {rest / total:.0%} |")
    return "\n".join(lines)


def host_profile(key: str, spec: str, scale: int = 1, calls: int = 10, quick: bool = False,
                 top: int = 25) -> str:
    """The Markdown host-side profile of case ``key`` on backend ``spec``: the median call with
    and without its final synchronisation, then the ``top`` functions by exclusive host time."""
    case, backend, op, plain = _warmed(key, spec, scale, calls, quick)
    with backend.activate():
        sync = op.sync or (lambda: None)
        issue = []
        for _ in range(calls):
            if op.setup is not None:
                op.setup()
            sync()  # an empty queue: the call's own launches are what is timed
            t0 = time.perf_counter()
            op.run()
            issue.append(time.perf_counter() - t0)
            sync()
        profiler = cProfile.Profile()
        for _ in range(calls):
            if op.setup is not None:
                op.setup()
            sync()
            profiler.enable()
            op.run()
            profiler.disable()
            sync()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])
    every = sum(nc for _, nc, _, _, _ in stats.values()) / calls
    lines = [f"{case.title} on {backend.describe()}: median {plain * 1e3:.3f} ms per call; "
             f"host issues it in {statistics.median(issue) * 1e3:.3f} ms (no final sync); "
             f"{every:.0f} Python-level calls per call (profiled)", "",
             "| function | calls per call | host µs per call | µs per function call |",
             "|---|---:|---:|---:|"]
    for (file, line, name), (_, nc, tt, _, _) in rows[:top]:
        where = name if file == "~" else f"{name} ({_short(file)}:{line})"
        lines.append(f"| {where} | {nc / calls:.0f} | {tt / calls * 1e6:.0f} | "
                     f"{tt / nc * 1e6:.2f} |")
    return "\n".join(lines)


def _short(path: str) -> str:
    """The last two parts of a source path (``array_api_compat/_aliases.py``)."""
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile",
                                     description="Per-layer time of one loomx benchmark call.")
    parser.add_argument("--case", action="append", required=True,
                        help="case key (a_mlp, b_cnn, c_lstm, d_transformer, ...); repeatable")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--batch-scale", type=int, default=1)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--host", action="store_true",
                        help="host-side profile: the call without its final sync, and the "
                             "Python functions the host spends it in (cProfile)")
    parser.add_argument("--top", type=int, default=25, help="rows of the --host table")
    args = parser.parse_args(argv)
    for key in args.case:
        if args.host:
            print(host_profile(key, args.backend, args.batch_scale, args.calls, args.quick,
                               args.top))
        else:
            print(profile(key, args.backend, args.batch_scale, args.calls, args.quick))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
