"""``loomx bench``: the side-by-side benchmarks of the source checkout's ``benchmarks/`` folder.

The runner lives next to the package (``benchmarks/`` at the repository root), so this command
works from a source or editable install; it runs exactly what ``python -m benchmarks`` runs.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import shlex
import sys

from ..errors import LoomxError

_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _runner():
    if not (_ROOT / "benchmarks" / "runner.py").is_file():
        raise LoomxError(f"the benchmarks are not installed with the package: no "
                         f"{_ROOT / 'benchmarks'}; run 'loomx bench' from a source checkout "
                         "(pip install -e .)")
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    return importlib.import_module("benchmarks.runner")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    try:
        _runner().add_arguments(parser)
    except LoomxError:
        pass  # run() reports the missing folder


def run(args: argparse.Namespace) -> int:
    command = "loomx bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    return _runner().run(args, command=command)
