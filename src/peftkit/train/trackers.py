"""Experiment tracking: ``--report-to none|tensorboard|mlflow|trackio`` (transformers' ``report_to`` names), each
through its own library, installed as an optional extra (``pip install peftkit[tensorboard]`` ...).

A tracker gets what the run folder gets: the resolved config at the start, every ``metrics.jsonl`` record as
scalars at its step (train records under ``train/``, evaluation records under ``eval/``), and the end-of-run
summary. Only the process that writes the run folder (rank 0 under torchrun) builds a tracker.

Where each writes: TensorBoard event files in ``<run>/tensorboard`` (``tensorboard --logdir runs``); MLflow the
tracking URI of ``MLFLOW_TRACKING_URI`` (default: MLflow's own, ``./mlruns`` or ``./mlflow.db``), experiment
``MLFLOW_EXPERIMENT_NAME`` (default ``peftkit``), one MLflow run per peftkit run; trackio its local project
``TRACKIO_PROJECT`` (default ``peftkit``).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

REPORT_TO = ("none", "tensorboard", "mlflow", "trackio")
_MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "trackio": "trackio"}
_REQUIRES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio"}


def _require(name: str) -> Any:
    """Import the library behind ``--report-to name``, or say in one line which extra installs it."""
    try:
        importlib.import_module(_REQUIRES[name])
        return importlib.import_module(_MODULES[name])
    except ImportError:
        raise ImportError(f"--report-to {name} needs the {name} library: pip install 'peftkit[{name}]'") from None


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as ``{"train/loss": ..., "eval/accuracy": ...}`` (numbers only, ``step`` apart)."""
    prefix = record.get("type", "train")
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(config: dict[str, Any]) -> dict[str, str]:
    """Config values as strings (trackers take flat string/number parameters)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}


class Tracker:
    """One run's reports to one tracker: ``start(config)``, ``log(record)`` per metrics line, ``finish(summary)``."""

    def __init__(self, name: str, run_dir: Path) -> None:
        if name not in REPORT_TO:
            raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {name!r}")
        self.name, self.run_dir = name, Path(run_dir)
        self.module = _require(name) if name != "none" else None
        self.writer: Any = None

    def start(self, config: dict[str, Any], resumed_step: int = 0) -> None:
        if self.name == "tensorboard":
            self.writer = self.module.SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resumed_step or None)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        elif self.name == "mlflow":
            self.module.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "peftkit"))
            self.writer = self.module.start_run(run_name=self.run_dir.name)
            self.module.log_params(_flat(config))
        elif self.name == "trackio":
            self.writer = self.module.init(project=os.environ.get("TRACKIO_PROJECT", "peftkit"), name=self.run_dir.name,
                                           config=config)

    def log(self, record: dict[str, Any]) -> None:
        scalars, step = _scalars(record), int(record["step"])
        if self.name == "tensorboard":
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        elif self.name == "mlflow":
            self.module.log_metrics(scalars, step=step)
        elif self.name == "trackio":
            self.module.log(scalars, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        final = {f"summary/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        final.update({f"summary/eval_final_{k}": float(v) for k, v in (summary.get("eval_final") or {}).items()})
        if self.name == "tensorboard":
            for key, value in final.items():
                self.writer.add_scalar(key, value, int(summary.get("steps", 0)))
            self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", int(summary.get("steps", 0)))
            self.writer.close()
        elif self.name == "mlflow":
            self.module.log_metrics(final)
            self.module.log_dict(summary, "summary.json")
            self.module.end_run()
        elif self.name == "trackio":
            self.module.log(final)
            self.module.finish()
