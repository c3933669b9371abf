"""``loomx demo``: the end-to-end tour (placeholder until the trainer lands)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default=None, help="backend spec (default: auto)")


def run(args: argparse.Namespace) -> int:
    print("loomx demo: trains a grid network on the digits data set (coming with the trainer).")
    return 0
