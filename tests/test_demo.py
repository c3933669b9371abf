"""``loomx demo``: trains on digits and reports accuracy, deviation score and backend."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from loomx.cli import main
from loomx.cli.demo import SECTIONS, DemoSection, add_section


def test_demo_prints_accuracy_score_and_backend(capsys):
    status = main(["demo", "--backend", "numpy", "--epochs", "4", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    accuracy = float(re.search(r"held-out accuracy: ([\d.]+) %", out).group(1))
    score = float(re.search(r"deviation score: ([\d.]+) / 100", out).group(1))
    assert accuracy >= 90.0 and 0.0 <= score <= 100.0
    assert "numpy (device=cpu, float=float32)" in out
    assert "2×2 grid" in out and "[1/" in out


def test_demo_unknown_section_is_a_clear_error(capsys):
    assert main(["demo", "--sections", "nope", "--no-progress"]) == 2
    assert "unknown demo sections ['nope']; known: train, tween, loader" in \
        capsys.readouterr().err


@pytest.mark.parametrize("epochs", ["0", "-3", "two"])
def test_demo_epochs_must_be_positive(capsys, epochs):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--epochs", epochs, "--no-progress"])
    assert exc.value.code == 2
    assert f"argument --epochs: expected an integer >= 1, got '{epochs}'" in \
        capsys.readouterr().err


def test_sections_can_be_added_and_share_results(capsys, monkeypatch):
    monkeypatch.setattr("loomx.cli.demo.SECTIONS", list(SECTIONS))
    seen = {}

    def after(ctx):
        seen.update(ctx.results["train"])
        ctx.say("extra section ran")

    add_section(DemoSection("extra", "An extra stop", after))
    assert main(["demo", "--backend", "numpy", "--epochs", "1", "--no-progress",
                 "--sections", "train,extra"]) == 0
    out = capsys.readouterr().out
    assert "[2/2] An extra stop" in out and "extra section ran" in out
    assert 0.0 < seen["accuracy"] <= 1.0


@pytest.mark.slow
def test_demo_command_runs_with_default_backend():
    r = subprocess.run([sys.executable, "-m", "loomx", "demo", "--epochs", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out accuracy" in r.stdout
    assert "epoch 2/2" in r.stderr  # the progress bar


def test_demo_tweening_and_loader_sections(capsys):
    assert main(["demo", "--backend", "numpy", "--no-progress", "--sections", "tween,loader"]) == 0
    out = capsys.readouterr().out
    accuracies = [float(a) for a in re.findall(r"held-out accuracy\s+([\d.]+) %", out)]
    assert len(accuracies) == 3 and min(accuracies) > 50.0  # tweening, DTP, SGD
    assert "decoder (llama): 2 blocks, d=64, vocab=128" in out
    assert "with the KV cache and without it: identical" in out
