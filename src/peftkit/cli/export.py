"""``peftkit export``: an adapter for another runtime (llama.cpp / Ollama: a LoRA GGUF; HF PEFT / vLLM: a folder
that names its base portably)."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  peftkit export runs/20250101-120000-lora --to gguf -o my-lora.gguf
  llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf --lora my-lora.gguf -p "Write a haiku about the sea."
  # Ollama Modelfile:   FROM ./SmolLM2-135M-Instruct.Q4_1.gguf
  #                     ADAPTER ./my-lora.gguf
  peftkit export ADAPTER --to gguf -o out.gguf --base-gguf my-base.gguf --base-name meta-llama/Llama-3.2-1B
  peftkit export ADAPTER --to peft -o portable/ --base-name meta-llama/Llama-3.2-1B   # fix an absolute base path

For (IA)^3 (and other methods llama.cpp cannot load as adapters) write a merged model instead:
  peftkit merge --adapter ADAPTER --to gguf --out merged.gguf
See whether an adapter will load in HF PEFT, vLLM or llama.cpp: peftkit inspect ADAPTER --portable
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write an adapter for llama.cpp / Ollama (LoRA GGUF)", description=(
        "Write a LoRA adapter as a llama.cpp LoRA GGUF (llama-cli/llama-server --lora, Ollama ADAPTER). The names "
        "and shapes are checked against the base model's own GGUF (the embedded SmolLM2's file by default), and "
        "the scale is carried exactly (alpha/r, or alpha/sqrt(r) for rsLoRA). Llama-family bases only."),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", help="adapter or run folder")
    p.add_argument("--to", choices=["gguf", "peft"], default="gguf",
                   help="gguf: a llama.cpp LoRA GGUF (default); peft: a copy of the HF PEFT folder that records a portable "
                        "base model name (--base-name), for HF PEFT and vLLM on other machines")
    p.add_argument("-o", "--out", required=True, help="the file (gguf) or new folder (peft) to write")
    p.add_argument("--base-gguf", help="the base model's GGUF file, to check against (default: the embedded model's own "
                                       "GGUF when the adapter was trained on it)")
    p.add_argument("--base-name", help="the base model's name to record (default: the adapter's base, as a hub id where known)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_lora_gguf
    from ..train import find_adapter

    folder, _ = find_adapter(args.adapter)
    if args.to == "peft":
        from ..export.portable import write_portable_peft

        name = write_portable_peft(folder, args.out, args.base_name)
        print(f"wrote {args.out}: HF PEFT adapter folder, base model {name}")
        return 0
    done = export_lora_gguf(folder, args.out, base_gguf=args.base_gguf, base_name=args.base_name)
    print(f"wrote {done.path}: llama.cpp LoRA adapter, {done.pairs} weight pairs, architecture {done.architecture}, "
          f"adapter.lora.alpha {done.alpha:g}, base {done.base or '?'}")
    print(f"run it: llama-cli -m BASE.gguf --lora {done.path}   (Ollama: ADAPTER {done.path} in the Modelfile)")
    return 0
