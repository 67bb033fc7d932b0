"""``peftkit inspect``: what an adapter holds, or what a model offers to target."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  peftkit inspect runs/20250101-120000-lora/adapter     # method, targets, parameters, file size
  peftkit inspect smollm2-135m                          # module names that --target-modules can use
  peftkit inspect runs/20250101-120000-lora --portable  # will it load in HF PEFT, vLLM, llama.cpp/Ollama, merged GGUF?
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="what an adapter holds, or what a model offers to target",
                              description="Describe an adapter folder (method, targets, parameters, size) or a model "
                                          "(the module names --target-modules can use).",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="adapter folder, run folder, or model (embedded name, HF folder, cached hub id)")
    p.add_argument("--task", choices=["causal-lm", "seq-cls"], help="for a model: which head to load (default: by model type)")
    p.add_argument("--portable", action="store_true",
                   help="for an adapter: whether HF PEFT, vLLM, llama.cpp / Ollama and a merged GGUF will load it, and "
                        "if not, why and what to do")
    p.add_argument("--base-gguf", help="with --portable: the base model's GGUF to check against (default: the embedded "
                                       "model's own file)")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..describe import describe_adapter, describe_model
    from ..train import find_adapter

    try:
        folder, _ = find_adapter(args.path)
    except FileNotFoundError:
        folder = None
    if args.portable:
        if folder is None:
            raise ValueError(f"--portable needs an adapter or run folder; {args.path} is neither")
        from ..export.portable import format_portability, portability

        print(format_portability(folder, portability(folder, args.base_gguf)))
    elif folder is not None:
        print(describe_adapter(folder))
    else:
        print(describe_model(args.path, args.task))
    return 0
