"""``peftkit report``: one self-contained HTML page for one run, or several runs side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  peftkit report runs/20250101-120000-lora                         # rewrites runs/<run>/report.html
  peftkit report runs/a runs/b runs/c --out compare.html           # curves overlaid, summaries side by side

Every run already writes its own report.html at the end; this verb rebuilds it or compares runs. The page needs
no network: charts are inline SVG, with a few lines of inline script for hover read-outs.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="an HTML page of one run, or several runs compared",
                              description="Write a self-contained HTML report: loss and metric curves, before/after "
                                          "samples, config, adapter size and parameters.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/<run>)")
    p.add_argument("--out", metavar="FILE", help="the page (default: RUN/report.html for one run, report.html for several)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import REPORT_FILE, write_report

    out = Path(args.out) if args.out else (Path(args.runs[0]) / REPORT_FILE if len(args.runs) == 1 else Path(REPORT_FILE))
    print(write_report(args.runs, out))
    return 0
