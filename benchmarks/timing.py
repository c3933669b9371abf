"""Side-by-side timing: warm-up, then alternating blocks of calls, reported as medians.

Contenders are timed in the same process in alternating blocks (not alternating single calls:
a library's spinning idle BLAS/OpenMP threads would otherwise disturb the next call of the
other one). The block order rotates every round so no contender always runs first.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Op:
    """One timed operation: ``run()`` is timed; ``setup()`` (untimed) runs before each call.

    ``sync`` (untimed only in the sense that it is part of ``run``'s measured span) waits for
    queued device work; CPU ops leave it ``None``.
    """

    run: Callable[[], object]
    setup: Callable[[], object] | None = None
    sync: Callable[[], object] | None = None


@dataclass
class Timing:
    """Per-call seconds of one contender: median, quartiles and the number of timed calls."""

    median: float
    p25: float
    p75: float
    n: int

    def as_dict(self) -> dict:
        return {"median_s": self.median, "p25_s": self.p25, "p75_s": self.p75, "n": self.n}


def time_call(op: Op) -> float:
    """Seconds of one ``op.run()`` (and ``op.sync()``), after its untimed ``setup``."""
    if op.setup is not None:
        op.setup()
    t0 = time.perf_counter()
    op.run()
    if op.sync is not None:
        op.sync()
    return time.perf_counter() - t0


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_alternating(ops: dict[str, Op], warmup: int = 2, rounds: int = 5, block: int = 3,
                     budget_s: float | None = None) -> dict[str, Timing]:
    """Time every op of ``ops`` in alternating blocks; return per-call statistics by name.

    Args:
        ops: contender name → :class:`Op`.
        warmup: untimed calls of each op before timing (caches, allocator, thread pools).
        rounds: number of alternation rounds; each round runs a block of every op.
        block: timed calls per op per round (so each op gets ``rounds · block`` samples).
        budget_s: optional wall-clock budget; rounds stop early (after at least two) once spent.
    """
    for op in ops.values():
        for _ in range(warmup):
            time_call(op)
    samples: dict[str, list[float]] = {name: [] for name in ops}
    names = list(ops)
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect()
            for _ in range(block):
                samples[name].append(time_call(ops[name]))
        if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
            break
    return {name: Timing(statistics.median(s), _quantile(s, 0.25), _quantile(s, 0.75), len(s))
            for name, s in samples.items()}
