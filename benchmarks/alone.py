"""``python -m benchmarks.alone``: one workload's op alone in its process, with page faults.

The side-by-side runner times loomx and PyTorch in one process, so both run under the same
allocator settings (loomx's numpy backend pins glibc's thresholds: ``backends/allocator.py``).
This tool times one library's op with nothing else loaded, which is what a user's training
loop gets out of the box, and reports the page faults per call next to the median time::

    python -m benchmarks.alone --case b_cnn --threads 1
    python -m benchmarks.alone --case b_cnn --threads 2 --workers 2
    python -m benchmarks.alone --case b_cnn --threads 2 --torch      # PyTorch eager, CPU

With ``--torch`` no numpy backend is built, so glibc keeps its own dynamic thresholds
("host allocator not tuned"); those rise with whatever the process allocated and freed
before (here: the benchmark data), so PyTorch's page faults vary from run to run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _faults() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.alone", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="b_cnn", help="case key (a_mlp, b_cnn, c_lstm, ...)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    parser.add_argument("--workers", type=int, default=None,
                        help="split training steps over this many threads (BatchParallel)")
    parser.add_argument("--backend", default="numpy", help="loomx backend spec")
    parser.add_argument("--torch", action="store_true",
                        help="time the PyTorch eager op of the case instead (CPU; no numpy "
                             "backend is built, so the host allocator is not tuned)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="the tiny shapes of the tests")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.calls < 1 or args.warmup < 0 or \
            (args.workers is not None and args.workers < 1):
        parser.error("--threads, --workers and --calls must be at least 1, --warmup at least 0")
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)  # before numpy loads OpenBLAS

    import threadpoolctl

    import loomx

    from . import loomx_side
    from .cases import Missing
    from .workloads import all_cases

    threadpoolctl.threadpool_limits(args.threads)
    cases = {c.key: c for c in all_cases(args.quick)}
    if args.case not in cases:
        parser.error(f"unknown case {args.case!r}; choose from {', '.join(cases)}")
    if args.torch:
        if args.workers:
            parser.error("--workers splits loomx training steps; it does not apply to --torch")
        import torch

        torch.set_num_threads(args.threads)
        op, label = cases[args.case].torch(torch.device("cpu")), "torch[cpu]"
    else:
        loomx_side.WORKERS = args.workers
        backend = loomx.get_backend(args.backend)
        try:
            op = cases[args.case].loomx(backend)
        except Missing as exc:
            print(f"{args.case}: not available on loomx[{args.backend}]: {exc}",
                  file=sys.stderr)
            return 1
        label = f"loomx[{backend.name}]"
    from loomx.backends.allocator import host_allocator_label

    allocator = host_allocator_label()
    times = []
    for _ in range(args.warmup):
        if op.setup:
            op.setup()
        op.run()
    faults = 0
    for _ in range(args.calls):
        if op.setup:
            op.setup()
        f0 = _faults()
        t0 = time.perf_counter()
        op.run()
        if op.sync:
            op.sync()
        times.append(time.perf_counter() - t0)
        if f0 is not None:
            faults += _faults() - f0  # the timed call only, not its untimed setup
    faults = "n/a" if _faults() is None else f"{faults / args.calls:.0f}"
    workers = args.workers if loomx_side.WORKERS_USED else None
    print(f"{args.case} {label} threads={args.threads} workers={workers}: "
          f"median {statistics.median(times) * 1e3:.2f} ms over {args.calls} calls, "
          f"page faults per call {faults}, host allocator {allocator}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
