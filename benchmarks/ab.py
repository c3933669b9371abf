"""One workload with and without some of a backend's kernels, paired in one process.

``python -m benchmarks.ab --case b_cnn --backend cupy --without window_matmul,window_matmul_backward
--batch-scale 8`` builds the loomx side of the case twice, once on the backend and once on
``backend.without_kernels(...)`` (the layers then take their reference paths for those names),
and times the two alternately (:func:`benchmarks.timing.time_alternating`). The ratio is
paired by round, as in the side-by-side benchmark, so a slow spell of the machine slows both
sides of it alike. This is how a kernel's effect on a whole training step is measured, where
``python -m benchmarks.kernels`` measures the kernel alone.
"""

from __future__ import annotations

import argparse

from .timing import paired_ratio, time_alternating
from .workloads import all_cases


def compare(key: str, spec: str, without: list[str], scale: int = 1, rounds: int = 9,
            block: int = 5, quick: bool = False) -> dict:
    """``{"with_s", "without_s", "ratio"}`` for case ``key`` on backend ``spec`` against the
    same backend without the kernels ``without`` (medians in seconds; ``ratio`` is with /
    without, paired by round)."""
    from loomx.backends import get_backend

    cases = {c.key: c for c in all_cases(quick=quick, scale=scale)}
    if key not in cases:
        raise SystemExit(f"unknown case {key!r}; known: {', '.join(cases)}")
    backend = get_backend(spec)
    unknown = [name for name in without if backend.kernel(name) is None]
    if unknown:
        raise SystemExit(f"{backend.name} has no kernel {', '.join(unknown)}; it has: "
                         f"{', '.join(sorted(backend.kernels))}")
    plain = backend.without_kernels(*without)
    with backend.activate():
        ops = {"with": cases[key].loomx(backend), "without": cases[key].loomx(plain)}
        timing = time_alternating(ops, warmup=3, rounds=rounds, block=block)
    return {"with_s": timing["with"].median, "without_s": timing["without"].median,
            "ratio": paired_ratio(timing["with"].as_dict(), timing["without"].as_dict())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab",
        description="Time one workload with and without some backend kernels, paired.")
    parser.add_argument("--case", required=True, help="case key (a_mlp, b_cnn, ...)")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--without", required=True,
                        help="comma-separated kernel names to drop on the second side")
    parser.add_argument("--batch-scale", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args(argv)
    without = [name.strip() for name in args.without.split(",") if name.strip()]
    result = compare(args.case, args.backend, without, args.batch_scale, args.rounds,
                     quick=args.quick)
    print(f"{args.case} on {args.backend} (batch x{args.batch_scale}): with the kernels "
          f"{result['with_s'] * 1e3:.3f} ms, without {', '.join(without)} "
          f"{result['without_s'] * 1e3:.3f} ms, paired ratio {result['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
