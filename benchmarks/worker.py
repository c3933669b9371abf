"""One benchmark process at one fixed thread count (started by the runner, one per count).

BLAS libraries fix their thread pools when they load, so the runner starts this module in a
fresh interpreter with ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set; here
the limits are applied once more through ``threadpoolctl`` and ``torch.set_num_threads``.
Prints one JSON document (or writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .cases import Case, Missing
from .timing import Op, time_alternating

TORCH = "torch"
PLAIN = "numpy (plain)"
#: loomx's numpy backend without any of its kernels: the layers' array-API reference code, the
#: part of the overhead line that isolates the abstraction (timed where a case has ``plain``)
BARE = "numpy (loomx reference path)"


def contender_name(spec: str) -> str:
    """Column name of a loomx backend spec: ``loomx[numpy]``."""
    return f"loomx[{spec}]"


def _limit_threads(threads: int) -> str:
    """Limit PyTorch and numpy's BLAS to ``threads``; return how numpy's BLAS was limited."""
    import torch

    torch.set_num_threads(threads)
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(threads)
        return "threadpoolctl + OPENBLAS_NUM_THREADS"
    except ImportError:
        return "OPENBLAS_NUM_THREADS"


#: On a GPU every workload with a CPU target has the same one: loomx/PyTorch CUDA time ≤ 1.25.
GPU_TARGET = 1.25


#: seconds of untimed calls before each CPU block: OpenBLAS's idle threads spin for about
#: 0.1 s after a call
LEAD_S = 0.15


def _target(case, device) -> float | None:
    if case.target is None or device.type != "cuda":
        return case.target
    return GPU_TARGET


def _reference_device(specs: list[str]):
    import torch

    gpu = any(s.startswith("cupy") or "cuda" in s for s in specs)
    return torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")


def _loomx_builder(case: Case, spec: str, threads: int):
    """``() → Op`` of a loomx contender. ``"numpy+workers"`` is the numpy backend with each
    training step's batch split over ``threads`` CPU threads (``BatchParallel``)."""
    from loomx.backends import get_backend

    from . import loomx_side

    base, _, option = spec.partition("+")
    if not option:
        return lambda: case.loomx(get_backend(base))
    if option != "workers":
        raise ValueError(f"unknown contender option {option!r} in {spec!r}")

    def build() -> Op:
        loomx_side.WORKERS, loomx_side.WORKERS_USED = threads, False
        try:
            op = case.loomx(get_backend(base))
            if not loomx_side.WORKERS_USED:
                raise Missing("workers split training steps only")
            return op
        finally:
            loomx_side.WORKERS = None

    return build


def _bare_numpy():
    from loomx.backends import get_backend

    return get_backend("numpy").without_kernels()


def _build(case: Case, specs: list[str], device, with_plain: bool,
           threads: int = 1) -> tuple[dict, dict]:
    ops: dict[str, Op] = {}
    missing: dict[str, str] = {}
    builders = [(contender_name(s), _loomx_builder(case, s, threads)) for s in specs]
    builders.append((TORCH, lambda: case.torch(device)))
    if with_plain and case.plain is not None:
        builders.append((PLAIN, case.plain))
        if "numpy" in specs:
            builders.append((BARE, lambda: case.loomx(_bare_numpy())))
    for name, build in builders:
        try:
            op = build()
            if op.setup is not None:  # probe once: a failing op never enters the timing
                op.setup()
            op.run()
            if op.sync is not None:
                op.sync()
            ops[name] = op
        except Missing as exc:
            missing[name] = f"missing: {exc}"
        except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the rest
            missing[name] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
    return ops, missing


class ForeignLoad:
    """CPU cores used by other processes while a case ran (busy system time minus ours)."""

    def __init__(self):
        try:
            import psutil
        except ImportError:
            self.psutil = None
            return
        self.psutil = psutil
        self.me = psutil.Process()
        self.start()

    def _busy(self) -> tuple[float, float, float]:
        t = self.psutil.cpu_times()
        mine = self.me.cpu_times()
        busy = t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) \
            + getattr(t, "softirq", 0.0)
        return busy, mine.user + mine.system + mine.children_user + mine.children_system, \
            time.perf_counter()

    def start(self) -> None:
        if self.psutil is not None:
            self._t0 = self._busy()

    def wait_quiet(self, max_wait_s: float, below: float = 0.3) -> None:
        """Wait (up to ``max_wait_s``) until other processes use fewer than ``below`` cores."""
        if self.psutil is None or max_wait_s <= 0:
            return
        deadline = time.perf_counter() + max_wait_s
        while time.perf_counter() < deadline:
            self.start()
            time.sleep(1.0)
            if (self.cores() or 0.0) < below:
                return

    def cores(self) -> float | None:
        """Average number of cores other processes kept busy since :meth:`start`."""
        if self.psutil is None:
            return None
        busy, mine, now = self._busy()
        b0, m0, t0 = self._t0
        return max(0.0, ((busy - b0) - (mine - m0)) / max(now - t0, 1e-9))


def run_cases(cases: list[Case], specs: list[str], threads: int, quick: bool,
              log=print, wait_quiet_s: float = 0.0) -> list[dict]:
    """Time every case at ``threads``; return one JSON-able record per case."""
    device = _reference_device(specs)
    warmup, rounds, block, budget = (1, 2, 1, 2.0) if quick else (2, 7, 3, 25.0)
    # CPU contenders' idle threads spin after each call (benchmarks/timing.py): each block
    # starts with untimed calls that outlast the previous contender's spinning threads
    lead = 0.0 if quick or device.type != "cpu" else LEAD_S
    records = []
    foreign = ForeignLoad()
    for case in cases:
        foreign.wait_quiet(wait_quiet_s)
        t0 = time.perf_counter()
        foreign.start()
        ops, missing = _build(case, specs, device, with_plain=not device.type == "cuda",
                              threads=threads)
        timings = time_alternating(ops, warmup=warmup, rounds=rounds, block=block,
                                   budget_s=budget, lead_s=lead) if ops else {}
        records.append({
            "key": case.key, "title": case.title, "suite": case.suite, "threads": threads,
            "items": case.items, "item_name": case.item_name, "flops": case.flops,
            "target": _target(case, device), "reference": f"PyTorch eager ({device.type})",
            "timings": {k: v.as_dict() for k, v in timings.items()},
            "missing": missing,
            "foreign_cores": foreign.cores(),
        })
        log(f"[threads {threads}] {case.key}: " + ", ".join(
            [f"{k} {v.median * 1e3:.3f} ms" for k, v in timings.items()]
            + [f"{k} n/a" for k in missing]) + f"  ({time.perf_counter() - t0:.1f} s, "
            f"foreign load {records[-1]['foreign_cores'] or 0:.2f} cores)")
    return records


def main(argv: list[str] | None = None) -> int:
    """Time the requested cases at one thread count and emit the JSON document."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--backends", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-scale", type=int, default=1)
    parser.add_argument("--wait-quiet", type=float, default=0.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-tf32", action="store_true")
    args = parser.parse_args(argv)

    how = _limit_threads(args.threads)
    if args.no_tf32:
        import torch

        torch.backends.cudnn.allow_tf32 = False
    from .machine import machine_info
    from .plain import sgemm_gflops
    from .workloads import all_cases

    specs = [s for s in args.backends.split(",") if s]
    keys = args.cases.split(",")
    cases = [c for c in all_cases(args.quick, args.batch_scale) if c.key in keys]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if _reference_device(specs).type == "cuda":
        from .plain import cuda_sgemm_gflops

        size, source = 4096, "PyTorch CUDA"

        def measure_peak() -> float:
            return cuda_sgemm_gflops(size)
    else:
        size, source = (256 if args.quick else 1024), "numpy"

        def measure_peak() -> float:
            return sgemm_gflops(size, 3 if args.quick else 20)

    # set up the host allocator as a loomx numpy backend does, before anything is timed, so
    # that every contender runs under the same allocator settings from its first call
    from loomx.backends.allocator import tune_host_allocator

    tune_host_allocator()
    machine = machine_info(args.threads)
    peaks = [measure_peak()]
    log(f"[threads {args.threads}] sgemm peak {peaks[0]:.1f} GFLOP/s")
    results = run_cases(cases, specs, args.threads, args.quick, log, args.wait_quiet)
    peaks.append(measure_peak())
    log(f"[threads {args.threads}] sgemm peak after the cases {peaks[1]:.1f} GFLOP/s")
    doc = {
        "threads": args.threads, "thread_control": how, "batch_scale": args.batch_scale,
        "machine": machine,
        "sgemm_gflops": max(peaks), "sgemm_gflops_before_after": peaks, "sgemm_size": size,
        "sgemm_source": source, "results": results,
    }
    text = json.dumps(doc, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
