"""``peftkit merge``: fold an adapter into the base weights and save a plain model folder."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import add_device_options, model_of

EXAMPLES = """example:
  peftkit merge --adapter runs/20250101-120000-lora --out merged/
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('merged/')"
  peftkit merge --adapter runs/20250101-120000-ia3 --to gguf --outtype q8_0 --out merged.gguf
  llama-cli -m merged.gguf -p "Write a haiku about the sea."      # or Ollama: FROM ./merged.gguf
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="export a merged full model folder", description=(
        "Fold an adapter into the base weights and save a plain Hugging Face model folder (tokenizer included) "
        "that transformers loads without peftkit. LoRA and (IA)^3 merge; methods that add layers or tokens cannot."),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter or run folder")
    p.add_argument("-o", "--out", required=True, help="folder (--to hf) or file (--to gguf) for the merged model; must not exist")
    p.add_argument("--model", help="base model (default: the run's, else the adapter's base)")
    p.add_argument("--to", choices=["hf", "gguf"], default="hf",
                   help="hf: a Hugging Face folder (default); gguf: one GGUF file for llama.cpp / Ollama, with the "
                        "metadata and tokenizer of the base's own GGUF (Llama family)")
    p.add_argument("--outtype", choices=["f32", "f16", "q8_0"], default="f32", help="GGUF weight type (default f32: exact)")
    p.add_argument("--base-gguf", help="--to gguf: the base model's GGUF (default: the embedded model's own file)")
    add_device_options(p, dtype_help="storage type of the saved weights: auto or float32 (the base's float32), "
                       "bfloat16 or float16 (half the size); the merge itself is computed in float32 (default auto)")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from ..device import DTYPES, resolve_device
    from ..models import load_model
    from ..peft_model import PeftModel
    from ..train import adapter_task, find_adapter
    from ..train.run_folder import check_output_folder

    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"--out {out} exists; pick a new folder")
    check_output_folder(out, "--out")
    folder, run_config = find_adapter(args.adapter)
    model_name = args.model or model_of([(folder, run_config)])
    if not model_name:
        raise ValueError(f"{folder} does not name its base model: pass --model")
    gguf_base = None
    if args.to == "gguf":  # check the GGUF base before the slow part
        from ..export import check_merge_base, resolve_base

        gguf_base = resolve_base(model_name, args.base_gguf)
        check_merge_base(gguf_base)
    task, num_labels = adapter_task(folder)
    base, tokenizer = load_model(model_name, task=task or "causal-lm", num_labels=num_labels, device=resolve_device(args.device))
    try:
        merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    except TypeError as err:  # the method adds layers or tokens: nothing to fold into the weights
        raise ValueError(str(err)) from None
    if gguf_base is not None:
        from ..export import write_merged_gguf

        done = write_merged_gguf(merged.cpu(), gguf_base, out, args.outtype)
        print(f"merged {folder} into {model_name}: {out} (GGUF {done.outtype}, {done.tensors} tensors, "
              f"{done.bytes / 2**20:.1f} MiB)")
        return 0
    if args.dtype in ("bfloat16", "float16"):
        merged = merged.to(DTYPES[args.dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {folder} into {model_name}: {out}")
    return 0
