"""The benchmark runner: ``python -m benchmarks`` and ``loomx bench``.

Starts one worker process per thread count (BLAS thread pools are fixed when a library loads),
collects their JSON, prints the Markdown report and optionally writes ``RESULTS.md`` and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

from . import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = ("main", "layers", "all")
ALIASES = {"a": "a_mlp", "b": "b_cnn", "c": "c_lstm", "d": "d_transformer",
           "e": "e_prompt,e_decode", "f": "f_sample,f_tick"}


def _positive_ints(text: str) -> str:
    """``--threads``: comma-separated positive ints (kept as the string the workers get)."""
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive thread counts, "
                                         f"got {text!r}")
    return text


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _contenders(text: str) -> str:
    """``--backend``: comma-separated loomx backend specs, each optionally ``+workers`` (names
    only: whether a backend is usable here, each worker reports per case)."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    for spec in specs:
        base, _, option = spec.partition("+")
        if option not in ("", "workers"):
            raise argparse.ArgumentTypeError(f"unknown option {option!r} in {spec!r} (only "
                                             "'+workers')")
        if base.split(":")[0] not in ("numpy", "torch", "cupy", "strict"):
            raise argparse.ArgumentTypeError(f"unknown backend {base!r} in --backend; known: "
                                             "numpy, numpy+workers, torch, torch:cuda, cupy")
    if not specs:
        raise argparse.ArgumentTypeError("--backend names no backend")
    return ",".join(specs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The runner's options (shared by ``python -m benchmarks`` and ``loomx bench``)."""
    parser.add_argument("--suite", choices=SUITES, default="main",
                        help="main: workloads a–f; layers: forward+backward of single layers")
    parser.add_argument("--cases", default=None,
                        help="comma-separated case keys or letters a–f (overrides --suite), "
                             "e.g. 'a,c' or 'a_mlp,layer_dense'")
    parser.add_argument("--backend", default="numpy,numpy+workers,torch", type=_contenders,
                        help="comma-separated loomx backends to time (default "
                             "numpy,numpy+workers,torch); 'numpy+workers' splits each training "
                             "step's batch over as many CPU threads as the thread count; "
                             "'cupy' compares against PyTorch CUDA")
    parser.add_argument("--threads", default="1,2", type=_positive_ints,
                        help="comma-separated CPU thread counts, one process each (default 1,2)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: a smoke run, not a measurement")
    parser.add_argument("--batch-scale", type=_positive(int), default=1, metavar="N",
                        help="multiply the batch of workloads a–d and of the layer cases by N "
                             "(larger batches for GPUs; default 1)")
    parser.add_argument("--wait-quiet", type=_non_negative, default=0.0, metavar="SECONDS",
                        help="before each case, wait up to SECONDS for other processes to use "
                             "under 0.3 cores (default 0: do not wait)")
    parser.add_argument("--write", metavar="PATH", default=None,
                        help="update the 'Latest' table of PATH (e.g. benchmarks/RESULTS.md) "
                             "and append a history line")
    parser.add_argument("--json", metavar="PATH", default=None, help="write all results as JSON")
    parser.add_argument("--no-tf32", action="store_true",
                        help="PyTorch CUDA runs its cuDNN convolutions and RNNs in full "
                             "float32 (torch.backends.cudnn.allow_tf32 = False), as loomx "
                             "does; by default PyTorch keeps its own default, TF32 allowed")
    parser.add_argument("--timeout", type=_positive(float), default=900.0,
                        help="seconds allowed per worker process (default 900)")


def _case_keys(args: argparse.Namespace) -> list[str]:
    from .workloads import all_cases

    cases = all_cases(quick=True)
    order = [c.key for c in cases]
    if args.cases:
        wanted = []
        for token in args.cases.split(","):
            token = token.strip()
            wanted += ALIASES.get(token, token).split(",")
        unknown = [k for k in wanted if k not in order]
        if unknown:
            raise SystemExit(f"unknown case(s) {', '.join(unknown)}; known: "
                             f"{', '.join(list(ALIASES) + order)}")
        return [k for k in order if k in wanted]
    return [c.key for c in cases if args.suite in ("all", c.suite)]


def _run_worker(threads: int, keys: list[str], args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "benchmarks.worker", "--threads", str(threads),
               "--backends", args.backend, "--cases", ",".join(keys), "--out", out]
        if args.quick:
            cmd.append("--quick")
        if getattr(args, "no_tf32", False):
            cmd.append("--no-tf32")
        if args.wait_quiet > 0:
            cmd += ["--wait-quiet", str(args.wait_quiet)]
        if args.batch_scale != 1:
            cmd += ["--batch-scale", str(args.batch_scale)]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=args.timeout)
        if proc.returncode != 0:
            raise SystemExit(f"benchmark worker for {threads} thread(s) failed "
                             f"(exit status {proc.returncode}); see the output above")
        with open(out) as f:
            return json.load(f)


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Run the benchmark described by ``args``; print the report; return an exit status."""
    keys = _case_keys(args)
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    runs = [_run_worker(n, keys, args) for n in threads]
    doc = {
        "date": report.now(),
        "command": command or "python -m benchmarks " + " ".join(
            shlex.quote(a) for a in sys.argv[1:]),
        "quick": bool(args.quick),
        "backends": args.backend.split(","),
        "order": keys,
        "machine": runs[0]["machine"],
        "runs": runs,
    }
    text = report.markdown(doc)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    if args.write:
        report.write_results(args.write, doc)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time loomx and PyTorch eager side by side on the same workloads.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)
