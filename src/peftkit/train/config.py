"""Run settings: :class:`TrainConfig` and its per-task and per-method defaults, the learning-rate schedule.

The methods ``--method`` names, their options and default learning rates come from the tuners themselves
(:func:`peftkit.tuners.base.tuner_for_method`)."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..distributed import DEFAULT_TIMEOUT, STRATEGIES
from ..errors import SettingsError
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
    ``labels`` (seq-cls, plain files): the label values in class-id order; left out, they are inferred from the
    training file when that is unambiguous (see :func:`peftkit.data.infer_labels`), and the run records them.
    ``device`` (auto, cpu, cuda, cuda:N) and ``dtype`` (auto, float32, bfloat16) say where and in which autocast
    precision the run computes (:mod:`peftkit.device`); ``optim`` is the optimizer (``make_optimizer``: adamw,
    adamw_8bit, paged_adamw_32bit, paged_adamw_8bit).
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
    chat_template: str | None = None  # a Jinja file or built-in name replacing the tokenizer's (peftkit.data.chat)
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    labels: list[str] | None = None  # seq-cls: label values as written in the data, in class-id order
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
    optim: str = "adamw"
    # hardware
    device: str = "auto"
    dtype: str = "auto"
    # several processes (torchrun)
    strategy: str = "ddp"
    dist_timeout: float = DEFAULT_TIMEOUT
    # bookkeeping
    out: str | None = None
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int = 2
    num_samples: int = 3
    report_to: str = "none"  # none, tensorboard, mlflow or trackio (peftkit.train.trackers)
    sample_tokens: int = 64

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a YAML/flags mapping; keys may use dashes (``max-steps``) or underscores."""
        known = {f.name for f in dataclasses.fields(cls)}
        clean = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(clean) - known)
        if unknown:
            raise SettingsError(f"{source}: unknown setting(s) {unknown}; known settings: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        for name, value in clean.items():
            if not fits_type(value, hints[name]):
                raise SettingsError(f"{source}: {name} must be {type_name(hints[name])}, got {value!r}")
        if clean.get("recipe") is not None:
            if clean["recipe"] not in RECIPES:
                raise SettingsError(f"{source}: unknown recipe {clean['recipe']!r}; known: {', '.join(RECIPES)}")
            clean = {**RECIPES[clean["recipe"]], **clean}
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, task: str) -> "TrainConfig":
        """A copy with every default filled in for ``task`` (what the run folder's config.yaml records)."""
        if task not in TASKS:
            raise SettingsError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        tuner = tuner_for_method(self.method)
        if self.schedule not in SCHEDULES:
            raise SettingsError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.strategy not in STRATEGIES:
            raise SettingsError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.on_bad_row not in ("skip", "error"):
            raise SettingsError(f"on_bad_row must be 'skip' or 'error', got {self.on_bad_row!r}")
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
        out.check_ranges()
        return out

    def check_ranges(self) -> None:
        """Raise :class:`SettingsError` naming the first setting whose value makes no sense (see ``RANGES``)."""
        for name, (low, high, low_open, high_open, meaning) in RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value) or value < low or (low_open and value == low) or (
                    high is not None and (value > high or (high_open and value == high))):
                flag = "--" + name.replace("_", "-")
                raise SettingsError(f"{flag} (setting {name}) must be {meaning}, got {value}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            import re

            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise SettingsError(f"target_modules: invalid regular expression {self.target_modules!r}: {err}") from None


# name -> (lowest, highest or None, lowest excluded, highest excluded, what it must be): each number a run takes
RANGES: dict[str, tuple[float, float | None, bool, bool, str]] = {
    "lr": (0, None, True, False, "a positive number"),
    "warmup": (0, None, False, False, ">= 0 (a fraction of the steps if < 1, else steps)"),
    "epochs": (0, None, True, False, "a positive number"),
    "max_steps": (1, None, False, False, "at least 1"),
    "batch_size": (1, None, False, False, "at least 1"),
    "eval_batch_size": (1, None, False, False, "at least 1"),
    "grad_accum": (1, None, False, False, "at least 1"),
    "max_length": (1, None, False, False, "at least 1"),
    "keep_checkpoints": (1, None, False, False, "at least 1"),
    "eval_fraction": (0, 1, True, True, "between 0 and 1, both excluded"),
    "max_eval_examples": (1, None, False, False, "at least 1"),
    "threads": (1, None, False, False, "at least 1"),
    "weight_decay": (0, None, False, False, ">= 0"),
    "max_grad_norm": (0, None, True, False, "a positive number"),
    "dist_timeout": (0, None, True, False, "a positive number of seconds"),
    "eval_every": (0, None, False, False, ">= 0 (0: no evaluation)"),
    "save_every": (0, None, False, False, ">= 0 (0: no checkpoints)"),
    "num_samples": (0, None, False, False, ">= 0"),
    "sample_tokens": (1, None, False, False, "at least 1"),
    "dropout": (0, 1, False, True, "in [0, 1)"),
}

# settings that fix what a run trains (the model, the adapter's shape, the data and its labels): --resume keeps them
RESUME_FIXED = ("model", "method", "task", "data", "eval_data", "eval_fraction", "r", "alpha", "dropout",
                "target_modules", "num_virtual_tokens", "reduction_factor", "method_options", "quantization",
                "max_length", "template", "text_column", "text_pair_column", "label_column", "labels", "on_bad_row",
                "seed")


def resume_conflicts(saved: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """``--flag new (run: old)`` for each override of a ``RESUME_FIXED`` setting that differs from the run's."""
    conflicts = []
    for name in RESUME_FIXED:
        if name in overrides and name in saved and overrides[name] != saved[name]:
            conflicts.append(f"--{name.replace('_', '-')} {overrides[name]} (the run's: {saved[name]})")
    return conflicts


def read_settings_file(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The mapping of settings in a YAML file (``--config``, a run's config.yaml), or one line saying what is wrong."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file" if not path.exists() else f"{what} {path} is a folder, not a YAML file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{what} {path}{where}: invalid YAML ({problem}): fix the file's syntax") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{what} {path}: expected a mapping of settings (key: value lines), got {type(loaded).__name__}")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def fits_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as YAML or a flag gives it) fits a dataclass field's type hint: int, float (an int too),
    str, bool, None, Literal, Any, list / tuple / dict of those and unions. A hint this check does not know passes:
    the config itself decides."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits_type(value, option) for option in args)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and (not args or all(fits_type(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(fits_type(v, args[1]) for v in value.values()))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def type_name(hint: Any) -> str:
    """``hint`` in words, for a message: "an integer or null"."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
             tuple: "a list", dict: "a mapping", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return names.get(typing.get_origin(hint) or hint, str(hint))


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
