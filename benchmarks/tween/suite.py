"""The benchmark suites: Loom's tests 13/14 (clustered), 16 (seven modes), 17–19 (adaptation).

Every table has the baselines next to the modes: majority class, Bayes/oracle, label
persistence (adaptation), and plain SGD/Adam with a learning rate tuned on separate seeds
(and, for the static tasks, a separate validation split). Results are means ± population std
over the report seeds. Every run is an independent task ``(test, config, mode, seed, rate)``,
so ``mapper`` may spread them over processes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

import loomx

from . import archs, data
from .report import pm, table
from .runners import (
    ADAPT_MODES,
    DIGITS_MODES,
    STATIC_MODES,
    run_adaptation,
    run_digits,
    run_static,
)

SGD_GRID = (0.03, 0.1, 0.3, 1.0)
ADAM_GRID = (0.001, 0.003, 0.01, 0.03)
DIGITS_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
TUNE_SEEDS = (1000, 1001)
Mapper = Callable[[Callable, list], list]


# ---------------------------------------------------------------------------- one task
def _split16(seed: int, width: int, arch: str):
    rng = np.random.default_rng(seed)
    parts = [data.quadrant(n, width, rng) for n in (500, 2000, 1000)]
    return [(archs.reshape_input(x, arch), y) for x, y in parts]


def run_task(task: tuple) -> dict:
    """Run one ``(test, backend, budget, arch, depth, faithful, mode, seed, rate, tuning)``."""
    test, backend_name, budget, arch, depth, faithful, mode, seed, rate, tuning = task
    backend = loomx.get_backend(backend_name)
    if test == "digits":
        return run_digits(mode, backend, seed, rate, tuning, epochs=budget)
    if test == "16":
        net, width = archs.build(arch, depth, 3, faithful, backend, seed)
        tr, te, val = _split16(seed, width, arch)
        return run_static(mode, net, backend, tr, val if tuning else te, budget, faithful,
                          seed, rate=rate)
    if test == "13":
        n_in = 4 if depth == 3 else 8
        rng = np.random.default_rng(seed)
        tr = data.clustered(n_in, rng)
        te = data.clustered(n_in, rng, per_class=100)
        net = archs.clustered_dense(depth, n_in, backend, seed)
        return run_static(mode, net, backend, tr, te, budget, faithful, seed, rate=rate)
    windows = 15 if arch == "Dense6" else 10
    if arch == "Dense6":
        net, width = _test17_net(backend, seed), 8

        def arch_in(o):
            return o
    else:
        net, width = archs.build(arch, depth, 4, faithful, backend, seed, all_leaky=True)

        def arch_in(o, a=arch):
            return archs.reshape_input(o, a)
    return run_adaptation(mode, net, backend, arch_in, seed, budget, windows, faithful,
                          rate=rate, width=width)


def _test17_net(backend, seed):
    from loomx.layers import Dense

    layers = [Dense(w, activation=archs.LEAKY) for w in (32, 64, 64, 64, 32)]
    layers.append(Dense(4, activation="sigmoid"))
    return loomx.Network.chain(layers, input_shape=(8,), backend=backend, seed=seed)


def run_suite(test: str, backend: str, budget: int, configs: list[tuple[str, int]], seeds,
              modes: tuple[str, ...], mapper: Mapper, score: str, log=print) -> dict:
    """Tune SGD/Adam on :data:`TUNE_SEEDS`, then run every mode and the tuned optimizers on
    ``seeds`` for every config, faithful and fixed harness. The digits suite tunes every
    method's rate and has no harness variants."""
    variants = [(a, d, f) for a, d in configs for f in (True, False)]
    tuned_modes = (("SGD", SGD_GRID), ("Adam", ADAM_GRID))
    if test == "digits":  # every method gets its rate tuned
        tuned_modes = tuple((m, ADAM_GRID if m == "Adam" else DIGITS_GRID) for m in modes)
        variants = variants[:1]
    tune = [(test, backend, budget, a, d, f, m, s, lr, True)
            for a, d, f in variants for m, grid in tuned_modes
            for lr in grid for s in TUNE_SEEDS]
    main = [(test, backend, budget, a, d, f, m, s, None, False)
            for a, d, f in variants for m in modes for s in seeds if test != "digits"]
    results = mapper(run_task, tune + main)
    tuned: dict = {}
    for task, res in zip(tune, results[:len(tune)], strict=True):
        key = (task[3], task[4], task[5], task[6])
        tuned.setdefault(key, {}).setdefault(task[8], []).append(res[score])
    rates = {k: max(v, key=lambda lr, v=v: np.mean(v[lr])) for k, v in tuned.items()}
    opt = [(test, backend, budget, a, d, f, m, s, rates[(a, d, f, m)], False)
           for a, d, f in variants for m, _ in tuned_modes for s in seeds]
    results_opt = mapper(run_task, opt)
    out: dict = {"budget": budget, "seeds": list(seeds), "configs": {}}
    for task, res in zip(main + opt, results[len(tune):] + results_opt, strict=True):
        a, d, f, m = task[3], task[4], task[5], task[6]
        key = f"{a}-{d}L {'faithful' if f else 'fixed'}"
        c = out["configs"].setdefault(key, {"runs": {}, "rates": {}})
        c["runs"].setdefault(m, []).append(res)
        if task[8] is not None:
            c["rates"][m] = task[8]
    for key, c in out["configs"].items():
        log(f"  test {test} {key}: " + ", ".join(
            f"{m} {np.mean([r[score] for r in v]):.1f}" for m, v in c["runs"].items()))
    return out


# ---------------------------------------------------------------------------- test 16
def test16(backend, seeds, budget: int, configs, mapper: Mapper, log=print) -> dict:
    """Seven modes on the quadrant data; faithful and fixed harness; train and held-out."""
    out = run_suite("16", backend, budget, configs, seeds, STATIC_MODES, mapper, "test_acc",
                    log)
    for key, c in out["configs"].items():
        arch = key.split("-")[0]
        width = archs.build(arch, int(key.split("-")[1].split("L")[0]), 3, True,
                            loomx.get_backend(backend), 0)[1]
        base = {"majority": [], "bayes": []}
        for s in seeds:
            tr, te, _ = _split16(s, width, arch)
            maj = np.bincount(tr[1], minlength=3).argmax()
            base["majority"].append(float((te[1] == maj).mean() * 100))
            rows = te[0].reshape(len(te[0]), -1)
            base["bayes"].append(float((data.quadrant_rule(rows) == te[1]).mean() * 100))
        c["baselines"] = base
    return out


def test16_tables(res: dict) -> str:
    modes = list(STATIC_MODES) + ["SGD", "Adam"]
    header = ["config", "majority", "Bayes"] + modes
    parts = []
    for split, label in (("test_acc", "held-out accuracy %"),
                         ("train_acc", "training-set accuracy % (what Loom reports)")):
        rows = []
        for key, c in res["configs"].items():
            rows.append([key, pm(c["baselines"]["majority"]), pm(c["baselines"]["bayes"])] +
                        [pm([r[split] for r in c["runs"][m]]) for m in modes])
        parts.append(f"**Test 16, {label}** (budget {res['budget']} sample updates per "
                     f"mode, {len(res['seeds'])} seeds; majority and Bayes on the held-out "
                     "split)\n\n" + table(header, rows))
    rates = "; ".join(f"{k}: SGD {c['rates']['SGD']}, Adam {c['rates']['Adam']}"
                      for k, c in res["configs"].items())
    parts.append(f"Tuned rates (minibatch 16, MSE) — {rates}.")
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------- tests 13/14
def test13(backend, seeds, budget: int, depths, mapper: Mapper, log=print) -> dict:
    """Step+BP vs Step+Tween on the 12-sample clustered set (+ a 300-sample held-out set)."""
    return run_suite("13", backend, budget, [("Dense", d) for d in depths], seeds,
                     ("Step+BP", "TChain"), mapper, "train_acc", log)


def test13_tables(res: dict) -> str:
    modes = ["Step+BP", "TChain", "SGD", "Adam"]
    rows = [[k, "33.3", "100"] + [f"{pm([r['train_acc'] for r in c['runs'][m]])} / "
                                  f"{pm([r['test_acc'] for r in c['runs'][m]])}" for m in modes]
            for k, c in res["configs"].items()]
    return (f"**Tests 13/14, training / held-out accuracy %** (budget {res['budget']} sample "
            f"updates, {len(res['seeds'])} seeds; Dense-3L is test 13's net, Dense-4L test "
            "14's)\n\n" +
            table(["config", "majority", "Bayes", "Step+BP", "Step+Tween", "SGD", "Adam"],
                  rows))


# ---------------------------------------------------------------------------- tests 17–19
def adaptation(backend, seeds, iters: int, configs, mapper: Mapper, log=print) -> dict:
    """The chase/avoid task for every (architecture, depth), faithful and fixed harness."""
    out = run_suite("18", backend, iters, configs, seeds, ADAPT_MODES + ("Persistence",),
                    mapper, "avgAccuracy", log)
    out["iters"] = iters
    out["windows"] = 15 if configs[0][0] == "Dense6" else 10
    return out


def adaptation_tables(res: dict, title: str) -> str:
    modes = list(ADAPT_MODES) + ["Persistence", "SGD", "Adam"]
    rows = [[key] + [pm([r["avgAccuracy"] for r in c["runs"][m]]) for m in modes] + ["100"]
            for key, c in res["configs"].items()]
    avg = table(["config"] + modes + ["oracle"], rows)
    curve_rows = []
    for key, c in res["configs"].items():
        for m in ("StepTweenChain", "Persistence", "NormalBP", "SGD"):
            w = np.mean([r["windows"] for r in c["runs"][m]], axis=0)
            curve_rows.append([key, m, " ".join(f"{v:.0f}" for v in w)])
    curves = table(["config", "mode", f"mean accuracy per window (1..{res['windows']})"],
                   curve_rows)
    change_rows = []
    for key, c in res["configs"].items():
        for m in ("StepTweenChain", "Persistence", "SGD"):
            rs = c["runs"][m]
            change_rows.append([key, m,
                                f"{pm([r['preChange1Acc'] for r in rs])} → "
                                f"{pm([r['change1Adapt'] for r in rs])}",
                                f"{pm([r['preChange2Acc'] for r in rs])} → "
                                f"{pm([r['change2Adapt'] for r in rs])}"])
    changes = table(["config", "mode", "change 1: pre → post window", "change 2: pre → post"],
                    change_rows)
    rates = "; ".join(f"{k}: SGD {c['rates']['SGD']}, Adam {c['rates']['Adam']}"
                      for k, c in res["configs"].items())
    return (f"**{title}: average window accuracy %** ({res['iters']} environment steps, "
            f"{res['windows']} windows, {len(res['seeds'])} seeds)\n\n{avg}\n\n{curves}\n\n"
            f"{changes}\n\nTuned rates (one online update per step) — {rates}.")


# ---------------------------------------------------------------------------- digits
def digits(backend, seeds, epochs: int, mapper: Mapper, log=print) -> dict:
    """Every method with its own tuned rate on scikit-learn's digits (held-out accuracy)."""
    return run_suite("digits", backend, epochs, [("Digits", 2)], seeds, DIGITS_MODES,
                     mapper, "test_acc", log)


def digits_tables(res: dict) -> str:
    c = next(iter(res["configs"].values()))
    rows = [[m, str(c["rates"][m]), pm([r["test_acc"] for r in c["runs"][m]]),
             f"{np.mean([r['seconds'] for r in c['runs'][m]]):.2f}"] for m in DIGITS_MODES]
    return (f"**Digits (64 → 32 tanh → 10), held-out accuracy %** ({res['budget']} epochs of "
            f"1000 images, batch 16, {len(res['seeds'])} seeds; every rate tuned on a "
            "validation split; majority class ≈ 10 %)\n\n" +
            table(["method", "tuned rate", "held-out accuracy %", "seconds per run"], rows))
