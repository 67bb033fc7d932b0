"""The training loop: a frozen model, one trainable adapter, data in, an adapter folder and metrics out.

One optimizer step, with ``G`` = ``grad_accum`` micro-batches and N = the loss items (response tokens, or examples
for classification) over all of them:

    loss  = (1/N) * sum_{g=1..G} sum_{items i in g} l_i          (token-weighted, not a mean of micro-batch means)
    g     = clip(grad loss, max_grad_norm)
    theta = AdamW(theta, g, lr(step))                              (trainable parameters only)
    lr(s) = peak * (s+1)/W for s < W, then cosine (or linear) decay from peak to 0 at the last step

Where the speed comes from: causal-LM batches are packed (the micro-batch's examples concatenated in one row, no
padding) and attention runs causally *within* each packed sequence (:func:`packed_attention`, sum L_i^2 work instead
of (sum L_i)^2 for a masked row); the vocabulary head runs only where the loss counts (``causal_lm_loss``).

Nothing is lost: every ``save_every`` steps a checkpoint (trainable parameters, AdamW state, RNG states, step) is
written atomically, safetensors for tensors and JSON for the rest (never pickle); ``resume`` continues from the
newest readable one and ends with the same adapter as an uninterrupted run. Ctrl-C (or SIGTERM) saves a checkpoint
and stops; a non-finite loss stops without saving, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .data import (
    GLUE_TASKS,
    IGNORE_INDEX,
    LINE,
    ClassificationCollator,
    PackedCollator,
    PaddingCollator,
    chunk_text,
    group_by_length,
    load_classification,
    load_glue,
    pack_examples,
    read_records,
    render_prompt,
    tokenize_sft,
    ungroup,
)
from .distributed import DEFAULT_TIMEOUT, STRATEGIES, Distributed
from .losses import causal_lm_loss

TASKS = ("sft", "seq-cls", "text")
SCHEDULES = ("cosine", "linear", "constant")
ADAPTER_DIR = "adapter"  # the final adapter inside a run folder
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """How ``--method NAME`` maps to a config class (imported only when used) and which options it takes.

    ``options`` maps a TrainConfig field (``r``, ``alpha``, ...) to the config-class field it sets; ``fixed`` are
    config fields the method name itself implies (Houlsby vs Pfeiffer); ``lr`` the default peak learning rate for
    (language modelling, classification).
    """

    module: str
    config_class: str
    options: dict[str, str]
    lr: tuple[float, float]
    fixed: dict[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    "lora": Method("peftkit.tuners.lora", "LoraConfig", {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}, (2e-4, 5e-4)),
    "ia3": Method("peftkit.tuners.ia3", "IA3Config", {}, (3e-3, 5e-3)),
    "houlsby": Method(
        "peftkit.tuners.bottleneck", "BottleneckConfig", {"reduction_factor": "reduction_factor", "dropout": "dropout"},
        (1e-3, 1e-3), {"variant": "houlsby"},
    ),
    "pfeiffer": Method(
        "peftkit.tuners.bottleneck", "BottleneckConfig", {"reduction_factor": "reduction_factor", "dropout": "dropout"},
        (1e-3, 1e-3), {"variant": "pfeiffer"},
    ),
    "prompt": Method("peftkit.tuners.prompt", "PromptTuningConfig", {"num_virtual_tokens": "num_virtual_tokens"}, (3e-2, 3e-2)),
    "prefix": Method("peftkit.tuners.prefix", "PrefixTuningConfig", {"num_virtual_tokens": "num_virtual_tokens"}, (1e-2, 1e-2)),
    "bitfit": Method("peftkit.tuners.selective", "BitFitConfig", {}, (1e-3, 1e-3)),
}

# Defaults for the method options when neither flag nor config file gives them.
OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
    "houlsby": {"reduction_factor": 16},
    "pfeiffer": {"reduction_factor": 16},
    "prompt": {"num_virtual_tokens": 20},
    "prefix": {"num_virtual_tokens": 20},
}

# LoRA targets when none are given: the attention query and value projections (the LoRA paper's choice; HF PEFT's).
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}

METHOD_OPTIONS = ("r", "alpha", "dropout", "num_virtual_tokens", "reduction_factor")


def method_config_class(method: str) -> type:
    """The config class of ``--method``, imported on first use (methods land in their own modules)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    spec = METHODS[method]
    try:
        module = importlib.import_module(spec.module)
        return getattr(module, spec.config_class)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"method {method!r} is not available in this peftkit ({spec.module}.{spec.config_class}: {err})") from None


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
    """

    data: str | None = None
    model: str = "smollm2-135m"
    method: str = "lora"
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
    gradient_checkpointing: bool = False
    # data
    max_length: int | None = None
    group_by_length: bool = True
    template: str = "alpaca"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    on_bad_row: str = "skip"
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
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, task: str) -> "TrainConfig":
        """A copy with every default filled in for ``task`` (what the run folder's config.yaml records)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.on_bad_row not in ("skip", "error"):
            raise ValueError(f"on_bad_row must be 'skip' or 'error', got {self.on_bad_row!r}")
        out = dataclasses.replace(self, task=task, method_options=dict(self.method_options))
        for name, value in OPTION_DEFAULTS.get(self.method, {}).items():
            if getattr(out, name) is None:
                setattr(out, name, value)
        classification = task == "seq-cls"
        if out.lr is None:
            out.lr = METHODS[self.method].lr[1 if classification else 0]
        if out.batch_size is None:
            out.batch_size = 32 if classification else 4
        if out.eval_batch_size is None:
            out.eval_batch_size = 64 if classification else 16
        if out.max_length is None:
            out.max_length = {"sft": 512, "text": 256, "seq-cls": 128}[task]
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


# -------------------------------------------------------------------------------------------------------------- data


@dataclass
class TaskData:
    """Training and evaluation examples of one task, ready for the task's collator.

    sft / text: ``{"input_ids", "labels"}`` token lists; seq-cls: records ``{"text", "text_pair"?, "label"}``.
    ``eval_records`` are the held-out raw instruction records (SFT), for sample generations.
    """

    task: str
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    label_names: list[str] = field(default_factory=list)
    metric: str | None = None  # the classification score that matters: accuracy, f1 or matthews_corrcoef
    eval_records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # bad-row reports, where the eval split came from


def infer_task(path: str | os.PathLike, records: Sequence[dict[str, Any]] | None = None) -> str:
    """The task a data path implies: a GLUE folder or a table with a label column -> seq-cls; instruction records
    (``instruction`` and ``output``) -> sft; a ``.txt`` file or records with only ``text`` -> text."""
    path = Path(path)
    if path.is_dir():
        if (path / "train.tsv").exists():
            return "seq-cls"
        raise ValueError(f"{path} is a folder without train.tsv: pass a data file, or a GLUE task folder")
    if path.suffix.lower() == ".txt":
        return "text"
    if records is None:
        records, _ = read_records(path)
    if not records:
        raise ValueError(f"{path} holds no records")
    keys = set(records[0])
    if {"instruction", "output"} <= keys:
        return "sft"
    if "label" in keys or _guess_label_column(keys):
        return "seq-cls"
    if "text" in keys:
        return "text"
    raise ValueError(
        f"cannot tell the task of {path} from its fields {sorted(keys - {LINE})}: expected instruction/output (sft), "
        "a label column (seq-cls) or text (text). Pass --task, and --text-column/--label-column if needed."
    )


def _guess_label_column(keys: set[str]) -> str | None:
    for name in ("label", "labels", "Quality", "class", "target"):
        if name in keys:
            return name
    return None


def _guess_text_columns(keys: Sequence[str], label: str) -> tuple[str, str | None]:
    keys = [k for k in keys if k not in (label, LINE)]
    for first, second in (("sentence1", "sentence2"), ("text", "text_pair"), ("premise", "hypothesis"), ("question", "sentence")):
        if first in keys and second in keys:
            return first, second
    for name in ("sentence", "text", "content", "review"):
        if name in keys:
            return name, None
    if len(keys) == 1:
        return keys[0], None
    raise ValueError(f"cannot tell which of the columns {keys} holds the text: pass --text-column (and --text-pair-column)")


def split_holdout(count: int, fraction: float, seed: int, limit: int | None = None) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded random ``fraction`` of ``range(count)`` (at least one item, at
    most ``limit``) is held out and never trained on; both lists keep the original order."""
    if count < 2:
        raise ValueError(f"need at least 2 examples to hold some out for evaluation, got {count}; pass --eval-data")
    held = max(1, round(count * fraction))
    if limit is not None:
        held = min(held, limit)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = sorted(order[:held])
    chosen = set(held_out)
    return [i for i in range(count) if i not in chosen], held_out


def resolve_config(config: TrainConfig) -> TrainConfig:
    """``config`` with its task inferred from the data when not given, and every default filled in."""
    if not config.data:
        raise ValueError("no training data: pass --data PATH (a JSON/JSONL/CSV/TSV/text file or a GLUE task folder)")
    if not Path(config.data).exists():
        raise FileNotFoundError(f"--data {config.data}: no such file or folder")
    return config.resolved(config.task or infer_task(config.data))


def load_task_data(config: TrainConfig, tokenizer: Any) -> TaskData:
    """Read, split and tokenize ``config.data`` (and ``config.eval_data``) for ``config.task``; ``config`` must be
    resolved (:func:`resolve_config`)."""
    loaders = {"seq-cls": _classification_data, "sft": _sft_data, "text": _text_data}
    if config.task not in loaders or config.max_length is None:
        raise ValueError("load_task_data needs a resolved config: call resolve_config(config) first")
    return loaders[config.task](config, Path(config.data), tokenizer)


def _classification_data(config: TrainConfig, path: Path, tokenizer: Any) -> TaskData:
    notes = []
    if path.is_dir():
        train = load_glue(path, "train", on_bad_row=config.on_bad_row)
        held = None
        if config.eval_data is None:
            if not (path / "dev.tsv").exists():
                raise FileNotFoundError(f"{path} has no dev.tsv: pass --eval-data")
            held = load_glue(path, "dev", on_bad_row=config.on_bad_row)
            notes.append(f"eval: {path / 'dev.tsv'} ({len(held.records)} examples)")
        glue = GLUE_TASKS[path.name.lower()]
        spec = dict(text_column=glue.text_column, text_pair_column=glue.text_pair_column, label_column=glue.label_column)
        file_labels, columns = list(glue.labels), glue.columns
    else:
        rows, _ = read_records(path, on_bad_row=config.on_bad_row)
        keys = list(rows[0]) if rows else []
        label = config.label_column or _guess_label_column(set(keys))
        if label is None:
            raise ValueError(f"{path}: no label column among {keys}; pass --label-column")
        text, pair = (config.text_column, config.text_pair_column) if config.text_column else _guess_text_columns(keys, label)
        spec = dict(text_column=text, text_pair_column=pair, label_column=label)
        train = load_classification(path, **spec, on_bad_row=config.on_bad_row)
        file_labels, columns, held = list(train.label_names), None, None
    notes.append(str(train.bad_rows))
    train_records = train.records
    if config.eval_data is not None:
        held = load_classification(
            config.eval_data, **spec, labels=file_labels, columns=columns, metric=train.metric, on_bad_row=config.on_bad_row
        )
        notes.append(f"eval: {config.eval_data} ({len(held.records)} examples); {held.bad_rows}")
    if held is None:
        keep, out = split_holdout(len(train_records), config.eval_fraction, config.seed, config.max_eval_examples)
        eval_records = [train_records[i] for i in out]
        train_records = [train_records[i] for i in keep]
        notes.append(f"eval: {len(eval_records)} examples held out of {path} (never trained on)")
    else:
        eval_records = held.records[: config.max_eval_examples]
    if not train_records:
        raise ValueError(f"{path}: no usable training examples ({train.bad_rows})")
    label_names = list(train.label_names)
    return TaskData("seq-cls", train_records, eval_records, label_names, train.metric, notes=notes)


def _read_instructions(path: str | os.PathLike, config: TrainConfig) -> tuple[list[dict[str, Any]], str]:
    records, bad = read_records(path, text_columns=["instruction", "output"], on_bad_row=config.on_bad_row)
    if not records:
        raise ValueError(f"{path}: no instruction records with non-empty 'instruction' and 'output' ({bad})")
    return records, str(bad)


def _sft_data(config: TrainConfig, path: Path, tokenizer: Any) -> TaskData:
    records, report = _read_instructions(path, config)
    notes = [report]
    if config.eval_data is not None:
        eval_records, eval_report = _read_instructions(config.eval_data, config)
        eval_records = eval_records[: config.max_eval_examples]
        notes.append(f"eval: {config.eval_data} ({len(eval_records)} records); {eval_report}")
    else:
        keep, out = split_holdout(len(records), config.eval_fraction, config.seed, config.max_eval_examples)
        eval_records = [records[i] for i in out]
        records = [records[i] for i in keep]
        notes.append(f"eval: {len(eval_records)} records held out of {path} (never trained on)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = tokenize_sft(records, tokenizer, config.max_length, config.template)
        held = tokenize_sft(eval_records, tokenizer, config.max_length, config.template)
    notes += [str(w.message) for w in caught]
    return TaskData("sft", train, held, eval_records=eval_records, notes=notes)


def _read_text(path: Path) -> str:
    if path.suffix.lower() == ".txt":
        return path.read_text(encoding="utf-8-sig")
    records, _ = read_records(path, text_columns=["text"])
    if not records:
        raise ValueError(f"{path}: task 'text' needs a .txt file or records with a 'text' field")
    return "\n\n".join(str(r["text"]) for r in records if str(r.get("text", "")).strip())


def _text_data(config: TrainConfig, path: Path, tokenizer: Any) -> TaskData:
    chunks = chunk_text(_read_text(path), tokenizer, config.max_length)
    notes = []
    if config.eval_data is not None:
        eval_path = Path(config.eval_data)
        held = chunk_text(_read_text(eval_path), tokenizer, config.max_length)[: config.max_eval_examples]
        notes.append(f"eval: {eval_path} ({len(held)} chunks of {config.max_length} tokens)")
    else:
        keep, out = split_holdout(len(chunks), config.eval_fraction, config.seed, config.max_eval_examples)
        held = [chunks[i] for i in out]
        chunks = [chunks[i] for i in keep]
        notes.append(f"eval: {len(held)} chunks of {config.max_length} tokens held out of {path} (never trained on)")
    if not chunks:
        raise ValueError(f"{path}: shorter than one chunk of {config.max_length} tokens; lower --max-length")
    return TaskData("text", chunks, held, notes=notes)


def load_eval_data(config: TrainConfig, tokenizer: Any, label_names: Sequence[str] | None = None) -> TaskData:
    """Every example of ``config.data`` as evaluation data (a GLUE folder: its dev split), none held back for
    training. ``label_names``: the label values in the classifier's order, when the file alone cannot tell."""
    path = Path(config.data)
    if config.task == "seq-cls":
        if path.is_dir():
            data = load_glue(path, "dev", on_bad_row=config.on_bad_row)
        else:
            keys = list(read_records(path)[0][0])
            label = config.label_column or _guess_label_column(set(keys))
            if label is None:
                raise ValueError(f"{path}: no label column among {keys}; pass --label-column")
            text, pair = (config.text_column, config.text_pair_column) if config.text_column else _guess_text_columns(keys, label)
            data = load_classification(path, text_column=text, text_pair_column=pair, label_column=label,
                                       labels=label_names, on_bad_row=config.on_bad_row)
        return TaskData("seq-cls", [], data.records, list(data.label_names), data.metric, notes=[str(data.bad_rows)])
    if config.task == "sft":
        records, report = _read_instructions(path, config)
        return TaskData("sft", [], tokenize_sft(records, tokenizer, config.max_length, config.template),
                        eval_records=records, notes=[report])
    return TaskData("text", [], chunk_text(_read_text(path), tokenizer, config.max_length))


class BatchOrder:
    """Which examples micro-batch ``k`` holds: epoch e = k // per_epoch shuffles with its own seeded generator,
    so the position in the data is just ``k`` (nothing else to save to resume exactly).

    With ``lengths`` (for padded batches), each run of ``MEGABATCH`` x batch_size shuffled examples is sorted by
    length before it is cut into batches, as transformers' ``group_by_length`` does: batches stay random, but
    their examples have similar lengths, so padding to the longest wastes little.
    """

    MEGABATCH = 50

    def __init__(self, num_examples: int, batch_size: int, seed: int, lengths: Sequence[int] | None = None) -> None:
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.lengths = lengths
        self.per_epoch = math.ceil(num_examples / batch_size)
        self._epoch, self._order = -1, []

    def __call__(self, k: int) -> list[int]:
        epoch, index = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
            if self.lengths is not None:
                size = self.MEGABATCH * self.batch_size
                chunks = [order[i : i + size] for i in range(0, len(order), size)]
                order = [i for chunk in chunks for i in sorted(chunk, key=lambda i: -self.lengths[i])]
            self._epoch, self._order = epoch, order
        return self._order[index * self.batch_size : (index + 1) * self.batch_size]


# --------------------------------------------------------------------------------------------------------- attention

PACKED_ATTENTION = "peftkit_packed"


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed sequence of a row, found where ``position_ids`` restart.

    For sequences of lengths L_1..L_n packed in one row, this costs sum_i L_i^2 instead of the (sum_i L_i)^2 of a
    block-diagonal mask, and gives the same result: token t of sequence i attends to tokens of sequence i up to t.
    query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D), as transformers' attention functions return.
    """
    if position_ids is None:
        raise RuntimeError(
            f"{type(module).__name__} did not pass position_ids to its attention function, so packed sequences cannot "
            "be told apart; this model needs the 4-D mask path (peftkit.train falls back to it for such models)"
        )
    positions = position_ids.expand(query.shape[0], -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    gqa = key.shape[1] != query.shape[1]
    rows = []
    for b, row_starts in enumerate(starts):
        bounds = row_starts.nonzero().flatten().tolist() + [query.shape[2]]
        pieces = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling, enable_gqa=gqa,
            )
            for s, e in zip(bounds[:-1], bounds[1:])
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def supports_packed_attention(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers model) dispatches attention through transformers' AttentionInterface."""
    return bool(getattr(model, "_supports_attention_backend", False)) and hasattr(getattr(model, "config", None), "_attn_implementation")


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with attention implementation ``name`` inside the block (restored after)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


# ------------------------------------------------------------------------------------------------------ task runners


class LMTask:
    """Causal-LM loss for sft and text: packed batches, backbone hidden states, head only where labels count.

    Methods that rewrite the inputs (prompt and prefix tuning: their tuner overrides ``prepare_inputs``) cannot
    see packed rows as separate sequences, so they get right-padded batches through the PeftModel's own forward
    and the loss on its full logits (the last L positions: virtual tokens come first).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int) -> None:
        from .peft_model import PeftModel
        from .tuners.base import Tuner, tuner_for

        self.model = model  # a PeftModel, or a plain transformers model (evaluating the base)
        self.hf_model = model.base_model if isinstance(model, PeftModel) else model
        self.max_length = max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.padding = PaddingCollator(pad)
        self.rewrites_inputs = isinstance(model, PeftModel) and any(
            type(tuner_for(model.peft_config[name])).prepare_inputs is not Tuner.prepare_inputs for name in model.active_adapters
        )
        self.varlen = not self.rewrites_inputs and supports_packed_attention(self.hf_model)
        dtype = next(p for p in self.hf_model.parameters() if p.is_floating_point()).dtype
        self.packing = PackedCollator(pad, mask_dtype=dtype)
        if self.varlen:
            _register_packed_attention()
        self.mode = "padded" if self.rewrites_inputs else ("packed" if self.varlen else "packed-mask")

    def collate(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if self.rewrites_inputs:
            return self.padding(examples)
        # one row per micro-batch when attention is per sequence (no padding at all); rows of max_length otherwise
        length = sum(len(e["input_ids"]) for e in examples) if self.varlen else self.max_length
        return self.packing(pack_examples(examples, length))

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        if self.rewrites_inputs:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return causal_lm_loss(logits[:, -labels.shape[1] :], nn.Identity(), labels, reduction="sum")
        backbone = self.hf_model.base_model  # transformers' backbone: LlamaModel inside LlamaForCausalLM, ...
        head = self.hf_model.get_output_embeddings()
        if self.varlen:
            with attention_implementation(self.hf_model, PACKED_ATTENTION):
                hidden = backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        else:
            hidden = backbone(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        return causal_lm_loss(hidden, head, labels, reduction="sum")

    @torch.no_grad()
    def evaluate(self, examples: Sequence[dict[str, list[int]]], batch_size: int) -> dict[str, float]:
        """Mean next-token loss over every scored token of ``examples``."""
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            batch = self.collate(examples[start : start + batch_size])
            total += float(self.loss_sum(batch))
            count += self.count(batch)
        return {"loss": total / max(count, 1), "tokens": count}


class ClassificationTask:
    """Sequence classification: cross-entropy on the classifier's logits; evaluation adds accuracy, F1, MCC."""

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.collator = ClassificationCollator(tokenizer, max_length)
        self.mode = "padded"

    def collate(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.collator(records)

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_real_tokens")}
        return self.model(**inputs).logits

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(batch), batch["labels"], reduction="sum")

    @torch.no_grad()
    def evaluate(self, records: Sequence[dict[str, Any]], batch_size: int) -> dict[str, float]:
        """Loss and scores over ``records``, batched by length (little padding), reported in the original order."""
        pairs = [r["text_pair"] for r in records] if records and "text_pair" in records[0] else None
        lengths = [len(ids) for ids in self.tokenizer([r["text"] for r in records], pairs, truncation=True, max_length=self.collator.max_length)["input_ids"]]
        batches = group_by_length(lengths, batch_size)
        total, predictions = 0.0, []
        for indices in batches:
            batch = self.collate([records[i] for i in indices])
            logits = self.logits(batch)
            total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            predictions.append(logits.argmax(-1).tolist())
        predicted = ungroup(batches, predictions)
        scores = classification_metrics(predicted, [r["label"] for r in records])
        return {"loss": total / max(len(records), 1), **scores}


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy, F1 and Matthews correlation of predicted vs true class ids.

    F1 is of class 1 for two classes (GLUE's MRPC score), the unweighted mean over classes otherwise.
    MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)) with c correct, s total, p_k / t_k
    the predicted / true counts of class k (Gorodkin's multi-class form; the usual formula for two classes); 0 when
    a factor of the denominator is 0.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    total = len(labels)
    if total == 0:
        return {"accuracy": 0.0, "f1": 0.0, "matthews_corrcoef": 0.0}
    classes = sorted(set(labels) | set(predictions) | {0, 1})
    correct = sum(p == t for p, t in zip(predictions, labels))
    predicted_count = {k: sum(p == k for p in predictions) for k in classes}
    true_count = {k: sum(t == k for t in labels) for k in classes}

    def f1(k: int) -> float:
        tp = sum(p == k and t == k for p, t in zip(predictions, labels))
        denominator = predicted_count[k] + true_count[k]
        return 2 * tp / denominator if denominator else 0.0

    f1_score = f1(1) if len(classes) == 2 else sum(f1(k) for k in classes) / len(classes)
    numerator = correct * total - sum(predicted_count[k] * true_count[k] for k in classes)
    denominator = math.sqrt(
        (total**2 - sum(v**2 for v in predicted_count.values())) * (total**2 - sum(v**2 for v in true_count.values()))
    )
    return {
        "accuracy": correct / total,
        "f1": f1_score,
        "matthews_corrcoef": numerator / denominator if denominator else 0.0,
    }


def make_task(model: nn.Module, tokenizer: Any, config: TrainConfig) -> LMTask | ClassificationTask:
    """The loss/evaluation runner for ``config.task``."""
    if config.task == "seq-cls":
        return ClassificationTask(model, tokenizer, config.max_length)
    return LMTask(model, tokenizer, config.max_length)


# ------------------------------------------------------------------------------------------------------------ models


def build_peft_config(config: TrainConfig, model: nn.Module) -> Any:
    """The method's config from the run settings: its options, its fixed fields, default LoRA targets, task type."""
    cls = method_config_class(config.method)
    spec = METHODS[config.method]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = dict(spec.fixed)
    for option in METHOD_OPTIONS:
        value = getattr(config, option)
        if value is None:
            continue
        if option not in spec.options:
            raise ValueError(
                f"--{option.replace('_', '-')} does not apply to method {config.method!r} "
                f"(it takes: {', '.join('--' + o.replace('_', '-') for o in spec.options) or 'no extra options'})"
            )
        kwargs[spec.options[option]] = value
    if config.target_modules is not None:
        kwargs["target_modules"] = config.target_modules
    elif config.method == "lora":
        model_type = getattr(model.config, "model_type", None)
        if model_type not in LORA_TARGETS:
            from .tuners.base import describe_targets

            raise ValueError(
                f"no default LoRA targets for model type {model_type!r}: pass --target-modules (e.g. q_proj,v_proj "
                f"or all-linear). Modules that can be targeted:\n{describe_targets(model)}"
            )
        kwargs["target_modules"] = list(LORA_TARGETS[model_type])
    kwargs.update(config.method_options)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields: {', '.join(sorted(fields))}")
    kwargs["task_type"] = "SEQ_CLS" if config.task == "seq-cls" else "CAUSAL_LM"
    return cls(**kwargs)


def load_base_model(config: TrainConfig, num_labels: int | None = None) -> tuple[nn.Module, Any]:
    """The frozen base model for ``config.task`` (4-bit when ``config.quantization`` is set)."""
    from .models import load_model

    task = "seq-cls" if config.task == "seq-cls" else "causal-lm"
    kwargs: dict[str, Any] = {}
    if config.quantization:
        kwargs["quantization"] = config.quantization
    try:
        model, tokenizer = load_model(config.model, task=task, num_labels=num_labels, **kwargs)
    except TypeError as err:
        if config.quantization and "quantization" in str(err):
            raise ValueError(f"--quantization {config.quantization}: this peftkit's load_model has no 4-bit path") from None
        raise
    if config.quantization:
        from .quant import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------- checkpoints


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    directory: str | os.PathLike, peft_model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    dist: Distributed | None = None,
) -> None:
    """Write a checkpoint folder atomically: built under a temporary name, then renamed into place.

    ``adapter/`` is a usable adapter folder; ``training_state.safetensors`` holds the trainable parameters (by name,
    so every method resumes exactly), AdamW's moment tensors and the torch RNG state; ``trainer_state.json`` the
    step, the optimizer's hyperparameters, the Python RNG state and ``state``. Nothing is pickled.

    Under torchrun (``dist``), every rank calls this: sharded tensors are gathered whole, each rank's RNG state is
    kept (``rng.torch.rank<r>``), and rank 0 alone writes, so the files do not depend on the strategy.
    """
    dist = dist or Distributed()
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.save_pretrained(peft_model, tmp / ADAPTER_DIR)
    names = list(trainable_parameters(peft_model))
    saved = optimizer.state_dict()
    tensors = dist.full({f"param.{n}": p for n, p in trainable_parameters(peft_model).items()})
    extra_state: dict[str, dict[str, Any]] = {}
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                extra_state.setdefault(str(index), {})[key] = value
    tensors = dist.full(tensors)
    rng_states = dist.rng_states()
    if not dist.is_main:
        return
    tensors["rng.torch"] = rng_states[0]
    if dist.enabled:
        tensors.update({f"rng.torch.rank{r}": s for r, s in enumerate(rng_states)})
    checkpoint.save_tensors(tmp / "training_state.safetensors", tensors)
    python_rng = random.getstate()
    checkpoint.save_json(
        tmp / "trainer_state.json",
        {
            **state,
            "parameter_names": names,
            "optimizer_param_groups": saved["param_groups"],
            "optimizer_extra_state": extra_state,
            "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
        },
    )
    if directory.exists():  # the same step saved again after a resume: swap, never leave neither in place
        old = directory.with_name(f".old-{directory.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    _fsync_dir(directory.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    directory: str | os.PathLike, peft_model: nn.Module, optimizer: torch.optim.Optimizer, dist: Distributed | None = None
) -> dict[str, Any]:
    """Restore parameters, optimizer and RNG states from ``directory``; returns its ``trainer_state.json``.

    Under torchrun every rank reads the whole files and keeps its own shard (FSDP) and its own RNG state, so a
    checkpoint resumes under either strategy.
    """
    dist = dist or Distributed()
    directory = Path(directory)
    try:
        state = json.loads((directory / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{directory}: unreadable trainer_state.json ({err})") from None
    tensors = checkpoint.load_tensors(directory / "training_state.safetensors")
    params = trainable_parameters(peft_model)
    if state["parameter_names"] != list(params):
        raise ValueError(
            f"{directory} was saved for other trainable parameters ({len(state['parameter_names'])} vs {len(params)}): "
            "was the run's model or method changed?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(dist.like(tensors[f"param.{name}"], p))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, entry = key.split(".", 2)
            param = ordered[int(index)]
            if value.shape == param.shape:  # moments are laid out as their parameter; the step count is a scalar
                value = dist.like(value, param)
            optimizer_state.setdefault(int(index), {})[entry] = value
    for index, entries in state["optimizer_extra_state"].items():
        optimizer_state.setdefault(int(index), {}).update(entries)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in state["optimizer_param_groups"]]
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": groups})
    torch.set_rng_state(tensors.get(f"rng.torch.rank{dist.rank}", tensors["rng.torch"]))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state


def _length(example: dict[str, Any]) -> int:
    """Length of an example for grouping: tokens, or characters for raw classification text."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return len(example["text"]) + len(example.get("text_pair", ""))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


# ----------------------------------------------------------------------------------------------------------- the run


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C: a checkpoint was saved, ``peftkit train --resume`` continues."""


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path | None
    steps: int
    total_steps: int
    train_loss: float | None
    eval_initial: dict[str, float]
    eval_final: dict[str, float]
    tokens_per_second: float
    train_seconds: float
    trainable_parameters: int
    total_parameters: int
    mode: str


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{method}"


class TrainingRun:
    """One run: build everything from a config, train, evaluate, checkpoint, write the run folder.

    ``TrainingRun(config).fit()`` trains; ``TrainingRun.resume(run_dir).fit()`` continues a run from its newest
    checkpoint (settings from its ``config.yaml``, updated by ``overrides``). Under torchrun every rank builds the
    same run (see :mod:`peftkit.distributed`): each trains on its share of every batch, rank 0 writes and prints.
    """

    def __init__(self, config: TrainConfig, run_dir: str | os.PathLike | None = None, progress: bool = True, _resuming: bool = False) -> None:
        self.run_dir = Path(run_dir or config.out or default_run_dir(config.method))
        if not _resuming and (self.run_dir / CONFIG_FILE).exists():
            raise FileExistsError(f"{self.run_dir} already holds a run: continue it with --resume {self.run_dir}, or pick another --out")
        if config.threads:  # process-wide: on a shared machine fewer threads than cores can be much faster
            torch.set_num_threads(config.threads)
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.config = resolve_config(config)
        self.dist = Distributed.setup(self.config.strategy, self.config.dist_timeout)
        self.progress = progress and self.dist.is_main
        self.config.out = str(self.run_dir)
        if self.config.task == "seq-cls":  # the label set decides the classifier's size; tokenizing waits for batches
            self.data = load_task_data(self.config, tokenizer=None)
            model, self.tokenizer = load_base_model(self.config, num_labels=len(self.data.label_names))
        else:
            model, self.tokenizer = load_base_model(self.config)
            self.data = load_task_data(self.config, self.tokenizer)
        from .peft_model import get_peft_model

        torch.manual_seed(self.config.seed)  # the adapter's initial values depend on the seed only
        peft_config = build_peft_config(self.config, model)
        if self.config.target_modules is None:  # record the default targets the method chose
            self.config.target_modules = getattr(peft_config, "target_modules", None)
        self.model = get_peft_model(model, peft_config)
        self.model.train()
        if self.dist.rank:  # its own dropout masks; rank 0 keeps the single-process random stream
            torch.manual_seed(self.config.seed + self.dist.rank)
        # every use of the model in training goes through the runner, so DDP / FSDP hooks run around it
        self.runner = self.dist.wrap(self.model)
        self.task = make_task(self.model, self.tokenizer, self.config)
        if not self.data.eval and self.config.eval_every != 0:
            raise ValueError(f"no evaluation examples ({'; '.join(self.data.notes)}): fix --eval-data, or pass --eval-every 0")
        self.params = list(trainable_parameters(self.model).values())
        if not self.params:
            raise ValueError(f"method {self.config.method!r} left no trainable parameter in {self.config.model}")
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        lengths = None
        if self.task.mode == "padded" and self.config.group_by_length:
            lengths = [_length(e) for e in self.data.train]
        # one global batch of world * batch_size examples per micro-batch, as one process would read it
        self.order = BatchOrder(len(self.data.train), self.config.batch_size * self.dist.world_size, self.config.seed, lengths)
        c = self.config
        self.total_steps = c.max_steps or max(1, math.ceil(c.epochs * self.order.per_epoch / c.grad_accum))
        self.warmup_steps = int(c.warmup * self.total_steps) if c.warmup < 1 else int(c.warmup)
        # 0 turns evaluation (or checkpointing) off; None picks 4 evaluations per run, a checkpoint every <= 50 steps
        self.eval_every = c.eval_every if c.eval_every is not None else max(1, math.ceil(self.total_steps / 4))
        self.save_every = c.save_every if c.save_every is not None else min(50, self.eval_every or 50)
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.eval_initial: dict[str, float] = {}
        self.eval_last: dict[str, float] = {}
        self.last_loss: float | None = None
        self._stop_requested = False  # set by the signal handler, on this process
        self._stop_agreed = False  # set after each step from every process's request: all stop at the same step
        self.dist.barrier()  # no rank writes into the run folder before every rank has checked it

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None, progress: bool = True) -> "TrainingRun":
        run_dir = Path(run_dir)
        path = run_dir / CONFIG_FILE
        if not path.exists():
            raise FileNotFoundError(f"--resume {run_dir}: no {CONFIG_FILE} there; is it a peftkit run folder?")
        import yaml

        saved = yaml.safe_load(path.read_text()) or {}
        config = TrainConfig.from_dict({**saved, **(overrides or {}), "out": str(run_dir)}, source=str(path))
        run = cls(config, run_dir, progress=progress, _resuming=True)
        run._restore()
        run.dist.check_same("the step to resume from", run.step, f"every process must read the same run folder "
                            f"{run_dir}: on several machines, put it on a file system they all share")
        if run.step >= run.total_steps and (run_dir / "summary.json").exists():  # written last, at the very end
            raise ValueError(
                f"{run_dir} finished all {run.total_steps} steps; to train further pass a larger --max-steps "
                "(or --epochs) with --resume"
            )
        return run

    # ----------------------------------------------------------------------------------------------------- state

    def _restore(self) -> None:
        for directory in reversed(list_checkpoints(self.run_dir)):
            try:
                state = load_checkpoint(directory, self.model, self.optimizer, self.dist)
            except (ValueError, KeyError, FileNotFoundError, OSError) as err:
                self._say(f"skipping unreadable checkpoint {directory}: {err}")
                continue
            self.step = state["step"]
            self.tokens = state["tokens"]
            self.train_seconds = state["train_seconds"]
            self.eval_initial = state.get("eval_initial", {})
            self.eval_last = state.get("eval_last", {})
            self.last_loss = state.get("last_loss")
            self._truncate_metrics(self.step)
            saved_world = state.get("world_size", 1)
            if saved_world != self.dist.world_size:
                self._say(f"note: this run was saved by {saved_world} process(es) and continues on {self.dist.world_size}: "
                          f"a step now reads {self.dist.world_size * self.config.batch_size} examples instead of "
                          f"{saved_world * self.config.batch_size}")
            self._say(f"resuming {self.run_dir} from {directory.name} (step {self.step} of {self.total_steps})")
            return
        self._say(f"no checkpoint in {self.run_dir}: starting it from the beginning")
        self._truncate_metrics(-1)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines a killed run wrote after its last checkpoint (they are written again)."""
        path = self.run_dir / METRICS_FILE
        if not self.dist.is_main or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "micro_batch": self.step * self.config.grad_accum,
            "lr_schedule": {"step": self.step, "total": self.total_steps, "warmup": self.warmup_steps, "kind": self.config.schedule},
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "eval_initial": self.eval_initial,
            "eval_last": self.eval_last,
            "last_loss": self.last_loss,
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self) -> Path:
        directory = self.run_dir / CHECKPOINTS_DIR / f"step-{self.step:06d}"
        save_checkpoint(directory, self.model, self.optimizer, self._state(), self.dist)
        if self.dist.is_main:
            for old in list_checkpoints(self.run_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()  # the checkpoint is complete on disk before any rank goes on
        return directory

    # ------------------------------------------------------------------------------------------------------ output

    def _say(self, message: str) -> None:
        if self.progress:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _write_config(self) -> None:
        if not self.dist.is_main:
            return
        import yaml

        text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        checkpoint.atomic_write(self.run_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))

    def evaluate(self) -> dict[str, float]:
        """Scores on the whole evaluation split (every rank computes the same ones)."""
        self.model.eval()
        try:
            return self._no_grad(self.task.evaluate, self.data.eval, self.config.eval_batch_size)
        finally:
            self.model.train()

    def _no_grad(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` without gradients, through the runner (FSDP gathers the sharded weights around it)."""
        with torch.no_grad():
            return self.runner(fn, *args)

    def _eval_and_log(self) -> dict[str, float]:
        start = time.perf_counter()
        scores = self.evaluate()
        self._log({"type": "eval", "step": self.step, **scores})
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "tokens")
        self._say(f"eval step {self.step}: {shown} ({time.perf_counter() - start:.1f} s)")
        return scores

    # ------------------------------------------------------------------------------------------------ training

    def _micro_batches(self) -> list[tuple[dict[str, torch.Tensor], float]]:
        """This step's micro-batches on this rank, each with a weight: 1, or 0 for a stand-in example that keeps
        the ranks in step when a short last batch of an epoch leaves this rank nothing."""
        first = self.step * self.config.grad_accum
        batches = []
        for k in range(first, first + self.config.grad_accum):
            indices = self.order(k)
            mine = self.dist.shard(indices)
            batches.append((self.task.collate([self.data.train[i] for i in mine or indices[:1]]), 1.0 if mine else 0.0))
        return batches

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer update; returns (loss, gradient norm, useful tokens), over all ranks."""
        lr = learning_rate(self.step, self.total_steps, self.config.lr, self.warmup_steps, self.config.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self._micro_batches()
        world = self.dist.world_size
        count, tokens = self.dist.sum([
            sum(self.task.count(b) * w for b, w in batches), sum(int(b["num_real_tokens"]) * w for b, w in batches)
        ])
        # DDP / FSDP average gradients over ranks: dividing by count / world makes the average (1/count) sum
        total = 0.0
        for i, (batch, weight) in enumerate(batches):
            with self.dist.gradient_sync(self.runner, sync=i == len(batches) - 1):
                loss = self.runner(self.task.loss_sum, batch) * weight / (max(count, 1) / world)
                loss.backward()
            total += float(loss.detach()) / world
        # checked after the sum over ranks, so that every rank stops at the same step
        total, stop = self.dist.sum([total, float(self._stop_requested)])
        self._stop_agreed = stop > 0  # a signal to any rank stops all of them after this step
        if not math.isfinite(total):
            raise NonFiniteLossError(f"the loss became {total} at step {self.step + 1}")
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        norm = float(self.dist.full({"norm": norm})["norm"])
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"the gradient norm became {norm} at step {self.step + 1}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total, norm, int(tokens)

    def fit(self) -> TrainResult:
        """Train to the last step; write the adapter, metrics, plot, samples and summary into the run folder."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        trainable, total = self.model.get_nb_trainable_parameters()
        self._say(
            f"peftkit train: {self.config.method} on {self.config.model}, task {self.data.task}, "
            f"{len(self.data.train)} training / {len(self.data.eval)} eval examples, {self.total_steps} steps, "
            f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%), run folder {self.run_dir}"
        )
        for note in self.data.notes:
            self._say(f"  {note}")
        samples_before = self._samples_before()
        if self.step == 0 and self.eval_every:
            self.eval_initial = self.eval_last = self._eval_and_log()
        with self._stop_signals_save():
            self._loop()
        return self._finish(samples_before, trainable, total)

    def _loop(self) -> None:
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not self.progress, dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                start = time.perf_counter()
                try:
                    loss, norm, tokens = self.train_step()
                except NonFiniteLossError as err:
                    kept = list_checkpoints(self.run_dir)
                    where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was saved before it"
                    raise NonFiniteLossError(
                        f"{err}: stopping. {where}. Lower --lr (now {self.config.lr:g}) or check the data, then "
                        f"resume with: peftkit train --resume {self.run_dir} --lr <lower>"
                    ) from None
                elapsed = time.perf_counter() - start
                self.train_seconds += elapsed
                self.tokens += tokens
                self.last_loss = loss
                lr = self.optimizer.param_groups[0]["lr"]
                self._log({"type": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                           "tokens": tokens, "tokens_per_s": tokens / elapsed, "seconds": elapsed})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens / self.train_seconds:.0f}")
                if self.eval_every and (self.step % self.eval_every == 0 or self.step == self.total_steps):
                    self.eval_last = self._eval_and_log()
                if self._stop_agreed:
                    saved = self.save_checkpoint()
                    raise TrainingInterrupted(
                        f"interrupted at step {self.step}: checkpoint {saved} saved. "
                        f"Continue with: peftkit train --resume {self.run_dir}"
                    )
                if self.save_every and (self.step % self.save_every == 0 or self.step == self.total_steps):
                    self.save_checkpoint()  # the last step too: --resume with a larger --max-steps continues from it
        finally:
            bar.close()

    @contextmanager
    def _stop_signals_save(self) -> Iterator[None]:
        """First Ctrl-C (or SIGTERM, what job schedulers send before killing): finish the current step, save a
        checkpoint, stop. A second one stops at once, unsaved."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self._say(f"{name}: saving a checkpoint after this step (send it again to stop at once, unsaved)")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ------------------------------------------------------------------------------------------------- samples

    def _samples_before(self) -> list[dict[str, str]]:
        """Generations of the base model for a few held-out prompts (saved, so a resumed run reuses them)."""
        if self.data.task != "sft" or not self.config.num_samples:
            return []
        path = self.run_dir / "samples_before.json"
        if path.exists():
            return json.loads(path.read_text())["samples"]
        with self.model.disable_adapter():
            samples = self._generate_samples()
        if self.dist.is_main:
            checkpoint.save_json(path, {"samples": samples})
        return samples

    def _generate_samples(self) -> list[dict[str, str]]:
        records = self.data.eval_records[: self.config.num_samples]
        prompts = [render_prompt(r, self.config.template, self.tokenizer) for r in records]
        outputs = self._no_grad(generate_texts, self.model, self.tokenizer, prompts, self.config.sample_tokens)
        return [{"prompt": p, "reference": r["output"], "output": o} for p, r, o in zip(prompts, records, outputs)]

    # -------------------------------------------------------------------------------------------------- finish

    def _finish(self, samples_before: list[dict[str, str]], trainable: int, total: int) -> TrainResult:
        adapter_dir = self.run_dir / ADAPTER_DIR
        self.dist.save_pretrained(self.model, adapter_dir)
        after = self._generate_samples() if samples_before else []
        result = TrainResult(
            run_dir=self.run_dir,
            adapter_dir=adapter_dir,
            steps=self.step,
            total_steps=self.total_steps,
            train_loss=self.last_loss,
            eval_initial=self.eval_initial,
            eval_final=self.eval_last,
            tokens_per_second=self.tokens / self.train_seconds if self.train_seconds else 0.0,
            train_seconds=self.train_seconds,
            trainable_parameters=trainable,
            total_parameters=total,
            mode=self.task.mode,
        )
        if self.dist.is_main:
            if after:
                write_samples(self.run_dir / "samples.md", samples_before, after)
            from .plots import plot_metrics

            plot_metrics(read_metrics(self.run_dir / METRICS_FILE), self.run_dir / "metrics.png", self.data.metric)
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
            checkpoint.save_json(self.run_dir / "summary.json", summary)
        self.dist.barrier()  # the run folder is complete when any rank returns
        return result


@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate_texts(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, adapter_names: list[str] | None = None
) -> list[str]:
    """Greedy continuations of ``prompts`` in one left-padded batch (``adapter_names``: one adapter per prompt)."""
    was_training = model.training
    model.eval()
    try:
        with _left_padding(tokenizer):
            inputs = tokenizer(list(prompts), return_tensors="pt", padding=True)
        kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
        out = model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs,
        )
        return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)


def write_samples(path: str | os.PathLike, before: Sequence[dict[str, str]], after: Sequence[dict[str, str]]) -> None:
    """A markdown file: per held-out prompt, the base model's and the fine-tuned model's answers side by side."""

    def cell(text: str) -> str:
        return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"

    lines = ["# Sample generations: before and after training", "",
             "Greedy decoding on held-out prompts (never trained on).", ""]
    for i, (b, a) in enumerate(zip(before, after), start=1):
        lines += [f"## Sample {i}", "", "```text", b["prompt"].strip(), "```", "",
                  "| before training (base model) | after training | reference |", "|---|---|---|",
                  f"| {cell(b['output'])} | {cell(a['output'])} | {cell(b['reference'])} |", ""]
    text = "\n".join(lines)
    checkpoint.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_table(result: TrainResult, metric: str | None = None) -> str:
    """The end-of-run table a person reads."""

    def fmt(scores: dict[str, float], key: str) -> str:
        return f"{scores[key]:.4f}" if key in scores else "-"

    rows = [
        ("run folder", str(result.run_dir)),
        ("steps", f"{result.steps} / {result.total_steps}"),
        ("train time", _duration(result.train_seconds)),
        ("useful tokens/s", f"{result.tokens_per_second:.1f} ({result.mode} batches)"),
        ("trainable params", f"{result.trainable_parameters:,} of {result.total_parameters:,} "
                             f"({100 * result.trainable_parameters / max(result.total_parameters, 1):.3f}%)"),
        ("last train loss", f"{result.train_loss:.4f}" if result.train_loss is not None else "-"),
        ("eval loss", f"{fmt(result.eval_initial, 'loss')} -> {fmt(result.eval_final, 'loss')}"),
    ]
    for key in ("accuracy", "f1", "matthews_corrcoef"):
        if key in result.eval_final:
            mark = "  <- this task's score" if key == metric else ""
            rows.append((key, f"{fmt(result.eval_initial, key)} -> {fmt(result.eval_final, key)}{mark}"))
    rows.append(("adapter", str(result.adapter_dir)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a new run (Python entry point of ``peftkit train``)."""
    return TrainingRun(config, progress=progress).fit()


def resume(run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None, progress: bool = True) -> TrainResult:
    """Continue a run from its newest checkpoint (``peftkit train --resume RUN_DIR``)."""
    return TrainingRun.resume(run_dir, overrides, progress).fit()


def find_adapter(path: str | os.PathLike) -> tuple[Path, TrainConfig | None]:
    """(adapter folder, the run's config if ``path`` is, or is inside, a run folder) for an adapter or run folder."""
    path = Path(path)
    if (path / checkpoint.CONFIG_NAME).exists():
        run = path.parent if (path.parent / CONFIG_FILE).exists() else None
        adapter = path
    elif (path / ADAPTER_DIR / checkpoint.CONFIG_NAME).exists():
        run, adapter = path, path / ADAPTER_DIR
    else:
        raise FileNotFoundError(f"{path} is neither an adapter folder (adapter_config.json) nor a peftkit run folder")
    if run is None:
        return adapter, None
    import yaml

    return adapter, TrainConfig.from_dict(yaml.safe_load((run / CONFIG_FILE).read_text()), source=str(run / CONFIG_FILE))


def adapter_task(adapter_dir: str | os.PathLike) -> tuple[str | None, int | None]:
    """("seq-cls" or None, number of classes) from an adapter folder's task type and classifier weights."""
    config = checkpoint.read_config(adapter_dir)
    if config.task_type != "SEQ_CLS":
        return None, None
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / checkpoint.WEIGHTS_NAME), "pt") as f:
        for key in f.keys():
            if key.endswith((".classifier.weight", ".score.weight", ".out_proj.weight")):
                return "seq-cls", f.get_slice(key).get_shape()[0]
    return "seq-cls", None


def evaluate_adapter(
    adapter: str | os.PathLike | None = None,
    data: str | None = None,
    model: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, float], TrainConfig, TaskData]:
    """Metrics of ``model`` (+ ``adapter``, an adapter or run folder) on ``data`` (``peftkit eval``).

    With a run folder and no ``data``, the run's own evaluation split is used (the held-out slice it never trained
    on, or the GLUE dev split). The model defaults to the run's, else the adapter's base model.
    """
    from .peft_model import PeftModel

    adapter_dir, run_config = find_adapter(adapter) if adapter is not None else (None, None)
    task, num_labels = adapter_task(adapter_dir) if adapter_dir is not None else (None, None)
    settings: dict[str, Any] = run_config.to_dict() if run_config is not None else {}
    settings.pop("out", None)
    if model is not None:
        settings["model"] = model
    elif "model" not in settings and adapter_dir is not None:
        base = checkpoint.read_config(adapter_dir).base_model_name_or_path
        if base:
            settings["model"] = base
    if task:
        settings["task"] = task
    settings.update(overrides or {})
    if data is not None:
        settings["data"] = data
    config = resolve_config(TrainConfig.from_dict(settings))
    held_out = data is None and run_config is not None
    if config.task == "seq-cls":
        labels = None
        if held_out:
            evaluation = load_task_data(config, None)
        else:
            labels = run_config and load_task_data(run_config.resolved("seq-cls"), None).label_names
            evaluation = load_eval_data(config, None, labels)
        base, tokenizer = load_base_model(config, num_labels=num_labels or len(evaluation.label_names))
    else:
        base, tokenizer = load_base_model(config)
        evaluation = load_task_data(config, tokenizer) if held_out else load_eval_data(config, tokenizer)
    network = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir is not None else base
    network.eval()
    scores = make_task(network, tokenizer, config).evaluate(evaluation.eval, config.eval_batch_size)
    return scores, config, evaluation
