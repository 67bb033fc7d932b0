"""The ``peftkit`` command: one verb per job (train, eval, generate, merge, export, inspect, bench, serve).

Heavy imports (torch, transformers) happen inside the verbs, so ``peftkit --help`` answers at once. Errors a user
can fix (a wrong path, an unknown option, a finished run) print one line and exit with status 1, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import bench, evaluate, export, generate, inspect, merge, train
from .common import EXIT_ERROR, EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Parameter-efficient fine-tuning: train, evaluate, generate with, merge and "
        "inspect adapters (Hugging Face PEFT-compatible files).",
        epilog="Run 'peftkit VERB --help' for a verb's options and examples.",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in (train, evaluate, generate, merge, export, inspect, bench):
        verb.add_parser(subparsers)
    from ..serve.command import add_serve_parser

    add_serve_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftkit`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers warns after fork otherwise
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' per-file loading bars: noise here
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"peftkit {args.verb}: error: {err}", file=sys.stderr)
        return EXIT_ERROR

