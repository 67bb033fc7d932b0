"""``peftkit eval``: metrics of a base model, with or without an adapter, on data."""

from __future__ import annotations

import argparse
import sys

from .. import strict_json
from .common import label_list
from .errors import EXIT_ERROR

from .common import add_device_options, resolve_hardware

EXAMPLES = """examples:
  peftkit eval --adapter runs/20250101-120000-lora            # the run's own held-out split
  peftkit eval --adapter runs/sst2 --data ../shared/data/glue/SST-2
  peftkit eval --data ../shared/data/instruct/alpaca_tiny_100.json   # the base model alone
  peftkit eval --adapter runs/sst2/adapter --data my_test.tsv --json  # sentence<TAB>label, header line optional
  peftkit eval --adapter runs/topics --data test.csv --labels sports,politics,science   # in class-id order
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="metrics of a model + adapter on data", description="Evaluate a model, with or without an adapter.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="adapter folder or run folder (default: the base model alone)")
    p.add_argument("--data", help="evaluation data (default with a run folder: the run's held-out split)")
    p.add_argument("--model", help="base model (default: the run's, else the adapter's base)")
    p.add_argument("--task", choices=["sft", "seq-cls", "text", "multiple-choice"], help="default: from the adapter or the data")
    p.add_argument("--batch-size", type=int, help="examples per batch")
    p.add_argument("--max-length", type=int, help="tokens per example")
    p.add_argument("--labels", type=label_list, metavar="A,B,...",
                   help="seq-cls: the label values as written in --data, in the classifier's class-id order "
                        "(default: the run's, else 0..K-1 for a K-class adapter)")
    p.add_argument("--on-bad-row", choices=["skip", "error"], help="skip bad rows with a count (default) or stop at the first")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object (strict JSON: null for NaN)")
    add_device_options(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..train import evaluate_adapter

    if args.adapter is None and args.data is None:
        raise ValueError("pass --adapter (a run or adapter folder) and/or --data")
    resolve_hardware(args, "eval")  # says which device and precision, and why
    overrides = {k: v for k, v in (("task", args.task), ("eval_batch_size", args.batch_size), ("max_length", args.max_length),
                                   ("labels", args.labels), ("on_bad_row", args.on_bad_row), ("device", args.device),
                                   ("dtype", args.dtype)) if v is not None}
    scores, config, data = evaluate_adapter(args.adapter, args.data, args.model, overrides)
    for report in data.bad_row_reports():
        print(f"peftkit eval: warning: {report}", file=sys.stderr)
    if args.json:
        print(strict_json.dumps(scores))
    else:
        what = f"{config.model}" + (f" + {args.adapter}" if args.adapter else " (no adapter)")
        print(f"{what} on {config.data if args.data else 'the run evaluation split'} ({len(data.eval)} examples, task {config.task}):")
        width = max(len(k) for k in scores)
        for key, value in scores.items():
            print(f"  {key.ljust(width)}  {value:.4f}" if isinstance(value, float) else f"  {key.ljust(width)}  {value}")
    if bad := strict_json.non_finite_keys(scores):
        print(f"peftkit eval: error: {', '.join(bad)} not finite ({', '.join(str(scores[k]) for k in bad)}): the model "
              "or adapter gives NaN or infinite outputs; check its weights with peftkit inspect", file=sys.stderr)
        return EXIT_ERROR
    return 0
