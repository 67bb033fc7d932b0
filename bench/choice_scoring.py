"""Rank classification reading each prompt once, against one row per choice (the plain decoder-only layout).

SmolLM2-135M-Instruct with (IA)^3, RTE dev phrased as a question (" True" / " False"), 16 questions per batch: one
scoring pass (no gradients) and one training step (the T-Few losses, forward and backward), each timed in
interleaved rounds (shared, rows, shared, rows, ...) in this process, in the precision ``auto`` picks here. Also
checks that both layouts give the same log-likelihoods.

    python bench/choice_scoring.py [--rounds 5] [--threads 2] [--json bench/results/choice_scoring.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import peftkit as pk
    from peftkit.data import load_choices, tokenize_choices
    from peftkit.device import cpu_identity, resolve_precision
    from peftkit.models import load_model
    from peftkit.train.choice_task import MultipleChoiceTask

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    model = pk.get_peft_model(model, pk.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    records, _ = load_choices(GLUE / "RTE", "dev")
    batch_examples = tokenize_choices(records[: args.batch], tokenizer, 256)
    precision = resolve_precision("auto", torch.device("cpu"), training=True)
    tasks = {layout: MultipleChoiceTask(model, tokenizer, ("lm", "ul", "ln"), precision=precision, share_prompt=layout == "shared")
             for layout in ("shared", "rows")}
    batch = tasks["shared"].collate(batch_examples)

    def score(task: MultipleChoiceTask) -> torch.Tensor:
        with torch.no_grad(), precision.autocast(torch.device("cpu")):
            return task.losses_of(batch)[1]

    def train_step(task: MultipleChoiceTask) -> None:
        model.zero_grad()
        with precision.autocast(torch.device("cpu")):
            loss = task.loss_sum(batch)
        loss.backward()

    model.eval()
    gap = (score(tasks["shared"]) - score(tasks["rows"])).abs().max().item()
    times: dict[str, list[float]] = {f"{kind} {layout}": [] for kind in ("score", "train") for layout in tasks}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for kind, fn in (("score", score), ("train", train_step)):
            model.train(kind == "train")
            for layout, task in tasks.items():
                start = time.perf_counter()
                fn(task)
                if round_:
                    times[f"{kind} {layout}"].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    report = {"cpu": cpu_identity()[0], "bf16_flags": list(cpu_identity()[1]), "threads": args.threads,
              "precision": precision.describe(), "batch": args.batch, "rounds": args.rounds,
              "prompt_tokens": int(batch["prompt_mask"].sum()), "max_abs_loglik_gap": gap, "median_s": median,
              "speedup": {kind: median[f"{kind} rows"] / median[f"{kind} shared"] for kind in ("score", "train")}}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
