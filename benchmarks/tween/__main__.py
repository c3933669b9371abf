"""``python -m benchmarks.tween [--quick] [--seeds N] [--only 13,16,17,18] [--out DIR]``.

Runs Loom's tweening benchmarks with update-count budgets and fixed seeds, prints Markdown
tables and writes ``results.json``, ``tables.md`` and Loom's ``test18_results.json`` to DIR.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import time

import loomx

from . import suite
from .report import loom_results_json, write_json

QUICK = {"t13": 300, "t13_depths": (3,), "t16": 1000, "t16_cfg": [("Dense", 3), ("Attn", 3)],
         "t17": 0, "t18": 900, "t18_cfg": [("Dense", 3)]}
FULL = {"t13": 600, "t13_depths": (3, 4), "t16": 3000,
        "t16_cfg": [("Dense", 3), ("Attn", 3), ("Norm", 3), ("RNN", 3)],
        "t17": 2000, "t18": 1500, "t18_cfg": [("Dense", 3), ("Attn", 3), ("RNN", 3)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tween", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small budgets (a few minutes)")
    ap.add_argument("--seeds", type=int, default=10, help="report seeds (default 10)")
    ap.add_argument("--only", default="digits,13,16,17,18",
                    help="suites to run, e.g. 16,18 (digits, 13, 16, 17, 18)")
    ap.add_argument("--t16-budget", type=int, help="override the test-16 update budget")
    ap.add_argument("--t16-configs", help="override the test-16 networks, e.g. Dense-3,Attn-3")
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (default 2)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "tween", "results"))
    args = ap.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.t16_budget:
        plan["t16"] = args.t16_budget
    if args.t16_configs:
        plan["t16_cfg"] = [(c.split("-")[0], int(c.split("-")[1]))
                           for c in args.t16_configs.split(",")]
    only = {s.strip() for s in args.only.split(",")}
    seeds = list(range(args.seeds))
    backend = loomx.get_backend(args.backend)
    pool = multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else None

    def mapper(fn, tasks):
        return pool.map(fn, tasks, chunksize=1) if pool is not None else list(map(fn, tasks))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    cmd = "python -m benchmarks.tween " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {"command": cmd.strip(), "backend": backend.describe(), "jobs": args.jobs,
                     "machine": f"{platform.processor() or platform.machine()}, "
                                f"{os.cpu_count()} CPUs, Python {platform.python_version()}"}
    parts = [f"Command: `{results['command']}` — backend {results['backend']} — "
             f"{results['machine']}"]

    def log(msg: str) -> None:
        print(msg, flush=True)

    if "digits" in only:
        log("digits ...")
        results["digits"] = suite.digits(args.backend, seeds, 5, mapper, log=log)
        parts.append(suite.digits_tables(results["digits"]))
    if "13" in only:
        log("test 13/14 ...")
        results["test13"] = suite.test13(args.backend, seeds, plan["t13"], plan["t13_depths"],
                                         mapper, log=log)
        parts.append(suite.test13_tables(results["test13"]))
    if "16" in only:
        log("test 16 ...")
        results["test16"] = suite.test16(args.backend, seeds, plan["t16"], plan["t16_cfg"],
                                         mapper, log=log)
        parts.append(suite.test16_tables(results["test16"]))
    if "17" in only and plan["t17"]:
        log("test 17 ...")
        results["test17"] = suite.adaptation(args.backend, seeds, plan["t17"],
                                             [("Dense6", 6)], mapper, log=log)
        parts.append(suite.adaptation_tables(results["test17"], "Test 17 (Dense-6L)"))
    if "18" in only:
        log("tests 18/19 ...")
        res = suite.adaptation(args.backend, seeds, plan["t18"], plan["t18_cfg"], mapper,
                               log=log)
        results["test18"] = res
        parts.append(suite.adaptation_tables(res, "Tests 18/19"))
        for harness in ("faithful", "fixed"):
            first = {key.split()[0]: {m: runs[0] for m, runs in c["runs"].items()}
                     for key, c in res["configs"].items() if key.endswith(harness)}
            name = "test18_results.json" if harness == "faithful" else \
                "test18_results_fixed.json"
            write_json(os.path.join(args.out, name),
                       loom_results_json(first, list(next(iter(first.values()))),
                                         [a for a, _ in plan["t18_cfg"]], [3]))
    results["seconds"] = time.perf_counter() - t0
    parts.append(f"Total time {results['seconds']:.0f} s.")
    text = "\n\n".join(parts)
    print(text)
    write_json(os.path.join(args.out, "results.json"), results)
    with open(os.path.join(args.out, "tables.md"), "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
