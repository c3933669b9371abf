"""Markdown tables, the JSON document and the ``RESULTS.md`` update."""

from __future__ import annotations

import datetime as _dt
import os
import re

from .timing import paired_ratio
from .worker import BARE, PLAIN, TORCH

LATEST_BEGIN = "<!-- latest:begin -->"
LATEST_END = "<!-- latest:end -->"
HISTORY_HEADING = "## History"


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _throughput(items: int, seconds: float, unit: str) -> str:
    rate = items / seconds
    text = f"{rate / 1e3:.1f} k" if rate >= 1e4 else f"{rate:.0f}"
    return f"{text} {unit}/s"


def loomx_columns(results: list[dict]) -> list[str]:
    """Every loomx contender that appears in ``results``, in first-seen order."""
    names: list[str] = []
    for r in results:
        for k in [*r["timings"], *r["missing"]]:
            if k.startswith("loomx[") and k not in names:
                names.append(k)
    return names


def _na(notes: list[str], reason: str) -> str:
    """``n/a [k]`` where note ``k`` (listed under the table) gives the reason."""
    if reason not in notes:
        notes.append(reason)
    return f"n/a [{notes.index(reason) + 1}]"


def _cell(r: dict, name: str, notes: list[str]) -> str:
    if name in r["timings"]:
        return _fmt_ms(r["timings"][name]["median_s"])
    if name in r["missing"]:
        return _na(notes, r["missing"][name])
    return "—"


def ratio(r: dict, name: str, ref: str = TORCH) -> float | None:
    """Time ratio ``name`` / ``ref`` (PyTorch) in record ``r``, paired by round
    (:func:`benchmarks.timing.paired_ratio`); None when either was not measured."""
    t = r["timings"]
    if name in t and ref in t:
        return paired_ratio(t[name], t[ref])
    return None


def best_ratio(rows: list[dict], name: str) -> tuple[float, float] | None:
    """``(ratio, best seconds of name)`` over the thread counts of ``rows``.

    Each library at its own fastest thread count; when both are fastest at the same one, the
    ratio is that record's paired :func:`ratio`, else the quotient of the two medians (timed in
    different processes, so there is nothing to pair).
    """
    mine = [r for r in rows if name in r["timings"]]
    ref = [r for r in rows if TORCH in r["timings"]]
    if not mine or not ref:
        return None
    best_mine = min(mine, key=lambda r: r["timings"][name]["median_s"])
    best_ref = min(ref, key=lambda r: r["timings"][TORCH]["median_s"])
    m, t = best_mine["timings"][name]["median_s"], best_ref["timings"][TORCH]["median_s"]
    return (ratio(best_mine, name) if best_mine is best_ref else m / t), m


def _ratio_cell(value: float | None) -> str:
    return "—" if value is None else f"**{value:.2f}×**"


def results_table(results: list[dict], peaks: dict[int, float], notes: list[str]) -> str:
    """One row per (case, threads): medians in ms, ratios, throughput, share of sgemm peak."""
    cols = loomx_columns(results)
    head = ["case", "thr", "PyTorch ms"]
    for c in cols:
        head += [f"{c} ms", f"{c} / PyTorch"]
    head += ["loomx throughput", "loomx GFLOP/s (% peak)", "foreign load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r["title"], str(r["threads"]), _cell(r, TORCH, notes)]
        for c in cols:
            row += [_cell(r, c, notes), _ratio_cell(ratio(r, c))]
        first = next((c for c in cols if c in r["timings"]), None)
        if first is None:
            row += ["—", "—"]  # throughput and GFLOP/s
        else:
            sec = r["timings"][first]["median_s"]
            row.append(_throughput(r["items"], sec, r["item_name"]))
            if r["flops"]:
                gf = r["flops"] / sec / 1e9
                peak = peaks.get(r["threads"])
                row.append(f"{gf:.0f} ({100 * gf / peak:.0f} %)" if peak else f"{gf:.0f}")
            else:
                row.append("—")
        fl = r.get("foreign_cores")
        row.append("—" if fl is None else f"{fl:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def best_table(results: list[dict], notes: list[str]) -> str:
    """Each library at its best thread count, against the target ratio."""
    cols = loomx_columns(results)
    by_key: dict[str, list[dict]] = {}
    for r in results:
        by_key.setdefault(r["key"], []).append(r)
    head = ["case", "target", "PyTorch best ms"]
    for c in cols:
        head += [f"{c} best ms", "ratio", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rows in by_key.values():
        target = rows[0]["target"]
        torch_t = [r["timings"][TORCH]["median_s"] for r in rows if TORCH in r["timings"]]
        row = [rows[0]["title"], "—" if target is None else f"≤ {target:g}",
               _fmt_ms(min(torch_t)) if torch_t else "n/a"]
        for c in cols:
            best = best_ratio(rows, c)
            if best is None:
                reason = next((r["missing"][c] for r in rows if c in r["missing"]), "")
                row += [_na(notes, reason) if reason else "n/a", "—", "—"]
                continue
            q, mine = best
            met = "—" if target is None else ("yes" if q <= target else "no")
            row += [_fmt_ms(mine), f"**{q:.2f}×**", met]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def overhead_lines(results: list[dict]) -> list[str]:
    """The backend abstraction's cost: loomx[numpy] vs the same step in plain numpy, and the
    layers' reference path (loomx[numpy] without its kernels) vs plain numpy."""
    out = []
    for r in results:
        t = r["timings"]
        if PLAIN not in t or "loomx[numpy]" not in t:
            continue
        over = ratio(r, "loomx[numpy]", PLAIN) - 1.0
        line = (f"- {r['title']}, {r['threads']} thread(s): plain numpy "
                f"{_fmt_ms(t[PLAIN]['median_s'])} ms, loomx[numpy] "
                f"{_fmt_ms(t['loomx[numpy]']['median_s'])} ms → overhead "
                f"**{100 * over:+.0f} %** (target < 10 %)")
        if BARE in t:
            bare = ratio(r, BARE, PLAIN) - 1.0
            line += (f"; without its kernels {_fmt_ms(t[BARE]['median_s'])} ms → "
                     f"{100 * bare:+.0f} %")
        out.append(line)
    return out


def _allocator_line(state: dict | None) -> list[str]:
    """The host-allocator line, when the run recorded one (loomx's numpy backend)."""
    if not state:
        return []
    from loomx.backends.allocator import host_allocator_label

    return [f"- host allocator: {host_allocator_label(state)} ({state['reason']}; "
            "backends/allocator.py)"]


def _numba_line(m: dict) -> list[str]:
    """Whether loomx's numpy backend ran its compiled (numba) kernels, when recorded."""
    if "numba_kernels" not in m:
        return []
    state = ("on" if m["numba_kernels"] else
             "off (LOOMX_NUMBA=0)" if m["numba"] != "not installed" else "off")
    return [f"- numba {m['numba']}: loomx's compiled CPU kernels {state} "
            "(backends/numba_kernels.py)"]


def machine_lines(doc: dict) -> list[str]:
    m = doc["machine"]
    gpu = f"; GPU {m['cuda_device']}" if "cuda_device" in m else ""
    if "torch_cudnn_tf32" in m:
        gpu += ("; cuDNN convolutions and RNNs may use TF32 (PyTorch's default)"
                if m["torch_cudnn_tf32"] else "; cuDNN in full float32 (--no-tf32)")
    threads = ", ".join(str(run["threads"]) for run in doc["runs"])
    return [
        f"- CPU: {m['cpu']}; {m['cores']} logical cores; {m['os']}",
        f"- numpy {m['numpy']} with {m.get('numpy_blas', '?')} (kernel "
        f"{m.get('numpy_blas_kernel', '?')}, {m.get('numpy_blas_threading', '?')}); "
        f"OPENBLAS_CORETYPE {m.get('OPENBLAS_CORETYPE')}",
        f"- PyTorch {m.get('torch')} (BLAS {m.get('torch_blas')}, CPU capability "
        f"{m.get('torch_cpu_capability')}){gpu}",
        f"- Python {m['python']}, loomx {m['loomx']} (commit {m['git_commit']}), "
        f"array-api-compat {m['array_api_compat']}, CuPy {m['cupy']}",
        f"- thread counts: {threads} (each in its own process; {doc['runs'][0]['thread_control']}"
        " for numpy's BLAS, torch.set_num_threads for PyTorch)",
        f"- load average at start: {m['load_avg']}",
        *_allocator_line(m.get("host_allocator")),
        *_numba_line(m),
        f"- sgemm peak ({doc['runs'][0].get('sgemm_source', 'numpy')} float32 "
        f"{doc['runs'][0]['sgemm_size']}² matmul): " + ", ".join(
            f"{run['sgemm_gflops']:.0f} GFLOP/s at {run['threads']} thread(s)"
            for run in doc["runs"]) + " (the better of the medians before and after the cases)",
    ]


def markdown(doc: dict) -> str:
    """The full Markdown report of one run."""
    results = [r for run in doc["runs"] for r in run["results"]]
    results.sort(key=lambda r: (doc["order"].index(r["key"]), r["threads"]))
    peaks = {run["threads"]: run["sgemm_gflops"] for run in doc["runs"]}
    parts = [f"Measured {doc['date']} with `{doc['command']}`.", "", *machine_lines(doc), ""]
    for suite, title in (("main", "Workloads a–f"), ("layers", "Layers: forward + backward")):
        rows = [r for r in results if r["suite"] == suite]
        if not rows:
            continue
        notes: list[str] = []
        parts += [f"### {title} (median ms per call; ratio = loomx time / PyTorch time, "
                  "the median of the per-round ratios, below 1 = loomx faster; foreign load "
                  "= cores other processes used meanwhile)", "",
                  results_table(rows, peaks, notes), "",
                  "Each library at its best thread count:", "", best_table(rows, notes), ""]
        parts += [f"[{i}] {n}  " for i, n in enumerate(notes, 1)] + ([""] if notes else [])
    over = overhead_lines(results)
    if over:
        parts += ["### Backend overhead", "", *over, ""]
    return "\n".join(parts)


def history_line(doc: dict) -> str:
    """One line for the history section: date, commit, best-thread ratios per case
    (loomx[numpy], and loomx[numpy+workers] where it ran)."""
    results = [r for run in doc["runs"] for r in run["results"]]

    def best(name: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in doc["order"]:
            found = best_ratio([r for r in results if r["key"] == key], name)
            if found is not None:
                out[key] = found[0]
        return out

    numpy_best, workers_best = best("loomx[numpy]"), best("loomx[numpy+workers]")
    summary = ", ".join(f"{k} {v:.2f}×" for k, v in numpy_best.items()) \
        or "no loomx[numpy] results"
    line = (f"- {doc['date']}, commit {doc['machine']['git_commit']}, `{doc['command']}`: "
            f"loomx[numpy]/PyTorch (best threads) {summary}")
    if workers_best:
        line += "; loomx[numpy+workers] " + ", ".join(f"{k} {v:.2f}×"
                                                      for k, v in workers_best.items())
    return line


_TEMPLATE = f"""# Benchmark results

How to run and read these: [README.md](README.md).

## Latest

{LATEST_BEGIN}
{LATEST_END}

{HISTORY_HEADING}

"""


def write_results(path: str, doc: dict) -> None:
    """Replace the "Latest" block of ``path`` (created if absent) and append a history line."""
    text = open(path).read() if os.path.exists(path) else _TEMPLATE
    if LATEST_BEGIN not in text or LATEST_END not in text:
        text = text.rstrip() + "\n\n## Latest\n\n" + LATEST_BEGIN + "\n" + LATEST_END + "\n"
    pattern = re.compile(re.escape(LATEST_BEGIN) + ".*?" + re.escape(LATEST_END), re.S)
    block = f"{LATEST_BEGIN}\n{markdown(doc)}\n{LATEST_END}"
    text = pattern.sub(lambda _: block, text, count=1)
    if HISTORY_HEADING not in text:
        text = text.rstrip() + f"\n\n{HISTORY_HEADING}\n\n"
    text = text.rstrip() + "\n"
    if text.endswith(HISTORY_HEADING + "\n"):
        text += "\n"
    text += history_line(doc) + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def now() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
