"""Training throughput on the Alpaca sample with SmolLM2-135M: peftkit train vs HF PEFT + transformers Trainer.

Both sides train LoRA (r=8, alpha=16, dropout=0.05, q_proj/v_proj) for the same number of steps, batch size
(examples per step) and learning rate, on the same training records, in their own subprocesses (one at a time, so
they never share the CPU). Then one more subprocess scores both adapters (and the base model) with the same code on
the same held-out records, which neither side trained on. Reported per side: useful (non-padding) training tokens per
second, padding share, median step time, peak RSS, final eval loss, the precision it trained in; plus this machine's
fp32 and bf16 matmul peaks (torch.mm, 2048 square) and each side's LoRA step throughput as a share of the peak of
its precision, counting a LoRA step as 4 x (matmul parameters) x (useful tokens) FLOPs (forward + input
gradients; frozen weights get no weight gradients).

Precision: each side gets its best CPU setting. peftkit trains with ``--precision`` as its ``--dtype`` (default auto: bf16
autocast where peftkit's probe finds bf16 matmul faster, see peftkit.device); the Trainer gets ``bf16=True`` (its
CPU bf16 autocast) under ``--hf-bf16 auto`` on the same condition, or as forced by ``--hf-bf16 yes|no``.

    python bench/train_throughput.py --steps 40           # about 10 minutes on 2 cores
    python bench/train_throughput.py --steps 5 --eval-records 8 --json out.json   # a quick check
    python bench/train_throughput.py --precision float32 --hf-bf16 no         # both sides in fp32

peftkit side: `peftkit train` defaults (packed micro-batches with per-sequence attention, vocabulary head only on
response tokens, cosine schedule with 5% warmup). HF side: Trainer defaults (padding to the longest example,
linear decay, no warmup), prompt tokens masked with -100, at most 512 tokens per example.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "alpaca_sample_1727.json"
TARGETS = ["q_proj", "v_proj"]


def matmul_peak(dtype_name: str = "float32", size: int = 2048, repeats: int = 10) -> float:
    """Best torch.mm GFLOP/s in ``dtype_name`` over ``repeats`` runs of a size x size product (2 n^3 FLOPs each)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def split(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records): peftkit's seeded 5% hold-out, the same for both sides."""
    from peftkit.data import read_records
    from peftkit.train import split_holdout

    records, _ = read_records(args.data, text_columns=["instruction", "output"])
    keep, held = split_holdout(len(records), 0.05, args.seed)
    return [records[i] for i in keep], [records[i] for i in held][: args.eval_records]


def matmul_parameters(model) -> int:
    """Weights of every nn.Linear (the tied output head counted once, as the one matrix it is)."""
    from torch import nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def run_peftkit(args: argparse.Namespace) -> dict:
    from peftkit.train import TrainConfig, TrainingRun, read_metrics

    out = Path(args.workdir) / "peftkit"
    config = TrainConfig(
        data=args.data, model=args.model, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        max_length=512, seed=args.seed, r=8, alpha=16, dropout=0.05, target_modules=TARGETS, out=str(out),
        eval_every=0, save_every=0, num_samples=0,  # evaluation happens apart, the same way for both sides
        device="cpu", dtype=args.precision,
    )
    run = TrainingRun(config, progress=False)
    run.fit()
    steps = [m for m in read_metrics(out / "metrics.jsonl") if m["type"] == "train"][1:]  # the first step warms up
    return {
        "side": "peftkit", "adapter": str(out / "adapter"), "matmul_params": matmul_parameters(run.model.base_model),
        "tokens": sum(m["tokens"] for m in steps), "seconds": sum(m["seconds"] for m in steps),
        "median_step_s": statistics.median(m["seconds"] for m in steps), "padding": 0.0, "peak_rss_mib": peak_rss_mib(),
        "mode": run.task.mode, "precision": run.precision.describe(),
        "precision_dtype": run.precision.name,
    }


def run_hf(args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from peftkit import load_model
    from peftkit.data import tokenize_sft

    model, tokenizer = load_model(args.model)
    model.train()
    train_records, _ = split(args)
    examples = tokenize_sft(train_records, tokenizer, 512)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"))
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    counts: list[tuple[int, int]] = []

    def collate(features):
        batch = pad(features)
        counts.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    out = Path(args.workdir) / "hf"
    bf16 = hf_bf16(args.hf_bf16)
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.lr,
        seed=args.seed, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, bf16=bf16,
    )
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=examples, data_collator=collate, callbacks=[StepTimer()])
    trainer.train()
    peft_model.save_pretrained(out / "adapter")
    # the collator runs for step i before on_step_begin of step i, so counts and times line up one to one
    useful = [c[0] for c in counts[: len(times)]][1:]
    total = [c[1] for c in counts[: len(times)]][1:]
    return {
        "side": "hf", "adapter": str(out / "adapter"), "matmul_params": matmul_parameters(model),
        "tokens": sum(useful), "seconds": sum(times[1:]), "median_step_s": statistics.median(times[1:]),
        "padding": 1 - sum(useful) / sum(total), "peak_rss_mib": peak_rss_mib(), "torch_threads": torch.get_num_threads(),
        "precision": "Trainer bf16=True (CPU bf16 autocast)" if bf16 else "Trainer fp32 (bf16=False)",
        "precision_dtype": "bfloat16" if bf16 else "float32",
    }


def hf_bf16(choice: str) -> bool:
    """The Trainer's best CPU setting: bf16=True where peftkit's probe finds bf16 matmul faster (``auto``)."""
    if choice != "auto":
        return choice == "yes"
    import torch

    from peftkit.device import cpu_auto_precision

    return cpu_auto_precision().dtype == torch.bfloat16


def run_eval(args: argparse.Namespace) -> dict:
    """Held-out loss of the base model and of each side's adapter, all with peftkit's token-weighted scorer."""
    import torch

    from peftkit import PeftModel, load_model
    from peftkit.data import tokenize_sft
    from peftkit.device import Precision
    from peftkit.train import LMTask

    _, held = split(args)
    model, tokenizer = load_model(args.model)
    examples = tokenize_sft(held, tokenizer, 512)
    cpu, fp32 = torch.device("cpu"), Precision(torch.float32, "the same scorer for both sides")
    scores = {"base": LMTask(model, tokenizer, 512, cpu, fp32).evaluate(examples, 16)["loss"]}
    for side in ("peftkit", "hf"):
        adapter = Path(args.workdir) / side / "adapter"
        peft_model = PeftModel.from_pretrained(model, adapter, adapter_name=side)
        peft_model.eval()
        scores[side] = LMTask(peft_model, tokenizer, 512, cpu, fp32).evaluate(examples, 16)["loss"]
        model = peft_model.unload()
    return {"side": "eval", "records": len(held), "tokens": len(examples), **scores}


def subprocess_json(side: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--side", side, "--workdir", args.workdir, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
               "--data", args.data, "--model", args.model, "--eval-records", str(args.eval_records),
               "--threads", str(args.threads), "--precision", args.precision, "--hf-bf16", args.hf_bf16]
    print(f"[{time.strftime('%H:%M:%S')}] running {side} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(peaks: dict[str, float], ours: dict, hf: dict, scores: dict, args: argparse.Namespace) -> str:
    rows = []
    for side in (ours, hf):
        rate = side["tokens"] / side["seconds"]
        share = 4 * side["matmul_params"] * rate / (peaks[side["precision_dtype"]] * 1e9)
        rows.append((side, rate, share))
    speedup = rows[0][1] / rows[1][1]
    lines = [
        f"Alpaca sample, {args.model}, LoRA r=8 q_proj/v_proj, batch {args.batch_size}, lr {args.lr:g}, {args.steps} steps; "
        f"eval on {scores['records']} held-out records (base model: {scores['base']:.4f})",
        f"matmul peaks (torch.mm 2048^2, {hf['torch_threads']} threads): fp32 {peaks['float32']:.1f} GFLOP/s, "
        f"bf16 {peaks['bfloat16']:.1f} GFLOP/s; matmul params {ours['matmul_params']:,}",
        f"precision: peftkit {ours['precision']}; HF {hf['precision']}",
        "",
        "| side | precision | useful tokens/s | padding | median step | LoRA step as % of its precision's matmul peak | peak RSS | final eval loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"peftkit": f"peftkit train ({ours.get('mode', '')})", "hf": "HF PEFT + Trainer"}
    for side, rate, share in rows:
        lines.append(
            f"| {names[side['side']]} | {side['precision_dtype']} | {rate:.1f} | {100 * side['padding']:.0f}% | {side['median_step_s']:.2f} s | "
            f"{100 * share:.0f}% | {side['peak_rss_mib']:.0f} MiB | {scores[side['side']]:.4f} |"
        )
    lines += ["", f"peftkit / HF useful tokens/s: {speedup:.2f}x; eval loss peftkit {scores['peftkit']:.4f} vs HF {scores['hf']:.4f}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per side (default 40, about 10 minutes in all)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both sides and the peak (default: torch's)")
    parser.add_argument("--eval-records", type=int, default=10**6, help="score at most this many held-out records (default: all 86)")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="peftkit side's --dtype (default auto: bf16 where the probe finds it faster)")
    parser.add_argument("--hf-bf16", choices=["auto", "yes", "no"], default="auto",
                        help="Trainer's bf16=True: auto (where the probe finds bf16 faster), yes or no")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--side", choices=["peftkit", "hf", "eval"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.side:
        result = {"peftkit": run_peftkit, "hf": run_hf, "eval": run_eval}[args.side](args)
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="train_throughput-") as workdir:
        args.workdir = workdir
        from peftkit.device import cpu_identity

        # without bf16 units a bf16 product is emulated, up to hundreds of times slower: not worth minutes here
        peaks = {"float32": matmul_peak("float32"), "bfloat16": matmul_peak("bfloat16") if cpu_identity()[1] else float("nan")}
        ours = subprocess_json("peftkit", args)
        hf = subprocess_json("hf", args)
        scores = subprocess_json("eval", args)
    text = report(peaks, ours, hf, scores, args)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_peak_gflops": peaks, "peftkit": ours, "hf": hf, "eval": scores}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
