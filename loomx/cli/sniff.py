"""``loomx sniff FILE``: the architecture of a checkpoint and where each number came from."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help=".safetensors file, shard index, .gguf file or model folder")
    parser.add_argument("--config", default=None,
                        help="config.json to use instead of the one next to the weights")
    parser.add_argument("--no-config", action="store_true",
                        help="ignore config.json: show what the tensors alone tell")
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON (value and source per hyperparameter)")


def run(args: argparse.Namespace) -> int:
    from ..models import sniff

    report = sniff(args.path, config={} if args.no_config else args.config)
    if args.json:
        out = {"path": report.path, "format": report.format,
               "architecture": report.architecture,
               "hparams": {k: {"value": h.value, "source": h.source, "note": h.note}
                           for k, h in report.hparams.items()},
               "unrecognised": report.unrecognised,
               "ignored": [{"tensor": n, "reason": why} for n, why in report.ignored],
               "warnings": report.warnings}
        print(json.dumps(out, indent=2, default=str))
    else:
        print(report)
    return 0
