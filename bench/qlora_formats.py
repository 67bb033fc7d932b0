"""The QLoRA paper's question of which 4-bit format (Dettmers et al. 2023, Table 3 and Figure 3), on this machine.

LoRA trained over a frozen base stored five ways: fp32 (no quantization), int8 (LLM.int8, ``Linear8bitLt``), FP4,
NF4, and NF4 with double quantization (the block constants quantized too), all through bitsandbytes on the CPU.
For each: the bits one quantized weight really costs (``peftkit.memory``: data, block constants, double-quant
constants), the score before training (the base's own quantization error: the adapter starts as a no-op), and after
training, 3 seeds.

Tasks: MiniLM-L6 on SST-2 (LoRA r = 8 on query/value, 300 steps of 32, lr 5e-4; dev accuracy, the whole dev set of
872) and SmolLM2-135M on the Alpaca sample (LoRA r = 8 on q/v, 60 steps of 4, lr 2e-4; loss on the 5% held out and
never trained on). The paper's finding: NF4 recovers 16-bit quality where FP4 falls short, and double quantization
costs nothing in quality while saving 0.37 bits per weight.

    python bench/qlora_formats.py
    python bench/qlora_formats.py --models minilm --seeds 1
    python bench/qlora_formats.py --quick --models minilm --out /tmp/qf    # what the test runs
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import FinishedRuns, panels, save_figure, write_report  # noqa: E402  (bench/ is the script's folder)
from tables import SHARED_DATA, mean_std, run_jobs, summarize, train_and_score  # noqa: E402

FORMATS = {  # name -> (quantization, double_quant)
    "fp32": (None, False),
    "int8": ("int8", False),
    "fp4": ("fp4", False),
    "nf4": ("nf4", False),
    "nf4+dq": ("nf4", True),
}
TASKS = {
    "minilm": {"model": "minilm-l6", "data": str(SHARED_DATA / "glue" / "SST-2"), "task": "seq-cls", "batch_size": 32,
               "lr": 5e-4, "max_steps": 300, "target_modules": ["query", "value"]},
    "smollm2": {"model": "smollm2-135m", "data": str(SHARED_DATA / "instruct" / "alpaca_sample_1727.json"), "task": "sft",
                "batch_size": 4, "lr": 2e-4, "max_steps": 60, "target_modules": ["q_proj", "v_proj"], "max_length": 256},
}
SCORE = {"minilm": "accuracy", "smollm2": "loss"}


def markdown(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        score = SCORE[model]
        scale, digits = (100.0, 1) if score == "accuracy" else (1.0, 4)
        lines += [f"**{TASKS[model]['model']}**: {'SST-2 dev accuracy (%)' if score == 'accuracy' else 'Alpaca held-out loss'}", "",
                  "| base weights | bits per weight | before training | after training | seeds | train s |", "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["model"] == model):
            bits = f"{r['bits_per_param']:.3f}" if r["bits_per_param"] else "32 (fp32)"
            lines.append(f"| {r['format']} | {bits} | {mean_std(r, 'before_' + score, scale, digits)} | "
                         f"{mean_std(r, score, scale, digits)} | {r['seeds']} | {r['train_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = panels(len(models))
    for ax, model in zip(axes, models):
        mine, score = [r for r in rows if r["model"] == model], SCORE[model]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r[f"before_{score}_mean"] for r in mine], 0.4, label="before training", color="tab:gray")
        ax.bar([x + 0.2 for x in xs], [r[f"{score}_mean"] for r in mine], 0.4, yerr=[r[f"{score}_std"] for r in mine],
               capsize=3, label="after LoRA training", color="tab:blue")
        ax.set_xticks(list(xs), [r["format"] for r in mine])
        values = [r[f"before_{score}_mean"] for r in mine] + [r[f"{score}_mean"] for r in mine]
        ax.set_ylim(min(values) * 0.95, max(values) * 1.03)
        ax.set_ylabel("dev accuracy" if score == "accuracy" else "held-out loss (lower is better)")
        ax.set_title(TASKS[model]["model"])
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="1 step, 1 seed, 8 evaluation examples")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    seeds = 1 if args.quick else args.seeds
    args.out.mkdir(parents=True, exist_ok=True)
    finished = FinishedRuns(args.out / "qlora_formats.partial.jsonl")
    started = time.perf_counter()
    jobs = [{"model": m, "format": f, "seed": s, "quick": args.quick} for m in args.models for f in args.formats for s in range(seeds)]

    def run(job: dict) -> dict:
        quantization, double_quant = FORMATS[job["format"]]
        settings = {**TASKS[job["model"]], "method": "lora", "r": 8, "alpha": 16, "quantization": quantization,
                    "double_quant": double_quant, "seed": job["seed"]}
        if job["quick"]:
            settings.update(max_steps=1, max_eval_examples=8)
        result = train_and_score(settings, args.threads, score_before=True)
        score = SCORE[job["model"]]
        return {k: result[k] for k in (score, f"before_{score}", "bits_per_param", "trainable_params", "train_s")}

    describe = lambda job, r: (f"{job['model']} {job['format']:<7} seed {job['seed']} {SCORE[job['model']]} "  # noqa: E731
                               f"{r['before_' + SCORE[job['model']]]:.4f} -> {r[SCORE[job['model']]]:.4f} ({r['train_s']:.0f} s)")
    runs = run_jobs(jobs, run, finished, describe)
    rows = []
    for model in args.models:
        mine = [r for r in runs if r["model"] == model]
        for row in summarize(mine, ("model", "format"), (SCORE[model], f"before_{SCORE[model]}")):
            row["bits_per_param"] = next(r["bits_per_param"] for r in mine if r["format"] == row["format"])
            rows.append(row)
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "wall_s": time.perf_counter() - started, "rows": rows, "runs": runs}
    write_report(args.out, "qlora_formats", report, markdown(rows), lambda p: plot(rows, p))
    finished.forget()


if __name__ == "__main__":
    main()
