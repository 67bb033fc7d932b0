"""``peftkit train``: fine-tune an adapter from flags and/or a YAML config."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import add_device_options, key_value, label_list, target_modules
from .errors import EXIT_ERROR, EXIT_INTERRUPTED

EXAMPLES = """examples:
  peftkit train --data ../shared/data/instruct/alpaca_sample_1727.json
  peftkit train --data chats.jsonl                     # {"messages": [{"role": "user", "content": ...}, ...]} per line
  peftkit train --model minilm-l6 --data ../shared/data/glue/SST-2 --r 16 --alpha 32 --lr 1e-3 --max-steps 1500
  peftkit train --config run.yaml --lr 1e-4            # flags override the file
  peftkit train --resume runs/20250101-120000-lora     # after Ctrl-C or a crash
  peftkit train --recipe t-few --task multiple-choice --data ../shared/data/glue/RTE --max-steps 200   # T-Few
  torchrun --nproc-per-node 4 -m peftkit.cli train --data d.json --batch-size 2 --strategy fsdp   # 4 processes
  peftkit train --data d.json --device cuda --quantization nf4 --optim paged_adamw_8bit   # QLoRA on a GPU

The task is inferred from --data when --task is not given: a GLUE folder or a table with a label column ->
seq-cls, instruction/input/output records or conversations (OpenAI "messages" or ShareGPT "conversations", JSON
or JSONL; loss on the assistant's turns only) -> sft, records with prompt/choices/answer -> multiple-choice (rank
classification; --task multiple-choice phrases a GLUE folder as a question), a .txt file -> text. Without
--eval-data, evaluation uses the GLUE dev split, or a held-out 5% of the training file that is never trained on. The run folder (default
runs/<time>-<method>) gets the adapter, metrics.jsonl, metrics.png, report.html (open it in a browser), config.yaml,
samples.md (sft) and checkpoints.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..tuners.base import method_names

    p = subparsers.add_parser(
        "train", help="fine-tune an adapter (the main job)", description="Fine-tune a PEFT adapter on your data.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,  # only flags actually given override the config file
    )
    p.add_argument("--config", metavar="FILE", help="YAML file with any of the settings below (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    p.add_argument("--recipe", choices=["t-few"], help="a paper's settings as defaults (flags override them); t-few: "
                   "(IA)^3, multiple choice with L_LM + L_UL + L_LN, batch 8, lr 3e-3, 1000 steps")
    g = p.add_argument_group("model and method")
    g.add_argument("--model", help="embedded name (smollm2-135m, minilm-l6), local HF folder or cached hub id (default: smollm2-135m)")
    g.add_argument("--method", choices=method_names(), help="PEFT method (default: lora)")
    g.add_argument("--r", type=int, help="LoRA rank (default 8)")
    g.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / r (default 16)")
    g.add_argument("--dropout", type=float, help="LoRA / bottleneck dropout (LoRA default 0.05)")
    g.add_argument("--target-modules", type=target_modules, metavar="NAMES",
                   help="comma-separated module names, a regex, or all-linear (default: the method's choice, LoRA: q,v)")
    g.add_argument("--num-virtual-tokens", type=int, help="prompt / prefix tuning: virtual tokens (default 20)")
    g.add_argument("--reduction-factor", type=int, help="houlsby / pfeiffer: hidden size / bottleneck size (default 16)")
    g.add_argument("--method-option", type=key_value, action="append", dest="method_options", metavar="KEY=VALUE",
                   help="any other field of the method's config, e.g. use_rslora=true (repeatable)")
    g.add_argument("--quantization", choices=["nf4", "fp4", "int8"], help="load the frozen base in 4-bit (QLoRA) or 8-bit")
    g.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="4-bit: keep the block constants in fp32 (4.5 bits per weight instead of 4.127)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory, slower)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="JSON, JSONL, CSV, TSV or text file, or a GLUE task folder (train.tsv + dev.tsv)")
    g.add_argument("--task", choices=["sft", "seq-cls", "text", "multiple-choice"], help="default: inferred from --data")
    g.add_argument("--eval-data", help="evaluation file (default: GLUE dev split, or a held-out slice of --data)")
    g.add_argument("--eval-fraction", type=float, help="held-out share of --data when there is no --eval-data (default 0.05)")
    g.add_argument("--max-eval-examples", type=int, help="evaluate on at most this many examples (default 2000)")
    g.add_argument("--max-length", type=int, help="tokens per example / text chunk (default: sft 512, text 256, seq-cls 128)")
    g.add_argument("--template", choices=["alpaca", "chat"], help="sft prompt format of instruction records (default alpaca; conversations always use the chat template)")
    g.add_argument("--chat-template", metavar="FILE|NAME", help="a Jinja chat template file, or chatml, replacing the tokenizer's (needed when it has none)")
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="padded batches (seq-cls, prompt/prefix): random lengths instead of similar ones")
    g.add_argument("--text-column", help="seq-cls: the text column (default: guessed)")
    g.add_argument("--text-pair-column", help="seq-cls: the second text column of sentence pairs")
    g.add_argument("--label-column", help="seq-cls: the label column (default: label)")
    g.add_argument("--choice-losses", metavar="LIST", help="multiple-choice: losses to sum, of lm, ul (unlikelihood of "
                   "wrong choices), ln (length-normalised softmax over choices) (default lm; --recipe t-few: lm,ul,ln)")
    g.add_argument("--labels", type=label_list, metavar="A,B,...",
                   help="seq-cls: the label values as written in the file, in class-id order; rows with another label "
                        "are bad rows (default: inferred from the file when unambiguous: 0..K-1, or values each "
                        "found in 2+ rows and 1%% of rows)")
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
    g.add_argument("--optim", choices=["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"],
                   help="optimizer: adamw (default; 32-bit state), adamw_8bit (bitsandbytes, 4x smaller state), "
                        "paged_adamw_32bit / paged_adamw_8bit (state pages to CPU RAM under GPU memory pressure; CUDA only)")
    add_device_options(p, suppress=True)
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
    g.add_argument("--report-to", choices=["none", "tensorboard", "mlflow", "trackio"],
                   help="also send the metrics, config and summary to this tracker (default none; each needs its extra: pip install 'peftkit[tensorboard]')")
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes (skipped bad rows are still reported)")
    p.set_defaults(func=cmd_train)


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, over those of ``--config``."""
    from ..train.config import read_settings_file

    settings: dict[str, Any] = {}
    if getattr(args, "config", None):
        settings.update(read_settings_file(args.config, "--config"))
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "resume", "quiet", "func", "verb", "debug")}
    if "method_options" in flags:
        earlier = settings.get("method_options") or {}
        if not isinstance(earlier, dict):
            from ..errors import SettingsError

            raise SettingsError(f"--config {args.config}: method_options must be a mapping, got {earlier!r}")
        flags["method_options"] = {**earlier, **dict(flags["method_options"])}
    settings.update(flags)
    return settings


def cmd_train(args: argparse.Namespace) -> int:
    from .. import train as T
    from ..distributed import is_main_process, teardown

    settings = _train_settings(args)
    progress = not getattr(args, "quiet", False)
    run = None
    try:
        if getattr(args, "resume", None):
            run = T.TrainingRun.resume(args.resume, settings, progress=progress)
        else:
            run = T.TrainingRun(T.TrainConfig.from_dict(settings, source="settings (flags, --config)"), progress=progress)
        result = run.fit()
    except T.TrainingInterrupted as err:
        if is_main_process():
            print(f"peftkit train: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, mid-step, nothing saved since the last checkpoint
        if run is None or not is_main_process():
            raise
        kept = T.list_checkpoints(run.run_dir)
        since = f"the last checkpoint is {kept[-1]}" if kept else "no checkpoint was saved yet"
        print(f"peftkit train: stopped at once by a second Ctrl-C, unsaved; {since}. "
              f"Continue with: peftkit train --resume {run.run_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except T.NonFiniteLossError as err:
        if is_main_process():
            print(f"peftkit train: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        teardown()
    if not is_main_process():
        return 0
    print(f"\nsummary ({run.config.method}, {run.config.task}, {run.config.model}):")
    print(T.summary_table(result, run.data.metric))
    print(f"\nrun folder: {result.run_dir}")
    return 0
