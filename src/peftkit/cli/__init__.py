"""The ``peftkit`` command: one verb per job (train, eval, generate, merge, export, inspect, analyze, plan, bench, serve).

Heavy imports (torch, transformers) happen inside the verbs, so ``peftkit --help`` answers at once. Nothing a user
can get wrong shows a traceback: every error ends as one line ``peftkit VERB: error: WHAT (what to do)`` with exit
status 2 for a wrong command line or settings, 1 for a failure of what it read or did, 130 for Ctrl-C (see
:mod:`peftkit.cli.errors`). ``--debug`` (before or after the verb) or ``PEFTKIT_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import analyze, bench, evaluate, export, generate, inspect, merge, plan, report, train
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, debug_requested, run_verb, sigint_watch  # noqa: F401 (callers read cli.EXIT_*)

DEBUG_HELP = "on an error, show the Python traceback too (or set PEFTKIT_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Parameter-efficient fine-tuning: train, evaluate, generate with, merge and "
        "inspect adapters (Hugging Face PEFT-compatible files).",
        epilog="Run 'peftkit VERB --help' for a verb's options and examples. Exit status: 0 done, 1 failed "
               "(a file, the data, a missing package), 2 wrong command line or settings, 130 interrupted.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in (train, evaluate, generate, merge, export, inspect, analyze, plan, report, bench):
        verb.add_parser(subparsers)
    from ..serve.command import add_serve_parser

    add_serve_parser(subparsers)
    for sub in subparsers.choices.values():  # SUPPRESS: the verb's flag must not reset a --debug given before it
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peftkit`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers warns after fork otherwise
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' per-file loading bars: noise here
    with sigint_watch():  # a Ctrl-C while torch imports can surface later as an unrelated ImportError
        try:
            parser = build_parser()  # imports the tuners (and torch): a Ctrl-C here is one line too
        except KeyboardInterrupt:
            print("peftkit: interrupted (Ctrl-C)", file=sys.stderr)
            return EXIT_INTERRUPTED
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the verb's parser, so the line names the verb and its usage
            verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
            (verbs.get(getattr(args, "verb", None)) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
        debug = vars(args).pop("debug", False) or debug_requested()
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        return run_verb(args.verb, args.func, args, debug)
