"""Run settings: :class:`TrainConfig` and its per-task and per-method defaults, the learning-rate schedule.

The methods ``--method`` names, their options and default learning rates come from the tuners themselves
(:func:`peftkit.tuners.base.tuner_for_method`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..distributed import DEFAULT_TIMEOUT, STRATEGIES
from ..tuners.base import tuner_for_method

TASKS = ("sft", "seq-cls", "text", "multiple-choice")
SCHEDULES = ("cosine", "linear", "constant")


# Recipes: a paper's settings as defaults that explicit settings override. T-Few (Liu et al. 2022, section 3.3 and
# its few-shot runs): (IA)^3, L_LM + L_UL + L_LN at weight 1, batch 8, lr 3e-3, 1000 steps, linear decay after a
# 6% warmup. T-Few uses Adafactor; peftkit's optimizer is AdamW.
RECIPES: dict[str, dict[str, Any]] = {
    "t-few": {"method": "ia3", "task": "multiple-choice", "choice_losses": "lm,ul,ln", "lr": 3e-3, "batch_size": 8,
              "max_steps": 1000, "warmup": 0.06, "schedule": "linear"},
}

# Run settings that are method options: each method's tuner says which it takes (``Tuner.cli_options``).
METHOD_OPTIONS = ("r", "alpha", "dropout", "num_virtual_tokens", "reduction_factor")


# ------------------------------------------------------------------------------------------------------------ config


@dataclass
class TrainConfig:
    """Everything a run needs; ``None`` means "the default for this task and method" (see :meth:`resolved`).

    Data: ``data`` is a JSON / JSONL / CSV / TSV / text file or a GLUE task folder (train.tsv + dev.tsv); ``task``
    is inferred from it when not given. ``eval_data`` defaults to the GLUE dev split, else a held-out
    ``eval_fraction`` of the training file (never trained on), at most ``max_eval_examples`` examples.
    ``max_length``: tokens per SFT example / text chunk / classification input.
    Method options (``r``, ``alpha``, ``dropout``, ``num_virtual_tokens``, ``reduction_factor``) go to the method's
    config; ``method_options`` passes any other config field by name.
    ``warmup``: a fraction of the steps if < 1, else a number of steps.
    Under torchrun, ``batch_size`` is per process (a step reads ``world * batch_size`` examples), ``strategy`` is
    ``ddp`` or ``fsdp`` and ``dist_timeout`` the seconds a rank waits for the others before failing.
    ``recipe`` names a set of defaults from ``RECIPES`` (``t-few``); ``choice_losses`` the multiple-choice losses
    (``lm``, ``ul``, ``ln``; see :mod:`peftkit.train.choice_task`).
    """

    data: str | None = None
    model: str = "smollm2-135m"
    method: str = "lora"
    recipe: str | None = None
    task: str | None = None
    eval_data: str | None = None
    eval_fraction: float = 0.05
    max_eval_examples: int = 2000
    # method
    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: list[str] | str | None = None
    num_virtual_tokens: int | None = None
    reduction_factor: int | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    quantization: str | None = None
    double_quant: bool = True
    gradient_checkpointing: bool = False
    # data
    max_length: int | None = None
    group_by_length: bool = True
    template: str = "alpaca"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    on_bad_row: str = "skip"
    choice_losses: str = "lm"
    # optimization
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float | None = None
    warmup: float = 0.05
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    threads: int | None = None
    # several processes (torchrun)
    strategy: str = "ddp"
    dist_timeout: float = DEFAULT_TIMEOUT
    # bookkeeping
    out: str | None = None
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    num_samples: int = 3
    sample_tokens: int = 64

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a YAML/flags mapping; keys may use dashes (``max-steps``) or underscores."""
        known = {f.name for f in dataclasses.fields(cls)}
        clean = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; known settings: {', '.join(sorted(known))}")
        if clean.get("recipe") is not None:
            if clean["recipe"] not in RECIPES:
                raise ValueError(f"{source}: unknown recipe {clean['recipe']!r}; known: {', '.join(RECIPES)}")
            clean = {**RECIPES[clean["recipe"]], **clean}
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, task: str) -> "TrainConfig":
        """A copy with every default filled in for ``task`` (what the run folder's config.yaml records)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        tuner = tuner_for_method(self.method)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.on_bad_row not in ("skip", "error"):
            raise ValueError(f"on_bad_row must be 'skip' or 'error', got {self.on_bad_row!r}")
        out = dataclasses.replace(self, task=task, method_options=dict(self.method_options))
        for name, option in tuner.cli_options.items():
            if getattr(out, name) is None and option.default is not None:
                setattr(out, name, option.default)
        classification = task == "seq-cls"
        if out.lr is None:
            out.lr = tuner.default_lr[1 if classification else 0]
        if out.batch_size is None:
            out.batch_size = 32 if classification else 8 if task == "multiple-choice" else 4
        if out.eval_batch_size is None:
            out.eval_batch_size = 64 if classification else 16
        if out.max_length is None:
            out.max_length = {"sft": 512, "text": 256, "seq-cls": 128, "multiple-choice": 256}[task]
        if task == "multiple-choice":
            from .choice_task import parse_losses

            parse_losses(out.choice_losses)
        if out.max_steps is None and out.epochs is None:
            out.epochs = 1.0
        for name in ("batch_size", "eval_batch_size", "grad_accum", "max_length", "keep_checkpoints"):
            if getattr(out, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(out, name)}")
        if out.max_steps is not None and out.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {out.max_steps}")
        if not 0 < out.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {out.eval_fraction}")
        return out


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int, schedule: str = "cosine") -> float:
    """The learning rate of update ``step`` (0-based): linear warmup to ``peak`` over ``warmup_steps`` updates,
    then ``peak * (1 + cos(pi * p)) / 2`` (cosine), ``peak * (1 - p)`` (linear) or ``peak`` (constant), with
    p = (step - W) / (total - W) going from 0 to 1 over the remaining updates."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "constant":
        return peak
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
