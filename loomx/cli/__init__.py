"""The ``loomx`` command line: ``loomx info | demo | sniff | generate | bench``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
modules are imported only when their command runs, so ``loomx info`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import LoomxError

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("loomx.cli.info", "versions, backends and devices"),
    "demo": ("loomx.cli.demo", "the end-to-end tour: train on digits, report accuracy"),
    "sniff": ("loomx.cli.sniff", "inspect a .safetensors/.gguf file and report its architecture"),
    "generate": ("loomx.cli.generate", "generate text from a model file or folder"),
    "bench": ("loomx.cli.bench", "run the side-by-side benchmarks"),
}


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (argparse reports anything else as a usage
    error, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``loomx`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="loomx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if argv[:1] == [name]:
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except LoomxError as exc:
        print(f"loomx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that closed early (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
