"""The LoRA paper's Tables 5 and 6 and Figure 3 on this machine (Hu et al. 2021, sections 7.1-7.2).

``--table targets`` (Table 5): under one budget of trainable parameters, which attention weights to adapt: Wq, Wk,
Wv, Wo, {Wq, Wk}, {Wq, Wv} or all four. Every variant has the same parameter count per layer:
- MiniLM-L6 (every projection 384 x 384): r = 8 on one type, 4 on two, 2 on four, as in the paper;
- SmolLM2-135M (q, o: 576 -> 576; k, v: 576 -> 192, so one rank costs 1152 or 768): 9216 per layer, as q or o at
  r = 8, k or v at r = 12, {q, k} / {q, v} at 4 + 6, all four at 2 + 3 + 3 + 2 (``rank_pattern``).
``--table rank`` (Table 6): r in {1, 2, 4, 8, 64} on {Wq} and on {Wq, Wv}; and the paper's Figure 3: the subspace
similarity of the r = 8 and r = 64 adapters ({Wq, Wv}, seed 0), from ``peftkit analyze``.

Tasks: MiniLM-L6 on SST-2 (sequence classification, the whole dev set of 872); SmolLM2 on SST-2 phrased as a
question (``peftkit.data.PHRASINGS``, rank classification; 2000 training questions, the whole dev set). alpha = 2r
everywhere (the same scale alpha / r = 2 for every rank); ``--alpha 16`` fixes alpha instead, as the paper does when
it varies r, so the scale alpha / r falls from 16 at r = 1 to 0.25 at r = 64 (with Adam that keeps a small rank's
update as large as a big one's; at alpha = 2r a small rank also learns more slowly). Learning rates are the methods'
usual ones, not tuned on dev: 5e-4 (MiniLM, batch 32) and 1e-3 (SmolLM2, batch 8), linear decay after 6% warmup.
3 seeds per variant. Steps: MiniLM 300; SmolLM2 120 in the targets table and 60 in the rank table, which has 30
SmolLM2 runs against 21 (a SmolLM2 run of 120 steps takes ~2 min on 2 cores; 60 steps keep the table near an hour).

    python bench/lora_tables.py --table targets
    python bench/lora_tables.py --table rank
    python bench/lora_tables.py --table targets --quick --models minilm --out /tmp/lt   # what the test runs
    python bench/lora_tables.py --table rank --models minilm --weights q,v q --ranks 1 8 --alpha 16   # the paper's fixed alpha (BENCHMARKS)
    python bench/lora_tables.py --render bench/results/lora_rank.json   # the table and chart again, from the figures
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import FinishedRuns, panels, save_figure, write_report  # noqa: E402  (bench/ is the script's folder)
from tables import SHARED_DATA, mean_std, run_jobs, summarize, train_and_score, write_jsonl  # noqa: E402

SST2 = SHARED_DATA / "glue" / "SST-2"
MODELS = {"minilm": "minilm-l6", "smollm2": "smollm2-135m"}
NAMES = {"minilm": {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense"},
         "smollm2": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}}
# Table 5: ranks per weight type giving one budget per layer (see the docstring).
TARGETS = {
    "minilm": {"q": {"q": 8}, "k": {"k": 8}, "v": {"v": 8}, "o": {"o": 8}, "q,k": {"q": 4, "k": 4}, "q,v": {"q": 4, "v": 4},
               "q,k,v,o": {"q": 2, "k": 2, "v": 2, "o": 2}},
    "smollm2": {"q": {"q": 8}, "k": {"k": 12}, "v": {"v": 12}, "o": {"o": 8}, "q,k": {"q": 4, "k": 6}, "q,v": {"q": 4, "v": 6},
                "q,k,v,o": {"q": 2, "k": 3, "v": 3, "o": 2}},
}
RANKS = (1, 2, 4, 8, 64)
STEPS = {"targets": {"minilm": 300, "smollm2": 120}, "rank": {"minilm": 300, "smollm2": 60}}  # sized to ~1 h each
TRAIN_QUESTIONS = 2000


def lora_settings(model: str, ranks: dict[str, int], alpha: int | None = None) -> dict:
    """LoRA on the named weight types with their ranks; alpha = 2r each (one scale alpha / r for every variant), or
    one fixed ``alpha`` for every rank (the paper's convention when it varies r: the scale falls as r grows)."""
    names = NAMES[model]
    first = next(iter(ranks.values()))
    options = {"rank_pattern": {names[t]: r for t, r in ranks.items() if r != first},
               "alpha_pattern": {names[t]: 2 * r for t, r in ranks.items() if r != first and alpha is None}}
    return {"method": "lora", "r": first, "alpha": alpha or 2 * first, "dropout": 0.0,
            "target_modules": [names[t] for t in ranks], "method_options": {k: v for k, v in options.items() if v}}


def task_settings(model: str, steps: int, max_eval: int | None, folder: Path) -> dict:
    """Data and optimisation settings of one model's task (files written into ``folder``)."""
    common = {"model": MODELS[model], "max_steps": steps, "warmup": 0.06, "schedule": "linear"}
    if model == "minilm":
        return {**common, "data": str(SST2), "task": "seq-cls", "batch_size": 32, "lr": 5e-4, "max_eval_examples": max_eval or 2000}
    from peftkit.data import load_choices

    train, _ = load_choices(SST2, "train")
    dev, _ = load_choices(SST2, "dev")
    train = random.Random(1234).sample(train, TRAIN_QUESTIONS)
    as_lines = lambda records: [{"prompt": r["prompt"], "choices": r["choices"], "answer": r["label"]} for r in records]  # noqa: E731
    return {**common, "task": "multiple-choice", "batch_size": 8, "lr": 1e-3, "max_eval_examples": max_eval or len(dev),
            "data": str(write_jsonl(folder / "sst2-train.jsonl", as_lines(train))),
            "eval_data": str(write_jsonl(folder / "sst2-dev.jsonl", as_lines(dev[: max_eval or len(dev)])))}


def variants(table: str, model: str, ranks: tuple[int, ...], weights: tuple[str, ...] = ("q", "q,v")) -> dict[str, dict[str, int]]:
    if table == "targets":
        return TARGETS[model]
    return {f"{targets} r={r}": {t: r for t in targets.split(",")} for targets in weights for r in ranks}


def figure3(kept: dict[int, Path], png: Path) -> dict:
    """``peftkit analyze`` of the r = 8 and r = 64 adapters: phi summary (JSON) and the heatmap."""
    command = [sys.executable, "-m", "peftkit", "analyze", str(kept[8]), str(kept[64])]
    subprocess.run([*command, "--plot", str(png)], check=True, capture_output=True)
    return json.loads(subprocess.run([*command, "--json"], check=True, capture_output=True, text=True).stdout)


def markdown(rows: list[dict], table: str, score: str, alpha: int | None = None) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"**{MODELS[model]}** on SST-2 ({score} on dev; alpha = {alpha or '2r'})", "",
                  f"| {'weights' if table == 'targets' else 'weights, rank'} | trainable params | dev {score} | seeds | train s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['trainable_params']:,} | {mean_std(r, score)} | {r['seeds']} | {r['train_s']:.0f} |"
                  for r in rows if r["model"] == model]
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], table: str, score: str, path: Path, alpha: int | None = None) -> None:
    """Targets: a bar per variant. Rank: accuracy against r (log scale), a line per set of weights, as Table 6 reads."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = panels(len(models))
    for ax, model in zip(axes, models):
        mine = [r for r in rows if r["model"] == model]
        if table == "rank":
            for targets in dict.fromkeys(r["variant"].split(" r=")[0] for r in mine):
                line = [r for r in mine if r["variant"].startswith(targets + " r=")]
                ranks = [int(r["variant"].split(" r=")[1]) for r in line]
                ax.errorbar(ranks, [100 * r[f"{score}_mean"] for r in line], yerr=[100 * r[f"{score}_std"] for r in line],
                            marker="o", capsize=3, label="{" + targets + "}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ranks, [str(r) for r in ranks])
            ax.set_xlabel(f"LoRA rank r (alpha = {alpha or '2r'})")
            ax.set_ylabel(f"dev {score} (%), mean ± std")
            ax.set_title(f"{MODELS[model]}: which rank")
            ax.legend()
            continue
        ax.bar(range(len(mine)), [100 * r[f"{score}_mean"] for r in mine], yerr=[100 * r[f"{score}_std"] for r in mine], capsize=3)
        ax.set_xticks(range(len(mine)), [r["variant"] for r in mine], rotation=30, ha="right")
        low = min(100 * (r[f"{score}_mean"] - r[f"{score}_std"]) for r in mine)
        ax.set_ylim(max(0, low - 5), 100)
        ax.set_ylabel(f"dev {score} (%), mean ± std")
        ax.set_title(f"{MODELS[model]}: equal budget, which weights")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=["targets", "rank"], help="which table to measure (required unless --render)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=list(RANKS), help="--table rank: the ranks")
    parser.add_argument("--weights", nargs="+", choices=["q", "q,v"], default=["q", "q,v"], help="--table rank: the sets of weights")
    parser.add_argument("--alpha", type=int, help="one alpha for every rank, as the paper when it varies r (default: alpha = 2r, "
                        "one scale alpha / r for all); results go to lora_<table>_alpha<N>.*")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="optimizer steps for every model (default: STEPS, per table and model)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="1 step, 1 seed, 8 dev examples")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--render", type=Path, metavar="JSON", help="write the table and chart of a result file again and exit")
    args = parser.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
        table, rows, alpha = report["settings"]["table"], report["rows"], report["settings"].get("alpha")
        write_report(args.render.parent, args.render.stem, report, markdown(rows, table, "accuracy", alpha), lambda p: plot(rows, table, "accuracy", p, alpha))
        return
    if args.table is None:
        parser.error("--table targets or --table rank is required (or --render a result file)")
    max_eval = 8 if args.quick else None
    seeds = 1 if args.quick else args.seeds
    name = f"lora_{args.table}" + (f"_alpha{args.alpha}" if args.alpha else "")
    args.out.mkdir(parents=True, exist_ok=True)
    finished = FinishedRuns(args.out / f"{name}.partial.jsonl")
    started, runs, kept = time.perf_counter(), [], {}
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            steps = 1 if args.quick else args.steps or STEPS[args.table][model]
            base = task_settings(model, steps, max_eval, Path(folder))
            score = "accuracy"
            fixed = {"alpha": args.alpha} if args.alpha else {}  # only when set: keeps older resume files' keys
            jobs = [{"model": model, "variant": v, "ranks": ranks, "seed": s, "steps": steps, "max_eval": max_eval, **fixed}
                    for v, ranks in variants(args.table, model, tuple(args.ranks), tuple(args.weights)).items() for s in range(seeds)]

            def run(job: dict, base: dict = base, model: str = model) -> dict:
                keep = None
                if args.table == "rank" and job["seed"] == 0 and job["variant"] in ("q,v r=8", "q,v r=64"):
                    keep = args.out / f"{name}-adapters" / f"{model}-{job['variant'].split('=')[1]}"
                settings = {**base, **lora_settings(model, job["ranks"], args.alpha), "seed": job["seed"]}
                result = train_and_score(settings, args.threads, keep_adapter=keep)
                return {k: result[k] for k in (score, "loss", "train_loss", "trainable_params", "train_s")}

            describe = lambda job, r: f"{job['model']} {job['variant']:<10} seed {job['seed']} {score} {r[score]:.3f} ({r['trainable_params']:,} params, {r['train_s']:.0f} s)"  # noqa: E731
            runs += run_jobs(jobs, run, finished, describe)
            adapters = args.out / f"{name}-adapters"
            if args.table == "rank" and all((adapters / f"{model}-{r}").exists() for r in (8, 64)):
                kept[model] = figure3({r: adapters / f"{model}-{r}" for r in (8, 64)}, args.out / f"{name}_phi-{model}.png")
    rows = summarize(runs, ("model", "variant"), ("accuracy",))
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "wall_s": time.perf_counter() - started, "rows": rows, "runs": runs, "figure3": kept}
    write_report(args.out, name, report, markdown(rows, args.table, "accuracy", args.alpha), lambda p: plot(rows, args.table, "accuracy", p, args.alpha))
    finished.forget()


if __name__ == "__main__":
    main()
