"""Structural rules: what ``import loomx`` pulls in, and who may import which library."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE_LIBS = {"numpy", "cupy", "cupyx", "torch", "array_api_strict"}


def test_import_loomx_imports_neither_cupy_nor_torch():
    code = ("import sys, loomx, loomx.layers, loomx.grid; "
            "bad = [m for m in ('cupy', 'torch') if m in sys.modules]; "
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, f"import loomx imported {r.stdout.strip()} {r.stderr[-500:]}"


def test_backends_is_not_importable_on_its_own():
    r = subprocess.run([sys.executable, "-c", "import backends"], capture_output=True,
                       text=True, cwd=str(ROOT))
    assert r.returncode != 0


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_device_libraries_are_imported_only_in_backends_and_io():
    offenders = []
    for path in sorted((ROOT / "loomx").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("loomx", "io"):
            continue
        bad = _imported_modules(path) & DEVICE_LIBS
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert not offenders, "device libraries imported outside backends/ and loomx/io/:\n" + \
        "\n".join(offenders)
