"""Side-by-side timing: warm-up, then alternating blocks of calls, reported as medians.

Contenders are timed in the same process in alternating blocks. The block order rotates every
round so no contender always runs first.

After a call, a library's idle thread pool keeps spinning for a while (OpenBLAS's threads for
about 0.1 s, PyTorch's OpenMP threads for several milliseconds) and takes a core from whatever
runs next. Measured on the 2-core CPU of ``benchmarks/RESULTS.md`` with the MLP step (case a) at
2 threads, a call right after the other library's took 11–21 ms for loomx (5.5–6 ms otherwise)
and 13–14 ms for PyTorch (5.3 ms). Sleeping the spin off is no cure: on that (virtual) machine
an idle pause leaves thread hand-offs slow for several calls afterwards (loomx's BatchParallel
step: 10–11 ms in the three calls after a 0.15 s sleep and one untimed call, 6 ms without the
sleep). So each block starts with ``lead_s`` seconds of untimed calls of its own contender,
back to back, which outlast the previous contender's spinning threads: each library is timed
as it runs in a training loop, not in the other library's wake.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


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
    """Per-call seconds of one contender: median, quartiles, the number of timed calls and
    the median of each block (one per round, in round order; see :func:`paired_ratio`)."""

    median: float
    p25: float
    p75: float
    n: int
    blocks: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "p25_s": self.p25, "p75_s": self.p75, "n": self.n,
                "block_medians_s": list(self.blocks)}


def paired_ratio(mine: dict, ref: dict) -> float:
    """``mine / ref`` time ratio of two contenders timed together (``Timing.as_dict()`` form).

    The median, over rounds, of the ratio of their block medians in the same round; blocks of
    one round run within about a second of each other, so a slow spell of the machine (on the
    virtual machine of ``benchmarks/RESULTS.md`` the same call runs up to 1.5× slower for
    seconds at a time) changes both sides of a round's ratio alike, where it may hit one
    contender's overall median more than the other's. Falls back to the ratio of the overall
    medians when either side lacks block medians or the rounds differ.
    """
    a, b = mine.get("block_medians_s") or [], ref.get("block_medians_s") or []
    if len(a) != len(b) or not a:
        return mine["median_s"] / ref["median_s"]
    return statistics.median(x / y for x, y in zip(a, b))


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
                     budget_s: float | None = None, lead_s: float = 0.0) -> dict[str, Timing]:
    """Time every op of ``ops`` in alternating blocks; return per-call statistics by name.

    Args:
        ops: contender name → :class:`Op`.
        warmup: untimed calls of each op before timing (caches, allocator, thread pools).
        rounds: number of alternation rounds; each round runs a block of every op.
        block: timed calls per op per round (so each op gets ``rounds · block`` samples).
        budget_s: optional wall-clock budget; rounds stop early (after at least two) once spent.
        lead_s: untimed calls, back to back, for this many seconds at the start of each block
            (at least one call when positive).
    """
    for op in ops.values():
        for _ in range(warmup):
            time_call(op)
    samples: dict[str, list[float]] = {name: [] for name in ops}
    blocks: dict[str, list[float]] = {name: [] for name in ops}
    names = list(ops)
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect()
            if lead_s > 0:
                lead_end = time.perf_counter() + lead_s
                while True:
                    time_call(ops[name])
                    if time.perf_counter() >= lead_end:
                        break
            timed = [time_call(ops[name]) for _ in range(block)]
            samples[name] += timed
            blocks[name].append(statistics.median(timed))
        if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
            break
    return {name: Timing(statistics.median(s), _quantile(s, 0.25), _quantile(s, 0.75), len(s),
                         blocks[name])
            for name, s in samples.items()}
