"""The ``mmer`` command line: parse, build typed config, call one library function per command.

Each command lives in its own module with ``register(subparsers)``, which adds its parser and
sets ``run``; this module only collects them and turns ``MmerError`` into one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from mmer_dist.cli import calibrate, demo, export, ingest, merge, serve, status
from mmer_dist.errors import MmerError

COMMAND_MODULES = (demo, ingest, merge, calibrate, export, serve, status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmer", description="Merge fine-tuned multimodal LLMs with MMER into a "
                                     "versioned store, and export or serve the result.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except MmerError as e:
        print(f"mmer {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
