"""Method comparison on GLUE with MiniLM-L6 (the LoRA paper's Table 2 question, on this machine).

For SST-2 and RTE (``../shared/data/glue``) trains and evaluates: full fine-tuning, BitFit, Houlsby and Pfeiffer
adapters, LoRA on query/value, LoRA on all linear layers, (IA)^3, prompt tuning, prefix tuning, and Hugging Face
PEFT's LoRA on query/value with the same hyperparameters as ours. Every variant runs the same loop (AdamW, linear
decay after 6% warmup as in the LoRA paper, batch 32 on SST-2 and 16 on RTE, max 128 tokens, gradient clipping at
1.0, the same seeded data order, batches of similar lengths) in its own subprocess, so the peak RSS it reports
belongs to that variant alone; ``--jobs`` runs go at once, each on cpus / jobs threads. Reported per variant: trainable
parameters (the classifier head, trained by every method, counted separately), dev accuracy (mean and standard
deviation over seeds), training wall time, adapter file size and peak RSS.

Learning rates: ``--sweep`` trains each variant for ``--sweep-steps`` steps on a slice of the SST-2 *training* set at
three rates (the method's default / 3, x1, x3) and scores them on a disjoint held-out slice of 500 training
examples (never on dev); the best rate is then used for every task and seed. Without ``--sweep`` the defaults below
(the rates each method's paper used for BERT-size models) are used.

Budget: this CPU trains MiniLM at roughly 600 tokens/s per core, so the default run is short: 300 steps on SST-2 (a
seventh of an epoch) and 156 on RTE (one epoch), far less than the papers' 10-80 epochs.

    python bench/methods_glue.py                            # the BENCHMARKS.md tables (about 90 minutes on 2 cores)
    python bench/methods_glue.py --tasks sst-2              # SST-2 alone (about 20 minutes)
    python bench/methods_glue.py --sweep                    # learning rates swept first (about 15 minutes more)
    python bench/methods_glue.py --quick --out /tmp/mg      # a few steps of everything (what the test runs)
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import FinishedRuns, write_report  # noqa: E402  (bench/ is the script's folder)

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
TASK_FOLDERS = {"sst-2": "SST-2", "rte": "RTE"}
MAX_LENGTH, WARMUP = 128, 0.06
BATCH = {"sst-2": 32, "rte": 16}  # the LoRA paper's GLUE setup uses batch 16-32 and 6% warmup

# Variant -> default peak learning rate (the usual rates of each method's paper for BERT-size models).
VARIANTS: dict[str, float] = {
    "full": 5e-5,
    "bitfit": 1e-3,
    "houlsby": 1e-3,
    "pfeiffer": 1e-3,
    "lora-qv": 5e-4,
    "lora-all": 5e-4,
    "ia3": 5e-3,
    "prompt": 3e-2,
    "prefix": 1e-2,
    "hf-lora-qv": 5e-4,
}
LABELS = {
    "full": "Full fine-tuning",
    "bitfit": "BitFit",
    "houlsby": "Adapter (Houlsby)",
    "pfeiffer": "Adapter (Pfeiffer)",
    "lora-qv": "LoRA q,v (r=8)",
    "lora-all": "LoRA all linear (r=8)",
    "ia3": "(IA)^3",
    "prompt": "Prompt tuning (20 tokens)",
    "prefix": "Prefix tuning (20 tokens)",
    "hf-lora-qv": "HF PEFT LoRA q,v (r=8)",
}


# ------------------------------------------------------------------------------------------------- one run (child)


def build(variant: str, model):
    """The model to train for ``variant``: a peftkit / HF PEFT wrapper, or the base itself for full fine-tuning."""
    import peftkit as pk

    lora = dict(r=8, lora_alpha=16, lora_dropout=0.1, task_type="SEQ_CLS")
    if variant == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if variant == "hf-lora-qv":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(target_modules=["query", "value"], **lora))
    config = {
        "bitfit": lambda: pk.BitFitConfig(task_type="SEQ_CLS"),
        "houlsby": lambda: pk.BottleneckConfig(variant="houlsby", reduction_factor=16, task_type="SEQ_CLS"),
        "pfeiffer": lambda: pk.BottleneckConfig(variant="pfeiffer", reduction_factor=16, task_type="SEQ_CLS"),
        "lora-qv": lambda: pk.LoraConfig(target_modules=["query", "value"], **lora),
        "lora-all": lambda: pk.LoraConfig(target_modules="all-linear", **lora),
        "ia3": lambda: pk.IA3Config(task_type="SEQ_CLS"),
        "prompt": lambda: pk.PromptTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"),
        "prefix": lambda: pk.PrefixTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"),
    }[variant]()
    return pk.get_peft_model(model, config)


def head_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)


def saved_bytes(variant: str, model) -> int:
    """Bytes of what a user ships: the adapter file (head included), or the whole model for full fine-tuning."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        if variant == "full":
            path = Path(folder) / "model.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        else:
            model.save_pretrained(folder)
            path = next(Path(folder).rglob("adapter_model.safetensors"))
        return path.stat().st_size


def run_one(
    variant: str, task: str, seed: int, lr: float, steps: int, batch: int | None = None,
    train_slice: tuple[int, int] | None = None, eval_slice: tuple[int, int] | None = None, max_eval: int | None = None,
) -> dict:
    """Train ``variant`` on ``task`` and score it; ``*_slice`` pick training-set ranges (for the learning-rate sweep)."""
    import random

    import torch

    import peftkit as pk
    from peftkit.data import ClassificationCollator, load_glue
    from peftkit.device import Precision
    from peftkit.train import ClassificationTask, learning_rate
    from peftkit.train.task_data import BatchOrder

    torch.manual_seed(seed)
    folder = GLUE / TASK_FOLDERS[task]
    train = load_glue(folder, "train").records
    rng = random.Random(1234)  # one fixed shuffle of the training file, so sweep slices are disjoint
    order = list(range(len(train)))
    rng.shuffle(order)
    train = [train[i] for i in order]
    if eval_slice is not None:
        dev = train[eval_slice[0] : eval_slice[1]]
    else:
        dev = load_glue(folder, "dev").records
    if train_slice is not None:
        train = train[train_slice[0] : train_slice[1]]
    dev = dev[:max_eval] if max_eval else dev

    model, tokenizer = pk.load_model("minilm-l6", task="seq-cls", num_labels=2)
    model_params = sum(p.numel() for n, p in model.named_parameters() if "classifier" not in n)
    model = build(variant, model)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    head = head_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    collate = ClassificationCollator(tokenizer, MAX_LENGTH)
    task_runner = ClassificationTask(model, tokenizer, MAX_LENGTH, torch.device("cpu"), Precision(torch.float32, "this benchmark is fp32"))
    pairs = [r["text_pair"] for r in train] if "text_pair" in train[0] else None
    lengths = [len(ids) for ids in tokenizer([r["text"] for r in train], pairs, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    batches = BatchOrder(len(train), batch or BATCH[task], seed, lengths)  # random batches of similar lengths: little padding
    warmup = max(1, round(WARMUP * steps))
    losses = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        indices = batches(step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup, "linear")
        loss = task_runner.loss_sum(collate([train[i] for i in indices])) / len(indices)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    model.eval()
    scores = task_runner.evaluate(dev, 64)
    return {
        "variant": variant,
        "task": task,
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "trainable_params": trainable - head,
        "head_params": head,
        "model_params": model_params,
        "accuracy": scores["accuracy"],
        "eval_loss": scores["loss"],
        "eval_examples": len(dev),
        "train_s": train_s,
        "first_loss": statistics.mean(losses[:10]),
        "last_loss": statistics.mean(losses[-10:]),
        "file_bytes": saved_bytes(variant, model),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----------------------------------------------------------------------------------------------- orchestration


def spawn(variant: str, task: str, seed: int, lr: float, steps: int, threads: int, **slices: Any) -> dict:
    """Run one variant in a fresh process (so its peak RSS is its own) and return its result."""
    args = [sys.executable, __file__, "--child", variant, task, str(seed), repr(lr), str(steps), json.dumps(slices)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_ARENA_MAX="1", MALLOC_MMAP_THRESHOLD_="1048576")
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} on {task} (seed {seed}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_all(jobs: list[dict], workers: int, threads: int, log, finished: FinishedRuns) -> list[dict]:
    """Run every job (keyword arguments of :func:`spawn`), ``workers`` at a time; results in job order."""
    reused = sum(finished.get(job) is not None for job in jobs)
    if reused:
        log(f"reusing {reused} of {len(jobs)} runs finished earlier, from {finished.path} (delete it to rerun them)")

    def one(job: dict) -> dict:
        result = finished.get(job)
        if result is None:
            result = spawn(threads=threads, **job)
            finished.add(job, result)
        log(
            f"{job['task']:<5} {job['variant']:<11} seed {job['seed']} lr {job['lr']:<8g} accuracy {result['accuracy']:.3f} "
            f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f} in {result['train_s']:.0f} s"
        )
        return result

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


def sweep(variants: list[str], steps: int, workers: int, threads: int, log, finished: FinishedRuns) -> dict[str, float]:
    """Pick each variant's learning rate on SST-2 training data only: train on one slice, score on another."""
    factors = (1 / 3, 1.0, 3.0)
    jobs = [
        dict(variant=v, task="sst-2", seed=0, lr=float(f"{VARIANTS[v] * f:.3g}"), steps=steps,
             train_slice=(0, 20000), eval_slice=(60000, 60500))
        for v in variants for f in factors
    ]  # fmt: skip
    results = run_all(jobs, workers, threads, lambda m: log("  sweep " + m), finished)
    chosen = {}
    for variant in variants:
        trials = [(r["accuracy"], -r["eval_loss"], r["lr"]) for r in results if r["variant"] == variant]
        chosen[variant] = max(trials)[2]
    return chosen


def summarize(results: list[dict]) -> list[dict]:
    """One row per (variant, task): mean and standard deviation of accuracy over seeds, means of the rest."""
    rows = []
    keys = sorted({(r["task"], r["variant"]) for r in results}, key=lambda k: (list(TASK_FOLDERS).index(k[0]), list(VARIANTS).index(k[1])))
    for task, variant in keys:
        runs = [r for r in results if r["task"] == task and r["variant"] == variant]
        accuracies = [r["accuracy"] for r in runs]
        rows.append(
            {
                "task": task,
                "variant": variant,
                "lr": runs[0]["lr"],
                "seeds": len(runs),
                "trainable_params": runs[0]["trainable_params"],
                "head_params": runs[0]["head_params"],
                "model_params": runs[0]["model_params"],
                "accuracy_mean": statistics.mean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "train_s": statistics.mean(r["train_s"] for r in runs),
                "file_bytes": runs[0]["file_bytes"],
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            }
        )
    return rows


def markdown(rows: list[dict], floors: dict[str, float]) -> str:
    tasks = [t for t in TASK_FOLDERS if any(r["task"] == t for r in rows)]
    lines = []
    for task in tasks:
        lines += [
            f"**{task.upper()}** (always answering the most common label scores {100 * floors[task]:.1f}% on dev)",
            "",
            "| method | trainable params (+ head) | % of model | lr | dev accuracy | seeds | train time (s) | file (KiB) | peak RSS (MiB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r["task"] == task):
            accuracy = f"{100 * r['accuracy_mean']:.1f}" + (f" ± {100 * r['accuracy_std']:.1f}" if r["seeds"] > 1 else "")
            share = 100 * r["trainable_params"] / r["model_params"]
            lines.append(
                f"| {LABELS[r['variant']]} | {r['trainable_params']:,} (+ {r['head_params']:,}) | {share:.3g}% | {r['lr']:g} "
                f"| {accuracy} | {r['seeds']} | {r['train_s']:.0f} | {r['file_bytes'] / 1024:,.0f} | {r['peak_rss_mib']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def majority_share(task: str) -> float:
    """Dev accuracy of always answering the most common label: the floor a trained model must clear."""
    from collections import Counter

    from peftkit.data import load_glue

    labels = Counter(r["label"] for r in load_glue(GLUE / TASK_FOLDERS[task], "dev").records)
    return max(labels.values()) / sum(labels.values())


def plot(rows: list[dict], path: Path, floors: dict[str, float]) -> None:
    """Top: accuracy against trainable parameters on a log axis, one panel per task (the LoRA paper's Figure 2 style).
    Bottom: what each method costs to ship (file size) and to train (peak RSS)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASK_FOLDERS if any(r["task"] == t for r in rows)]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    colors = dict(zip(VARIANTS, plt.get_cmap("tab10").colors))
    markers = dict(zip(VARIANTS, "osD^v<>phX"))  # HF PEFT's LoRA a small X: visible on top of ours when they agree
    fig = plt.figure(figsize=(5.5 * max(2, len(tasks)) + 2.5, 9), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 0.9])
    axes = top.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for r in (r for r in rows if r["task"] == task):
            x, y = r["trainable_params"] + r["head_params"], 100 * r["accuracy_mean"]
            ax.errorbar(x, y, yerr=100 * r["accuracy_std"], fmt=markers[r["variant"]], capsize=3, color=colors[r["variant"]],
                        markersize=5 if r["variant"] == "hf-lora-qv" else 9, label=LABELS[r["variant"]])
        ax.axhline(100 * floors[task], color="grey", linestyle="--", linewidth=1)
        ax.annotate("majority class", (0.01, 100 * floors[task]), xycoords=("axes fraction", "data"), fontsize=7,
                    xytext=(0, 3), textcoords="offset points", color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale, classifier head included)")
        ax.set_ylabel("dev accuracy (%)")
        ax.set_title(f"MiniLM-L6 on {task.upper()}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    top.legend(handles, labels, loc="outside right center", fontsize=8)

    size_ax, rss_ax = bottom.subplots(1, 2)
    first = {v: next(r for r in rows if r["variant"] == v) for v in variants}  # file size does not depend on the task
    y = range(len(variants))
    size_ax.barh(y, [first[v]["file_bytes"] / 1024 for v in variants], color=[colors[v] for v in variants])
    size_ax.set_xscale("log")
    size_ax.set_xlabel("file a user ships (KiB, log scale; full fine-tuning: the whole model)")
    height = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        rss = {r["variant"]: r["peak_rss_mib"] for r in rows if r["task"] == task}
        rss_ax.barh([k + (i - (len(tasks) - 1) / 2) * height for k in y], [rss.get(v, 0) for v in variants], height,
                    color=[colors[v] for v in variants], alpha=1.0 - 0.45 * i)
    rss_ax.set_xlabel("peak training RSS (MiB)" + (f"; bars top to bottom: {', '.join(t.upper() for t in tasks)}" if len(tasks) > 1 else ""))
    for ax in (size_ax, rss_ax):
        ax.set_yticks(list(y), [LABELS[v] for v in variants], fontsize=8)
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tasks", nargs="+", default=list(TASK_FOLDERS), choices=list(TASK_FOLDERS))
    parser.add_argument("--sst2-steps", type=int, default=300, help="training steps on SST-2 (batch 32: a seventh of an epoch)")
    parser.add_argument("--rte-steps", type=int, default=156, help="training steps on RTE (batch 16: one epoch of its 2,490 examples)")
    parser.add_argument("--rte-seeds", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="choose each learning rate on SST-2 training slices first")
    parser.add_argument("--sweep-steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="2 steps of batch 8 from 500 training examples, one seed, 32 dev examples: a smoke run")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once, each on cpus/jobs threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for methods_glue.{json,md,png}")
    args = parser.parse_args()
    batches, max_eval = ({"sst-2": 8, "rte": 8}, 32) if args.quick else (BATCH, None)
    slices = {"train_slice": (0, 500)} if args.quick else {}  # quick: skip reading and tokenizing all of SST-2
    if args.quick:
        args.sst2_steps = args.rte_steps = 2
        args.rte_seeds, args.sweep = 1, False

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    finished = FinishedRuns(args.out / "methods_glue.partial.jsonl")
    lrs = sweep(args.variants, args.sweep_steps, args.jobs, threads, log, finished) if args.sweep else {v: VARIANTS[v] for v in args.variants}
    jobs = [
        dict(variant=v, task=task, seed=seed, lr=lrs[v], steps=args.sst2_steps if task == "sst-2" else args.rte_steps,
             batch=batches[task], max_eval=max_eval, **slices)
        for task in args.tasks
        for v in args.variants
        for seed in range(1 if task == "sst-2" else args.rte_seeds)
    ]  # fmt: skip
    results = run_all(jobs, args.jobs, threads, log, finished)
    rows = summarize(results)
    floors = {task: majority_share(task) for task in args.tasks}
    report = {
        "command": "python " + " ".join(sys.argv),
        "setup": {"model": "minilm-l6", "batch": batches, "max_length": MAX_LENGTH, "warmup": WARMUP, "schedule": "linear",
                  "sst2_steps": args.sst2_steps, "rte_steps": args.rte_steps, "rte_seeds": args.rte_seeds,
                  "learning_rates": lrs, "swept": args.sweep, "jobs": args.jobs, "threads_per_job": threads,
                  "dev_majority_class": floors},
        "rows": rows,
        "runs": results,
    }
    write_report(args.out, "methods_glue", report, markdown(rows, floors), lambda path: plot(rows, path, floors))
    finished.forget()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        variant, task, seed, lr, steps, slices = sys.argv[2:8]
        options = json.loads(slices)
        result = run_one(
            variant, task, int(seed), float(lr), int(steps),
            train_slice=tuple(options["train_slice"]) if "train_slice" in options else None,
            eval_slice=tuple(options["eval_slice"]) if "eval_slice" in options else None,
            max_eval=options.get("max_eval"),
            batch=options.get("batch"),
        )
        print(json.dumps(result))
    else:
        main()
