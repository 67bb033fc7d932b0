"""T-Few's few-shot findings at SmolLM2-135M scale: the T-Few losses, and (IA)^3 against LoRA (Liu et al. 2022).

The paper (T0-3B, held-out tasks, 20-70 shots) reports that (IA)^3 trained with L_LM + L_UL + L_LN and scored by
rank classification beats in-context learning and LoRA at a fraction of LoRA's parameters, and that adding the
unlikelihood and length-normalised losses helps. This script asks the same questions of SmolLM2-135M-Instruct on
RTE and SST-2 from ``../shared/data/glue`` phrased as questions (``peftkit.data.PHRASINGS``):

- zero-shot rank classification (no training);
- (IA)^3 with L_LM + L_UL + L_LN (the T-Few recipe), (IA)^3 with L_LM only, LoRA (r = 8 on q, v) with L_LM only;
- each trained on 32 and 64 examples drawn from the training split with each of 5 seeds, through ``peftkit train``'s
  own loop (``TrainingRun``), then scored on the whole dev split (RTE 277, SST-2 872 questions): rank-classification
  accuracy by summed log-likelihood and by length-normalised log-likelihood.

Settings: batch 8, linear decay after 6% warmup, as the T-Few runs; ``--steps`` optimizer steps (the paper's 1000 are
out of reach on 2 CPU cores: the default 30 is about 7 passes over 32 examples). Learning rates are not tuned on
dev: (IA)^3 uses T-Few's 3e-3; LoRA uses 1e-3 unless ``--sweep`` picks each condition's rate from {x/3, x, 3x} by
accuracy on 200 training questions disjoint from every training draw (32-shot, seed 0).

    python bench/tfew_table.py                      # the BENCHMARKS.md table (see there for its measured time)
    python bench/tfew_table.py --tasks rte --seeds 3
    python bench/tfew_table.py --quick --out /tmp/tf  # a few steps of everything (what the test runs)

An interrupted run resumes: finished runs are kept in ``<out>/tfew_table.partial.jsonl`` until the report is written.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import FinishedRuns, panels, save_figure, write_report  # noqa: E402  (bench/ is the script's folder)
from tables import mean_std, run_jobs, summarize, train_and_score, write_jsonl  # noqa: E402

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
TASK_FOLDERS = {"rte": "RTE", "sst-2": "SST-2"}
CONDITIONS = {
    "ia3-tfew": dict(method="ia3", choice_losses="lm,ul,ln", lr=3e-3),
    "ia3-lm": dict(method="ia3", choice_losses="lm", lr=3e-3),
    "lora-lm": dict(method="lora", choice_losses="lm", lr=1e-3),
}
LABELS = {"zero-shot": "zero-shot", "ia3-tfew": "(IA)^3, L_LM + L_UL + L_LN", "ia3-lm": "(IA)^3, L_LM",
          "lora-lm": "LoRA r=8 q,v, L_LM"}
SWEEP_SLICE = 200  # training questions held back from every draw, for --sweep


def questions(task: str, split: str) -> list[dict]:
    from peftkit.data import load_choices

    records, _ = load_choices(GLUE / TASK_FOLDERS[task], split)
    return records


def draw(task: str, shots: int, seed: int) -> list[dict]:
    """``shots`` training questions, drawn by ``seed`` from the training split minus the sweep slice."""
    pool = questions(task, "train")[SWEEP_SLICE:]
    return random.Random(seed).sample(pool, shots)


def choice_lines(records: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "choices": r["choices"], "answer": r["label"]} for r in records]


def train_and_score_choices(condition: str, train: list[dict], dev: list[dict], seed: int, lr: float, steps: int, threads: int) -> dict:
    """One ``peftkit train`` run of ``condition`` on ``train``, scored on ``dev``."""
    with tempfile.TemporaryDirectory() as folder:
        settings = {**CONDITIONS[condition], "lr": lr, "model": "smollm2-135m", "task": "multiple-choice",
                    "data": str(write_jsonl(Path(folder) / "train.jsonl", choice_lines(train))),
                    "eval_data": str(write_jsonl(Path(folder) / "dev.jsonl", choice_lines(dev))), "batch_size": 8,
                    "max_steps": steps, "warmup": 0.06, "schedule": "linear", "seed": seed, "max_eval_examples": len(dev)}
        result = train_and_score(settings, threads)
    return {k: result[k] for k in ("accuracy", "accuracy_norm", "train_loss", "trainable_params", "train_s")} | {"dev_loss": result["loss"]}


def zero_shot(dev: list[dict], threads: int) -> dict:
    import torch

    from peftkit.data import tokenize_choices
    from peftkit.models import load_model
    from peftkit.train.choice_task import MultipleChoiceTask

    torch.set_num_threads(threads)
    model, tokenizer = load_model("smollm2-135m")
    scores = MultipleChoiceTask(model.eval(), tokenizer).evaluate(tokenize_choices(dev, tokenizer, 256), 16)
    return {"accuracy": scores["accuracy"], "accuracy_norm": scores["accuracy_norm"], "dev_loss": scores["loss"],
            "trainable_params": 0, "train_s": 0.0}


def sweep(task: str, steps: int, threads: int, finished: FinishedRuns, log) -> dict[str, float]:
    """Each condition's rate by accuracy on the held-back training slice (32-shot, seed 0): never on dev."""
    held = questions(task, "train")[:SWEEP_SLICE]
    train = draw(task, 32, 0)
    chosen = {}
    for condition, settings in CONDITIONS.items():
        trials = []
        for factor in (1 / 3, 1.0, 3.0):
            lr = float(f"{settings['lr'] * factor:.3g}")
            job = {"kind": "sweep", "task": task, "condition": condition, "lr": lr, "steps": steps}
            result = finished.get(job) or train_and_score_choices(condition, train, held, 0, lr, steps, threads)
            finished.add(job, result)
            log(f"  sweep {task} {condition} lr {lr:g}: accuracy {result['accuracy']:.3f}")
            trials.append((result["accuracy"], result["accuracy_norm"], lr))
        chosen[condition] = max(trials)[2]
    return chosen


def markdown(rows: list[dict], dev_sizes: dict[str, int], majority: dict[str, float]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [f"**{task.upper()}** (dev: {dev_sizes[task]} questions; the majority answer scores {100 * majority[task]:.1f}%)", "",
                  "| condition | shots | trainable params | lr | accuracy (sum) | accuracy (length-normalised) | seeds | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["task"] == task):
            lines.append(f"| {LABELS[r['condition']]} | {r['shots'] or '-'} | {r['trainable_params']:,} | {r['lr'] or '-'} | "
                         f"{mean_std(r, 'accuracy')} | {mean_std(r, 'accuracy_norm')} | {r['seeds']} | {r['train_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = panels(len(tasks))
    for ax, task in zip(axes, tasks):
        zero = next((r for r in rows if r["task"] == task and r["condition"] == "zero-shot"), None)
        if zero:
            ax.axhline(100 * zero["accuracy_mean"], color="gray", linestyle="--", label="zero-shot")
        shots = sorted({r["shots"] for r in rows if r["task"] == task and r["shots"]})
        width = 0.8 / len(CONDITIONS)
        for k, condition in enumerate(CONDITIONS):
            found = [next((r for r in rows if (r["task"], r["condition"], r["shots"]) == (task, condition, s)), None) for s in shots]
            xs = [i + (k - (len(CONDITIONS) - 1) / 2) * width for i, r in enumerate(found) if r]
            ax.bar(xs, [100 * r["accuracy_mean"] for r in found if r], width, yerr=[100 * r["accuracy_std"] for r in found if r],
                   capsize=3, label=LABELS[condition])
        ax.set_xticks(range(len(shots)), [f"{s} shots" for s in shots])
        mine = [r for r in rows if r["task"] == task]  # the axis spans the results, not 0-100: differences are points
        ax.set_ylim(max(0, min(100 * (r["accuracy_mean"] - r["accuracy_std"]) for r in mine) - 5),
                    min(100, max(100 * (r["accuracy_mean"] + r["accuracy_std"]) for r in mine) + 5))
        ax.set_ylabel("dev accuracy (%), mean ± std over seeds")
        ax.set_title(task.upper())
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASK_FOLDERS), default=list(TASK_FOLDERS))
    parser.add_argument("--shots", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sweep", action="store_true", help="pick learning rates on a training slice first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-eval", type=int, help="score on at most this many dev questions (default: all)")
    parser.add_argument("--quick", action="store_true", help="1 step, 4 shots, 1 seed, 8 dev questions")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.quick:
        args.shots, args.seeds, args.steps, args.max_eval = [4], 1, 1, 8
    finished = FinishedRuns(args.out / "tfew_table.partial.jsonl")
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(message, flush=True)  # noqa: E731
    runs, dev_sizes, majority = [], {}, {}
    started = time.perf_counter()
    for task in args.tasks:
        dev = questions(task, "dev")[: args.max_eval]
        dev_sizes[task] = len(dev)
        majority[task] = max(sum(r["label"] == k for r in dev) for k in (0, 1)) / len(dev)
        rates = sweep(task, args.steps, args.threads, finished, log) if args.sweep else {c: s["lr"] for c, s in CONDITIONS.items()}
        jobs = [{"kind": "zero-shot", "task": task, "max_eval": args.max_eval}]
        jobs += [{"kind": "train", "task": task, "condition": c, "shots": k, "seed": s, "lr": rates[c], "steps": args.steps,
                  "max_eval": args.max_eval} for k in args.shots for c in CONDITIONS for s in range(args.seeds)]

        def run(job: dict, dev: list[dict] = dev, task: str = task) -> dict:
            if job["kind"] == "zero-shot":
                return zero_shot(dev, args.threads)
            return train_and_score_choices(job["condition"], draw(task, job["shots"], job["seed"]), dev, job["seed"],
                                           job["lr"], job["steps"], args.threads)

        describe = lambda job, r: (f"{job['task']} {job.get('condition', 'zero-shot'):<9} shots {job.get('shots', 0):<3} "  # noqa: E731
                                   f"seed {job.get('seed', 0)} accuracy {r['accuracy']:.3f} / {r['accuracy_norm']:.3f} "
                                   f"(length-normalised), {r['train_s']:.0f} s")
        for result in run_jobs(jobs, run, finished, describe):
            runs.append({"condition": "zero-shot", "shots": 0, "seed": 0, "lr": None, **result})
    rows = summarize(runs, ("task", "condition", "shots"), ("accuracy", "accuracy_norm"))
    for row in rows:
        row["lr"] = next(r["lr"] for r in runs if (r["task"], r["condition"], r["shots"]) == (row["task"], row["condition"], row["shots"]))
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "wall_s": time.perf_counter() - started, "dev_sizes": dev_sizes, "majority": majority, "rows": rows, "runs": runs}
    write_report(args.out, "tfew_table", report, markdown(rows, dev_sizes, majority), lambda p: plot(rows, p))
    finished.forget()


if __name__ == "__main__":
    main()
