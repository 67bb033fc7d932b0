"""``peftkit bench``: list or run the benchmark scripts of a source checkout."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

EXAMPLES = """examples:
  peftkit bench                                  # list the benchmark scripts
  peftkit bench train_throughput -- --steps 20   # run one; arguments after -- go to the script
"""


def _bench_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "bench"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="list or run the benchmark scripts in bench/",
                              description="List the benchmark scripts (each compares side by side in one run), or run one.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="script name, without .py")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script (after --)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import ast

    folder = _bench_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"no bench/ folder next to this peftkit ({folder}): the scripts ship with the source checkout")
    scripts = sorted(folder.glob("*.py"))
    if args.name is None:
        for script in scripts:
            doc = ast.get_docstring(ast.parse(script.read_text())) or ""
            print(f"  {script.stem.ljust(20)}  {doc.strip().splitlines()[0] if doc.strip() else ''}")
        return 0
    script = folder / f"{args.name}.py"
    if not script.exists():
        raise FileNotFoundError(f"no benchmark {args.name!r}; available: {', '.join(s.stem for s in scripts)}")
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    return subprocess.call([sys.executable, str(script), *extra])
