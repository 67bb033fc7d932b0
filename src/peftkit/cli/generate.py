"""``peftkit generate``: the base model and adapters answer the same prompts side by side."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import strict_json
from .common import adapter_names, add_device_options, model_of, positive_int, resolve_hardware

EXAMPLES = """examples:
  peftkit generate --prompt "Give three tips for staying healthy." --adapter runs/20250101-120000-lora
  peftkit generate --prompt "Name a color." --prompt "Say hi." --adapter runs/a --adapter runs/b --max-new-tokens 32
  peftkit generate --prompt "Say hi." --adapter runs/a --device cuda --dtype bfloat16

Base model and every adapter answer each prompt side by side; adapters run together in one mixed batch.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="prompt in, text out (base and adapters side by side)",
                              description="Generate text with the base model and one or more adapters, side by side.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); default: read one per line from stdin")
    p.add_argument("--adapter", action="append", default=[], help="adapter or run folder (repeatable)")
    p.add_argument("--model", help="base model (default: the first adapter's, else smollm2-135m)")
    p.add_argument("--template", choices=["alpaca", "chat", "none"], default="alpaca",
                   help="wrap each prompt as an Alpaca instruction (default, as peftkit trains sft), in the chat template, or not at all")
    p.add_argument("--chat-template", metavar="FILE|NAME",
                   help="chat template replacing the tokenizer's (default: the one the first adapter's run trained with)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="new tokens per answer at most (default: %(default)s)")
    p.add_argument("--no-base", action="store_true", help="only the adapters, not the base model")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_device_options(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..data import render_prompt, set_chat_template
    from ..models import load_model
    from ..train import find_adapter, generate_texts

    prompts = args.prompt or [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT or write prompts on stdin, one per line")
    if args.no_base and not args.adapter:
        raise ValueError("--no-base needs at least one --adapter")
    adapters = [find_adapter(a) for a in args.adapter]
    model_name = args.model or model_of(adapters) or "smollm2-135m"
    device, precision = resolve_hardware(args, "generate")
    base, tokenizer = load_model(model_name, task="causal-lm", device=device)
    # served the way it was trained: the run's own chat template unless one is given here
    trained_with = next((config.chat_template for _, config in adapters if config is not None), None)
    set_chat_template(tokenizer, args.chat_template or trained_with)
    texts = [p if args.template == "none" else render_prompt({"instruction": p}, args.template, tokenizer) for p in prompts]
    columns = [] if args.no_base else [("base", "__base__")]
    model = base
    if adapters:
        from ..peft_model import PeftModel

        names = adapter_names(args.adapter)
        model = PeftModel.from_pretrained(base, adapters[0][0], adapter_name=names[0])
        for name, (folder, _) in zip(names[1:], adapters[1:]):
            model.load_adapter(folder, adapter_name=name)
        columns += [(label, name) for label, name in zip(args.adapter, names)]
        outputs = _generate_columns(model, tokenizer, texts, columns, args.max_new_tokens, precision)
    else:
        outputs = {"__base__": generate_texts(base, tokenizer, texts, args.max_new_tokens, precision=precision)}
    for i, prompt in enumerate(prompts):
        if args.json:
            print(strict_json.dumps({"prompt": prompt, **{label: outputs[name][i] for label, name in columns}}))
            continue
        print(f"=== prompt {i + 1}: {prompt}")
        for label, name in columns:
            shown = f"base ({model_name})" if name == "__base__" else f"adapter {label}"
            print(f"--- {shown}\n{outputs[name][i].strip()}\n")
    return 0


def _generate_columns(
    model: Any, tokenizer: Any, texts: list[str], columns: list[tuple[str, str]], max_new_tokens: int, precision: Any
) -> dict[str, list[str]]:
    """Every (prompt, column) pair in one mixed-adapter batch (each column's adapter on its own rows)."""
    from ..train import generate_texts

    names = [name for _, name in columns]
    flat = generate_texts(model, tokenizer, texts * len(names), max_new_tokens,
                          adapter_names=[n for n in names for _ in texts], precision=precision)
    return {name: flat[k * len(texts) : (k + 1) * len(texts)] for k, name in enumerate(names)}
