"""Aggregation over seeds and Markdown/JSON output for the tweening benchmarks."""

from __future__ import annotations

import json
import math
import time


def stats(values: list[float]) -> dict:
    """Mean, population std, median, min, max and a normal 95 % CI half-width."""
    n = len(values)
    if n == 0:
        return {"n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    s = sorted(values)
    median = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    ci = 1.96 * std / math.sqrt(max(n - 1, 1))
    return {"n": n, "mean": mean, "std": std, "median": median, "min": s[0], "max": s[-1],
            "ci95": ci}


def pm(values: list[float]) -> str:
    """``mean ± std`` (population std) with one decimal."""
    st = stats(values)
    return "—" if st["n"] == 0 else f"{st['mean']:.1f} ± {st['std']:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def loom_results_json(results: dict, modes: list[str], archs: list[str],
                      depths: list[int]) -> dict:
    """Loom's ``test18_results.json`` schema (one run per config), readable by Loom's
    ``index.html``: ``{networkTypes, depths, modes, results: {"<Arch>-<D>L": {"<mode>":
    {avgAccuracy, change1Adapt, change2Adapt, totalOutputs, windows, preChange1Acc,
    preChange2Acc}}}, timestamp}``."""
    keys = ("avgAccuracy", "change1Adapt", "change2Adapt", "totalOutputs", "windows",
            "preChange1Acc", "preChange2Acc")
    return {"networkTypes": archs, "depths": depths, "modes": modes,
            "results": {cfg: {mode: {k: run[k] for k in keys} for mode, run in per.items()}
                        for cfg, per in results.items()},
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
