"""``peftkit eval``: metrics of a base model, with or without an adapter, on data."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  peftkit eval --adapter runs/20250101-120000-lora            # the run's own held-out split
  peftkit eval --adapter runs/sst2 --data ../shared/data/glue/SST-2
  peftkit eval --data ../shared/data/instruct/alpaca_tiny_100.json   # the base model alone
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
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..train import evaluate_adapter

    if args.adapter is None and args.data is None:
        raise ValueError("pass --adapter (a run or adapter folder) and/or --data")
    overrides = {k: v for k, v in (("task", args.task), ("eval_batch_size", args.batch_size), ("max_length", args.max_length)) if v is not None}
    scores, config, data = evaluate_adapter(args.adapter, args.data, args.model, overrides)
    if args.json:
        print(json.dumps(scores))
        return 0
    what = f"{config.model}" + (f" + {args.adapter}" if args.adapter else " (no adapter)")
    print(f"{what} on {config.data if args.data else 'the run evaluation split'} ({len(data.eval)} examples, task {config.task}):")
    width = max(len(k) for k in scores)
    for key, value in scores.items():
        print(f"  {key.ljust(width)}  {value:.4f}" if isinstance(value, float) else f"  {key.ljust(width)}  {value}")
    return 0
