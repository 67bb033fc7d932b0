"""The run plot: training and evaluation loss against step, and the task's score when there is one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

SCORES = ("accuracy", "f1", "matthews_corrcoef")


def plot_metrics(records: Sequence[dict[str, Any]], path: str | os.PathLike, metric: str | None = None) -> Path:
    """Write a PNG of the ``metrics.jsonl`` records: losses on the left, the classification score(s) on the right.

    Training loss is drawn per step (faint) and as a moving average over 5% of the steps, so the trend shows
    through micro-batch noise. Uses matplotlib's Agg backend (no display needed); the file is replaced atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    scores = [k for k in SCORES if any(k in r for r in evals)]
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(11 if scores else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, moving_average(losses, max(1, len(losses) // 20)), color="tab:blue", label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if scores:
        ax = axes[0][1]
        for key in scores:
            points = [(r["step"], r[key]) for r in evals if key in r]
            style = "o-" if key == metric else "o--"
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=key + (" (task score)" if key == metric else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("eval score")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start): out[i] = mean(values[max(0, i-w+1) : i+1])."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
