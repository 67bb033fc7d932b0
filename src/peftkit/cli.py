"""The ``peftkit`` command: one verb per job (train, eval, generate, merge, inspect, bench, serve).

Heavy imports (torch, transformers) happen inside the verbs, so ``peftkit --help`` answers at once. Errors a user
can fix (a wrong path, an unknown option, a finished run) print one line and exit with status 1, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130

TRAIN_EXAMPLES = """examples:
  peftkit train --data ../shared/data/instruct/alpaca_sample_1727.json
  peftkit train --model minilm-l6 --data ../shared/data/glue/SST-2 --r 16 --alpha 32 --lr 1e-3 --max-steps 1500
  peftkit train --config run.yaml --lr 1e-4            # flags override the file
  peftkit train --resume runs/20250101-120000-lora     # after Ctrl-C or a crash
  torchrun --nproc-per-node 4 -m peftkit.cli train --data d.json --batch-size 2 --strategy fsdp   # 4 processes

The task is inferred from --data when --task is not given: a GLUE folder or a table with a label column ->
seq-cls, instruction/input/output records -> sft, a .txt file -> text. Without --eval-data, evaluation uses the
GLUE dev split, or a held-out 5% of the training file that is never trained on. The run folder (default
runs/<time>-<method>) gets the adapter, metrics.jsonl, metrics.png, config.yaml, samples.md (sft) and checkpoints.
"""

EVAL_EXAMPLES = """examples:
  peftkit eval --adapter runs/20250101-120000-lora            # the run's own held-out split
  peftkit eval --adapter runs/sst2 --data ../shared/data/glue/SST-2
  peftkit eval --data ../shared/data/instruct/alpaca_tiny_100.json   # the base model alone
"""

GENERATE_EXAMPLES = """examples:
  peftkit generate --prompt "Give three tips for staying healthy." --adapter runs/20250101-120000-lora
  peftkit generate --prompt "Name a color." --prompt "Say hi." --adapter runs/a --adapter runs/b --max-new-tokens 32

Base model and every adapter answer each prompt side by side; adapters run together in one mixed batch.
"""

MERGE_EXAMPLES = """example:
  peftkit merge --adapter runs/20250101-120000-lora --out merged/
  python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('merged/')"
"""

INSPECT_EXAMPLES = """examples:
  peftkit inspect runs/20250101-120000-lora/adapter     # method, targets, parameters, file size
  peftkit inspect smollm2-135m                          # module names that --target-modules can use
"""

BENCH_EXAMPLES = """examples:
  peftkit bench                                  # list the benchmark scripts
  peftkit bench train_throughput -- --steps 20   # run one; arguments after -- go to the script
"""


# ---------------------------------------------------------------------------------------------------------- parsing


def _target_modules(text: str) -> list[str] | str:
    """``all-linear``, a regex (when it has regex characters) or a comma-separated list of module names."""
    if text == "all-linear" or any(c in text for c in "*()[]|^$\\+?"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def _key_value(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def _add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from .tuners.base import method_names

    p = subparsers.add_parser(
        "train", help="fine-tune an adapter (the main job)", description="Fine-tune a PEFT adapter on your data.",
        epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only flags actually given override the config file
    )
    p.add_argument("--config", metavar="FILE", help="YAML file with any of the settings below (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", help="embedded name (smollm2-135m, minilm-l6), local HF folder or cached hub id (default: smollm2-135m)")
    g.add_argument("--method", choices=method_names(), help="PEFT method (default: lora)")
    g.add_argument("--r", type=int, help="LoRA rank (default 8)")
    g.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / r (default 16)")
    g.add_argument("--dropout", type=float, help="LoRA / bottleneck dropout (LoRA default 0.05)")
    g.add_argument("--target-modules", type=_target_modules, metavar="NAMES",
                   help="comma-separated module names, a regex, or all-linear (default: the method's choice, LoRA: q,v)")
    g.add_argument("--num-virtual-tokens", type=int, help="prompt / prefix tuning: virtual tokens (default 20)")
    g.add_argument("--reduction-factor", type=int, help="houlsby / pfeiffer: hidden size / bottleneck size (default 16)")
    g.add_argument("--method-option", type=_key_value, action="append", dest="method_options", metavar="KEY=VALUE",
                   help="any other field of the method's config, e.g. use_rslora=true (repeatable)")
    g.add_argument("--quantization", choices=["nf4", "fp4", "int8"], help="load the frozen base in 4-bit (QLoRA) or 8-bit")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory, slower)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="JSON, JSONL, CSV, TSV or text file, or a GLUE task folder (train.tsv + dev.tsv)")
    g.add_argument("--task", choices=["sft", "seq-cls", "text"], help="default: inferred from --data")
    g.add_argument("--eval-data", help="evaluation file (default: GLUE dev split, or a held-out slice of --data)")
    g.add_argument("--eval-fraction", type=float, help="held-out share of --data when there is no --eval-data (default 0.05)")
    g.add_argument("--max-eval-examples", type=int, help="evaluate on at most this many examples (default 2000)")
    g.add_argument("--max-length", type=int, help="tokens per example / text chunk (default: sft 512, text 256, seq-cls 128)")
    g.add_argument("--template", choices=["alpaca", "chat"], help="sft prompt format (default alpaca)")
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="padded batches (seq-cls, prompt/prefix): random lengths instead of similar ones")
    g.add_argument("--text-column", help="seq-cls: the text column (default: guessed)")
    g.add_argument("--text-pair-column", help="seq-cls: the second text column of sentence pairs")
    g.add_argument("--label-column", help="seq-cls: the label column (default: label)")
    g.add_argument("--on-bad-row", choices=["skip", "error"], help="skip bad rows with a count (default) or stop at the first")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs)")
    g.add_argument("--epochs", type=float, help="passes over the training data (default 1)")
    g.add_argument("--batch-size", type=int, help="examples per micro-batch (default: 4, seq-cls 32)")
    g.add_argument("--eval-batch-size", type=int, help="examples per evaluation batch")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, help="peak learning rate (default per method: LoRA 2e-4, seq-cls 5e-4)")
    g.add_argument("--warmup", type=float, help="warmup: a fraction of the steps if < 1, else steps (default 0.05)")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"], help="decay after warmup (default cosine)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0)")
    g.add_argument("--seed", type=int, help="seed for the adapter's init, the data order and the held-out split (default 0)")
    g.add_argument("--threads", type=int, help="torch threads (default: one per core; fewer helps on a busy machine)")
    g = p.add_argument_group("several processes (under torchrun; --batch-size is per process)")
    g.add_argument("--strategy", choices=["ddp", "fsdp"],
                   help="ddp: a full model copy per process (default); fsdp: the frozen base sharded across processes")
    g.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="how long a process waits for the others before the run fails (default 600)")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<time>-<method>)")
    g.add_argument("--eval-every", type=int, help="steps between evaluations (default: 4 per run; 0: none)")
    g.add_argument("--save-every", type=int, help="steps between checkpoints (default: min(50, eval-every); 0: none)")
    g.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default 2)")
    g.add_argument("--num-samples", type=int, help="sft: held-out prompts generated before and after training (default 3)")
    g.add_argument("--sample-tokens", type=int, help="sft: new tokens per sample (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, over those of ``--config``."""
    import yaml

    settings: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.exists():
            raise FileNotFoundError(f"--config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of settings, got {type(loaded).__name__}")
        settings.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "quiet", "func", "verb")}
    if "method_options" in flags:
        flags["method_options"] = {**settings.get("method_options", {}), **dict(flags["method_options"])}
    settings.update(flags)
    return settings


# ------------------------------------------------------------------------------------------------------------ verbs


def cmd_train(args: argparse.Namespace) -> int:
    from . import train as T
    from .distributed import is_main_process, teardown

    settings = _train_settings(args)
    progress = not getattr(args, "quiet", False)
    try:
        if getattr(args, "resume", None):
            run = T.TrainingRun.resume(args.resume, settings, progress=progress)
        else:
            run = T.TrainingRun(T.TrainConfig.from_dict(settings, source="flags"), progress=progress)
        result = run.fit()
    except T.TrainingInterrupted as err:
        if is_main_process():
            print(f"peftkit train: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except T.NonFiniteLossError as err:
        if is_main_process():
            print(f"peftkit train: {err}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        teardown()
    if not is_main_process():
        return 0
    print(f"\nsummary ({run.config.method}, {run.config.task}, {run.config.model}):")
    print(T.summary_table(result, run.data.metric))
    print(f"\nrun folder: {result.run_dir}")
    return 0


def _add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="metrics of a model + adapter on data", description="Evaluate a model, with or without an adapter.",
                              epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="adapter folder or run folder (default: the base model alone)")
    p.add_argument("--data", help="evaluation data (default with a run folder: the run's held-out split)")
    p.add_argument("--model", help="base model (default: the run's, else the adapter's base)")
    p.add_argument("--task", choices=["sft", "seq-cls", "text"], help="default: from the adapter or the data")
    p.add_argument("--batch-size", type=int, help="examples per batch")
    p.add_argument("--max-length", type=int, help="tokens per example")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_adapter

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


def _add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="prompt in, text out (base and adapters side by side)",
                              description="Generate text with the base model and one or more adapters, side by side.",
                              epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); default: read one per line from stdin")
    p.add_argument("--adapter", action="append", default=[], help="adapter or run folder (repeatable)")
    p.add_argument("--model", help="base model (default: the first adapter's, else smollm2-135m)")
    p.add_argument("--template", choices=["alpaca", "chat", "none"], default="alpaca",
                   help="wrap each prompt as an Alpaca instruction (default, as peftkit trains sft), in the chat template, or not at all")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-base", action="store_true", help="only the adapters, not the base model")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from .data import render_prompt
    from .models import load_model
    from .train import find_adapter, generate_texts

    prompts = args.prompt or [line.strip() for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT or write prompts on stdin, one per line")
    if args.no_base and not args.adapter:
        raise ValueError("--no-base needs at least one --adapter")
    adapters = [find_adapter(a) for a in args.adapter]
    model_name = args.model or _model_of(adapters) or "smollm2-135m"
    base, tokenizer = load_model(model_name)
    texts = [p if args.template == "none" else render_prompt({"instruction": p}, args.template, tokenizer) for p in prompts]
    columns = [] if args.no_base else [("base", "__base__")]
    model = base
    if adapters:
        from .peft_model import PeftModel

        names = _adapter_names(args.adapter)
        model = PeftModel.from_pretrained(base, adapters[0][0], adapter_name=names[0])
        for name, (folder, _) in zip(names[1:], adapters[1:]):
            model.load_adapter(folder, adapter_name=name)
        columns += [(label, name) for label, name in zip(args.adapter, names)]
        outputs = _generate_columns(model, tokenizer, texts, columns, args.max_new_tokens)
    else:
        outputs = {"__base__": generate_texts(base, tokenizer, texts, args.max_new_tokens)}
    for i, prompt in enumerate(prompts):
        if args.json:
            print(json.dumps({"prompt": prompt, **{label: outputs[name][i] for label, name in columns}}))
            continue
        print(f"=== prompt {i + 1}: {prompt}")
        for label, name in columns:
            shown = f"base ({model_name})" if name == "__base__" else f"adapter {label}"
            print(f"--- {shown}\n{outputs[name][i].strip()}\n")
    return 0


def _model_of(adapters: list) -> str | None:
    from . import checkpoint

    if not adapters:
        return None
    folder, run_config = adapters[0]
    if run_config is not None:
        return run_config.model
    return checkpoint.read_config(folder).base_model_name_or_path


def _adapter_names(paths: Sequence[str]) -> list[str]:
    """Distinct adapter names (letters, digits, _ and -) from the folders' names."""
    import re

    names: list[str] = []
    for path in paths:
        resolved = Path(path).resolve()
        stem = resolved.parent.name if resolved.name == "adapter" else resolved.name
        name = re.sub(r"[^\w\-]", "_", stem) or "adapter"
        candidate, n = name, 2
        while candidate in names:
            candidate, n = f"{name}-{n}", n + 1
        names.append(candidate)
    return names


def _generate_columns(model: Any, tokenizer: Any, texts: list[str], columns: list[tuple[str, str]], max_new_tokens: int) -> dict[str, list[str]]:
    """Every (prompt, column) pair in one mixed-adapter batch when the methods allow, else one batch per column."""
    from .train import generate_texts
    from .tuners.base import tuner_for

    names = [name for _, name in columns]
    mixable = all(tuner_for(model.peft_config[n]).mixable for n in names if n != "__base__")
    if mixable:
        flat = generate_texts(model, tokenizer, texts * len(names), max_new_tokens,
                              adapter_names=[n for n in names for _ in texts])
        return {name: flat[k * len(texts) : (k + 1) * len(texts)] for k, name in enumerate(names)}
    outputs = {}
    for name in names:
        if name == "__base__":
            with model.disable_adapter():
                outputs[name] = generate_texts(model, tokenizer, texts, max_new_tokens)
        else:
            model.set_adapter(name)
            outputs[name] = generate_texts(model, tokenizer, texts, max_new_tokens)
    return outputs


def _add_merge_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("merge", help="export a merged full model folder", description=(
        "Fold an adapter into the base weights and save a plain Hugging Face model folder (tokenizer included) "
        "that transformers loads without peftkit. LoRA and (IA)^3 merge; methods that add layers or tokens cannot."),
        epilog=MERGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter or run folder")
    p.add_argument("--out", required=True, help="folder for the merged model (must not exist)")
    p.add_argument("--model", help="base model (default: the run's, else the adapter's base)")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from .models import load_model
    from .peft_model import PeftModel
    from .train import adapter_task, find_adapter

    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"--out {out} exists; pick a new folder")
    folder, run_config = find_adapter(args.adapter)
    model_name = args.model or _model_of([(folder, run_config)])
    if not model_name:
        raise ValueError(f"{folder} does not name its base model: pass --model")
    task, num_labels = adapter_task(folder)
    base, tokenizer = load_model(model_name, task=task or "causal-lm", num_labels=num_labels)
    try:
        merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    except TypeError as err:  # the method adds layers or tokens: nothing to fold into the weights
        raise ValueError(str(err)) from None
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


def _add_inspect_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="what an adapter holds, or what a model offers to target",
                              description="Describe an adapter folder (method, targets, parameters, size) or a model "
                                          "(the module names --target-modules can use).",
                              epilog=INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="adapter folder, run folder, or model (embedded name, HF folder, cached hub id)")
    p.add_argument("--task", choices=["causal-lm", "seq-cls"], help="for a model: which head to load (default: by model type)")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .describe import describe_adapter, describe_model
    from .train import find_adapter

    try:
        folder, _ = find_adapter(args.path)
    except FileNotFoundError:
        folder = None
    if folder is not None:
        print(describe_adapter(folder))
    else:
        print(describe_model(args.path, args.task))
    return 0


def _bench_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "bench"


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="list or run the benchmark scripts in bench/",
                              description="List the benchmark scripts (each compares side by side in one run), or run one.",
                              epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
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


# ------------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Parameter-efficient fine-tuning: train, evaluate, generate with, merge and "
        "inspect adapters (Hugging Face PEFT-compatible files).",
        epilog="Run 'peftkit VERB --help' for a verb's options and examples.",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    _add_train_parser(subparsers)
    _add_eval_parser(subparsers)
    _add_generate_parser(subparsers)
    _add_merge_parser(subparsers)
    _add_inspect_parser(subparsers)
    _add_bench_parser(subparsers)
    from .serve.command import add_serve_parser

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


if __name__ == "__main__":
    sys.exit(main())
