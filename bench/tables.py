"""What the papers' tables share: one ``peftkit train`` run scored on held-out data, repeated over conditions and seeds,
resumable, summarised as mean and standard deviation.

Every run goes through ``TrainingRun``, the loop ``peftkit train`` uses, in a temporary run folder; it is scored once
at the end on the evaluation data given (never evaluated during training, so the evaluation costs one pass).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from report import FinishedRuns

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def train_and_score(settings: dict[str, Any], threads: int, keep_adapter: Path | None = None, score_before: bool = False) -> dict[str, Any]:
    """Train with ``settings`` (``TrainConfig`` fields) and score on the run's evaluation data.

    Returns the final scores, the training loss, the trainable parameter count, the training seconds and the bits
    per weight of quantized layers (NaN without); ``score_before`` adds the scores before training as
    ``before_<name>``; with ``keep_adapter`` the adapter folder is copied there (for later analysis).
    """
    from peftkit.memory import memory_footprint
    from peftkit.train import TrainConfig, TrainingRun

    with tempfile.TemporaryDirectory() as folder:
        config = TrainConfig.from_dict({"eval_every": 0, "save_every": 0, "num_samples": 0, "threads": threads,
                                        **settings, "out": str(Path(folder) / "run")})
        run = TrainingRun(config, progress=False)
        before = {f"before_{k}": float(v) for k, v in run.evaluate().items()} if score_before else {}
        bits = memory_footprint(run.model).bits_per_param
        bits = None if bits != bits else bits  # NaN: nothing quantized
        start = time.perf_counter()
        result = run.fit()
        train_s = time.perf_counter() - start
        scores = run.evaluate()
        if keep_adapter is not None:
            shutil.rmtree(keep_adapter, ignore_errors=True)
            shutil.copytree(result.adapter_dir, keep_adapter)
    return {**{k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}, "train_loss": result.train_loss,
            "trainable_params": result.trainable_parameters, "train_s": train_s, "bits_per_param": bits, **before}


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_jobs(jobs: list[dict], run: Callable[[dict], dict], finished: FinishedRuns, describe: Callable[[dict, dict], str]) -> list[dict]:
    """``run(job)`` for each job not finished earlier; each result is recorded at once, so a kill loses one run."""
    reused = sum(finished.get(job) is not None for job in jobs)
    if reused:
        print(f"reusing {reused} of {len(jobs)} runs finished earlier, from {finished.path} (delete it to rerun them)", flush=True)
    results = []
    for job in jobs:
        result = finished.get(job)
        if result is None:
            result = run(job)
            finished.add(job, result)
        results.append({**job, **result})
        print(describe(job, result), flush=True)
    return results


def summarize(runs: list[dict], group_by: tuple[str, ...], scores: tuple[str, ...]) -> list[dict]:
    """One row per distinct ``group_by`` values (in first-seen order): each score's mean and standard deviation over
    the group's runs (seeds), and the mean of the rest that is numeric and shared."""
    rows = []
    for key in dict.fromkeys(tuple(r[k] for k in group_by) for r in runs):
        group = [r for r in runs if tuple(r[k] for k in group_by) == key]
        row = {**dict(zip(group_by, key)), "seeds": len(group), "trainable_params": group[0].get("trainable_params"),
               "train_s": statistics.mean(r.get("train_s", 0.0) for r in group)}
        for name in scores:
            values = [r[name] for r in group]
            row[f"{name}_mean"] = statistics.mean(values)
            row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def mean_std(row: dict, name: str, scale: float = 100.0, digits: int = 1) -> str:
    """``"61.3 ± 2.0"`` (or the mean alone for one seed)."""
    text = f"{scale * row[name + '_mean']:.{digits}f}"
    return text + (f" ± {scale * row[name + '_std']:.{digits}f}" if row["seeds"] > 1 else "")
