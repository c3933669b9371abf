"""The benchmark runner end to end in ``--quick`` mode: tables and JSON are well formed.

No timing thresholds: these tests check that the runner measures every contender of a tiny
workload, reports ratios and writes its files, not how fast anything is.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    results = tmp / "RESULTS.md"
    results.write_text("# Benchmark results\n\nNotes kept across runs.\n\n## Latest\n\n"
                       "<!-- latest:begin -->\nold table\n<!-- latest:end -->\n\n"
                       "## History\n\n- an earlier run\n")
    out_json = tmp / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--cases", "a,f_tick",
         "--threads", "1", "--backend", "numpy", "--json", str(out_json),
         "--write", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, json.loads(out_json.read_text()), results.read_text()


def test_json_has_machine_and_a_timing_per_contender(quick_run):
    _, doc, _ = quick_run
    machine = doc["machine"]
    for key in ("cpu", "cores", "numpy", "numpy_blas", "torch", "python", "git_commit"):
        assert key in machine
    assert doc["quick"] is True and doc["order"] == ["a_mlp", "f_tick"]
    [run] = doc["runs"]
    assert run["threads"] == 1 and run["sgemm_gflops"] > 0
    assert run["machine"]["torch_threads"] == 1
    mlp = next(r for r in run["results"] if r["key"] == "a_mlp")
    assert set(mlp["timings"]) == {"loomx[numpy]", "torch", "numpy (plain)",
                                   "numpy (loomx reference path)"}
    assert mlp["missing"] == {}
    for t in mlp["timings"].values():
        assert t["n"] >= 2
        assert 0 < t["p25_s"] <= t["median_s"] <= t["p75_s"]
    assert mlp["flops"] > 0 and mlp["target"] == 1.0


def test_markdown_table_reports_ratios_and_overhead(quick_run):
    stdout, doc, _ = quick_run
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("| case | thr |"))
    assert "loomx[numpy] / PyTorch" in header
    row = next(line for line in lines if line.startswith("| a. MLP"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(header.strip("|").split("|"))
    t = next(r for r in doc["runs"][0]["results"] if r["key"] == "a_mlp")["timings"]
    from benchmarks.timing import paired_ratio

    expected = paired_ratio(t["loomx[numpy]"], t["torch"])  # paired by round
    assert cells[4] == f"**{expected:.2f}×**"
    assert len(t["torch"]["block_medians_s"]) == len(t["loomx[numpy]"]["block_medians_s"]) >= 2
    over = [line for line in lines if "overhead" in line and "plain numpy" in line]
    assert over and all("without its kernels" in line for line in over)
    assert "sgemm peak" in stdout


def test_results_file_keeps_notes_replaces_latest_and_appends_history(quick_run):
    _, _, text = quick_run
    assert "Notes kept across runs." in text
    assert "old table" not in text
    assert "| a. MLP" in text
    history = text.split("## History", 1)[1]
    assert "- an earlier run" in history
    assert "--quick" in history.splitlines()[-1] and "a_mlp" in history.splitlines()[-1]


def test_missing_parts_are_reported_not_raised():
    sys.path.insert(0, str(ROOT))
    from benchmarks.cases import Missing, loomx_attr, loomx_layer

    with pytest.raises(Missing, match="loomx.layers.NoSuchLayer"):
        loomx_layer("NoSuchLayer")
    with pytest.raises(Missing, match="loomx.no_such_module.thing"):
        loomx_attr("loomx.no_such_module", "thing")


def test_unknown_case_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--cases", "zz"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown case(s) zz" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--threads", "abc"], "argument --threads: expected comma-separated positive"),
    (["--threads", "1,0"], "argument --threads: expected comma-separated positive"),
    (["--timeout", "-1"], "argument --timeout: expected a positive number"),
    (["--batch-scale", "0"], "argument --batch-scale: expected a positive number"),
    (["--wait-quiet", "x"], "argument --wait-quiet: expected a number of seconds"),
    (["--backend", "bogus"], "unknown backend 'bogus'"),
    (["--backend", "numpy+turbo"], "unknown option 'turbo'"),
])
def test_bad_arguments_are_usage_errors_before_any_worker_starts(capsys, args, message):
    from loomx.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--cases", "a", "--quick", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_loomx_bench_runs_the_same_runner(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loomx", "bench", "--quick", "--cases", "f_sample",
         "--threads", "1", "--backend", "numpy", "--json", str(out_json)],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| f. 3 × Dense 64" in proc.stdout
    doc = json.loads(out_json.read_text())
    [record] = doc["runs"][0]["results"]
    assert record["key"] == "f_sample"
    assert set(record["timings"]) == {"loomx[numpy]", "torch"}
    assert doc["command"].startswith("loomx bench")


@pytest.mark.parametrize("extra, label, allocator", [
    ([], "loomx[numpy]", "tuned"), (["--workers", "2"], "loomx[numpy]", "tuned"),
    (["--torch"], "torch[cpu]", "not tuned")])
def test_alone_times_one_op_and_counts_faults(extra, label, allocator):
    env = {k: v for k, v in os.environ.items() if k != "LOOMX_HOST_ALLOCATOR"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.alone", "--quick", "--case", "b_cnn", "--warmup",
         "1", "--calls", "3", *extra], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith(f"b_cnn {label} threads=1")
    assert "median" in line and "over 3 calls" in line and "page faults per call" in line
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert line.endswith(f"host allocator {allocator}")
    bad = subprocess.run([sys.executable, "-m", "benchmarks.alone", "--case", "zz"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown case 'zz'" in bad.stderr


def test_kernel_benchmark_times_each_kernel_fused_and_unfused():
    from loomx.backends import get_backend

    from benchmarks import kernels

    backend = get_backend("torch")
    results = kernels.run_cases(backend, rows=8, cols=16, inner=1, rounds=2,
                                only=["softmax", "adam_update", "rms_norm_forward"])
    names = [r["case"] for r in results]
    assert names == ["softmax", "softmax backward", "log softmax", "log softmax backward",
                     "RMSNorm forward", "AdamW step",
                     "cross-entropy loss + gradient, [rows, 10]"]  # softmax_cross_entropy
    timed = [r for r in results if "skipped" not in r]
    # the fused Adam is registered where the PyTorch build runs it on the CPU (2.4 and later)
    expected = {"softmax"} | ({"AdamW step"} if backend.kernel("adam_update") else set())
    assert {r["case"] for r in timed} >= expected
    for r in timed:
        assert r["fused_s"] > 0 and r["unfused_s"] > 0
        assert r["speedup"] > 0  # paired by round: near, not equal to, the medians' quotient
    rms = next(r for r in results if r["case"] == "RMSNorm forward")
    assert rms["skipped"] == "not registered: rms_norm_forward"  # no torch kernel for it
    table = kernels.markdown(results, "header")
    assert table.startswith("header\n\n| call | kernel | fused ms | unfused ms | speedup |")
    assert "| softmax | `softmax` |" in table
    # --only matches parts of kernel names as well as of case names
    picked = kernels.run_cases(backend, rows=8, cols=16, inner=1, rounds=2, only=["lstm_cell"])
    assert [r["case"] for r in picked] == ["LSTM cell forward", "LSTM cell backward"]


def test_kernel_benchmark_command_writes_json(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--backend", "numpy",
                           "--quick", "--only", "sum_rows,relu", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert "python -m benchmarks.kernels --backend numpy" in doc["header"]
    by_case = {r["case"]: r for r in doc["results"]}
    assert by_case["bias gradient, [49·rows, 32]"]["speedup"] > 0  # numpy has sum_rows
    assert by_case["bias + relu"]["skipped"] == "not registered: bias_act:relu"


def test_profile_attributes_the_call_to_layers_and_kernels_then_restores_them():
    from loomx.backends import get_backend

    from benchmarks.profile import profile
    from loomx.layers import Conv2D

    forward, backward = Conv2D.__dict__.get("forward"), Conv2D.__dict__.get("backward")
    kernels = dict(get_backend("numpy").kernels)
    text = profile("b_cnn", "numpy", calls=2, quick=True)
    assert text.startswith("b. CNN") and "median" in text and "instrumented" in text
    # the convolutions' chunked products (with numba), else their window gather
    conv_kernel = "window_matmul" if "window_matmul" in kernels else "im2col"
    for row in ("| Conv2D | backward |", "| Dense | forward |", f"| kernel {conv_kernel} |",
                "| (loss, optimizer, glue) |"):
        assert row in text, row
    # a decode call's untimed prefill (its setup) is not counted: the rest is never negative
    decode = profile("e_decode", "numpy", calls=2, quick=True)
    glue = next(line for line in decode.splitlines() if line.startswith("| (loss"))
    assert float(glue.split("|")[3]) >= 0.0, decode
    assert Conv2D.__dict__.get("forward") is forward
    assert Conv2D.__dict__.get("backward") is backward
    assert get_backend("numpy").kernels == kernels


def test_host_profile_counts_the_calls_a_step_makes():
    from benchmarks.profile import host_profile

    text = host_profile("a_mlp", "numpy", calls=2, quick=True, top=5)
    head, _, table = text.partition("\n\n")
    assert head.startswith("a. MLP") and "host issues it in" in head
    assert int(head.split("; ")[-1].split()[0]) > 0  # Python-level calls per call
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| function |") and len(rows) == 6
    assert any("matmul" in row for row in rows[1:]), table


def test_gpu_runs_use_the_gpu_target():
    from types import SimpleNamespace

    from benchmarks.worker import GPU_TARGET, _target

    case = SimpleNamespace(target=1.0)
    assert _target(case, SimpleNamespace(type="cpu")) == 1.0
    assert _target(case, SimpleNamespace(type="cuda")) == GPU_TARGET == 1.25
    assert _target(SimpleNamespace(target=None), SimpleNamespace(type="cuda")) is None


def test_gpu_check_script_is_valid_bash():
    script = ROOT / ".ci" / "gpu"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_each_block_starts_with_untimed_lead_calls_of_its_own_contender():
    import time

    from benchmarks.timing import Op, time_alternating

    log: list[str] = []

    def op(name: str) -> Op:
        return Op(run=lambda: (log.append(name), time.sleep(0.002)))

    timings = time_alternating({"a": op("a"), "b": op("b")}, warmup=1, rounds=2, block=2,
                               lead_s=0.01)
    assert {k: t.n for k, t in timings.items()} == {"a": 4, "b": 4}
    # warm-up, then per block: lead calls (at least one, here several) then 2 timed calls
    # (round 2 reverses the order, so b's two blocks run back to back)
    runs = [(k, len(list(g))) for k, g in itertools.groupby(log[2:])]
    assert [k for k, _ in runs] == ["a", "b", "a"]
    assert [n >= want for (_, n), want in zip(runs, (4, 8, 4))] == [True] * 3
    log.clear()
    time_alternating({"a": op("a")}, warmup=0, rounds=1, block=1, lead_s=0.0)
    assert log == ["a"]


def test_ratios_pair_the_blocks_of_each_round():
    from benchmarks.report import best_ratio, ratio
    from benchmarks.timing import paired_ratio

    # round 2 ran in a slow spell for both: the overall medians say 1.5, each round says 1.0
    mine = {"median_s": 3.0, "block_medians_s": [2.0, 4.0, 3.0]}
    ref = {"median_s": 2.0, "block_medians_s": [2.0, 4.0, 3.0]}
    assert paired_ratio(mine, ref) == 1.0
    assert paired_ratio({"median_s": 3.0}, ref) == 1.5  # no blocks: the medians' quotient
    rec = {"timings": {"loomx[numpy]": mine, "torch": ref}}
    assert ratio(rec, "loomx[numpy]") == 1.0
    assert ratio(rec, "loomx[numpy+workers]") is None
    # best thread counts: the same record → paired; different records → medians' quotient
    one = {"timings": {"loomx[numpy]": {"median_s": 4.0}, "torch": {"median_s": 5.0}}}
    assert best_ratio([one, rec], "loomx[numpy]") == (1.0, 3.0)
    slow_ref = {"timings": {"loomx[numpy]": {"median_s": 2.5}, "torch": {"median_s": 9.0}}}
    assert best_ratio([slow_ref, rec], "loomx[numpy]") == (2.5 / 2.0, 2.5)


def test_kernel_benchmark_times_the_chunked_convolution_against_the_whole_batch(monkeypatch):
    """Its unfused side drops only the two window_matmul kernels: the whole-batch path keeps
    the backend's other kernels (im2col, the window scatter, bias + ReLU)."""
    from loomx.backends import get_backend

    from benchmarks import kernels

    backend = get_backend("numpy")
    dropped = []
    original = type(backend).without_kernels

    def spy(self, *names):
        dropped.append(names)
        return original(self, *names)

    monkeypatch.setattr(type(backend), "without_kernels", spy)
    (row,) = kernels.run_cases(backend, rows=16, cols=16, inner=1, rounds=2,
                               only=["window_matmul"])
    assert row["case"].startswith("conv 32→64")
    if backend.kernel("window_matmul") is None:  # registered with numba only
        assert row["skipped"].startswith("not registered")
        return
    assert row["speedup"] > 0 and ("window_matmul", "window_matmul_backward") in dropped


def test_without_kernels_drops_the_named_kernels_or_all():
    from loomx.backends import get_backend

    backend = get_backend("numpy")
    some = backend.without_kernels("im2col", "no_such_kernel")
    assert some.kernel("im2col") is None and some.kernel("sum_rows") is not None
    assert set(some.kernels) == set(backend.kernels) - {"im2col"}
    assert backend.without_kernels().kernels == {}
    assert backend.kernel("im2col") is not None  # the original keeps its kernels


def test_ab_times_a_workload_with_and_without_kernels():
    from loomx.backends import get_backend

    from benchmarks.ab import compare, main

    name = next(iter(sorted(get_backend("numpy").kernels)), None)
    if name is None:
        pytest.skip("the numpy backend registers no kernels here")
    result = compare("a_mlp", "numpy", [name], rounds=2, block=1, quick=True)
    assert result["with_s"] > 0 and result["without_s"] > 0 and result["ratio"] > 0
    with pytest.raises(SystemExit, match="has no kernel no_such_kernel"):
        main(["--case", "a_mlp", "--without", "no_such_kernel", "--quick"])


def test_no_tf32_reaches_the_worker(tmp_path, monkeypatch):
    """--no-tf32 turns cuDNN's TF32 off in the worker before anything is timed (the runner
    passes it through); the README of the benchmarks says what it is for."""
    import torch

    from benchmarks import worker

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    out = tmp_path / "w.json"
    assert worker.main(["--threads", "1", "--backends", "numpy", "--cases", "f_tick",
                        "--quick", "--no-tf32", "--out", str(out)]) == 0
    assert torch.backends.cudnn.allow_tf32 is False
    assert json.loads(out.read_text())["results"][0]["key"] == "f_tick"
