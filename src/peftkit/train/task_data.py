"""Training and evaluation examples from a data path: the task it implies, the held-out split, tokenization, and
the seeded order in which micro-batches read them."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data import (
    GLUE_TASKS, LINE, chunk_text, load_choices, load_classification, load_glue, read_records, tokenize_choices, tokenize_sft,
)
from .config import TrainConfig

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
    (``instruction`` and ``output``) -> sft; records with ``choices`` -> multiple-choice; a ``.txt`` file or records with only ``text`` -> text."""
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
    if "choices" in keys:
        return "multiple-choice"
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


def _hold_out(items: list[dict[str, Any]], config: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training items, held-out items): :func:`split_holdout` with the run's eval fraction, seed and eval limit."""
    keep, out = split_holdout(len(items), config.eval_fraction, config.seed, config.max_eval_examples)
    return [items[i] for i in keep], [items[i] for i in out]


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
    loaders = {"seq-cls": _classification_data, "sft": _sft_data, "text": _text_data, "multiple-choice": _choice_data}
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
        train_records, eval_records = _hold_out(train_records, config)
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
        records, eval_records = _hold_out(records, config)
        notes.append(f"eval: {len(eval_records)} records held out of {path} (never trained on)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = tokenize_sft(records, tokenizer, config.max_length, config.template)
        held = tokenize_sft(eval_records, tokenizer, config.max_length, config.template)
    notes += [str(w.message) for w in caught]
    return TaskData("sft", train, held, eval_records=eval_records, notes=notes)


def _read_choices(path: str | os.PathLike, split: str, config: TrainConfig) -> tuple[list[dict[str, Any]], str]:
    records, bad = load_choices(path, split, on_bad_row=config.on_bad_row)
    if not records:
        raise ValueError(f"{path}: no multiple-choice records ({bad}); see peftkit.data.choices for the format")
    return records, str(bad)


def _choice_data(config: TrainConfig, path: Path, tokenizer: Any) -> TaskData:
    records, report = _read_choices(path, "train", config)
    notes = [report]
    if config.eval_data is not None or path.is_dir():
        source = config.eval_data if config.eval_data is not None else path
        eval_records, eval_report = _read_choices(source, "dev", config)
        eval_records = eval_records[: config.max_eval_examples]
        notes.append(f"eval: {source} ({len(eval_records)} questions); {eval_report}")
    else:
        records, eval_records = _hold_out(records, config)
        notes.append(f"eval: {len(eval_records)} questions held out of {path} (never trained on)")
    return TaskData("multiple-choice", tokenize_choices(records, tokenizer, config.max_length),
                    tokenize_choices(eval_records, tokenizer, config.max_length), metric="accuracy", notes=notes)


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
        chunks, held = _hold_out(chunks, config)
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
    if config.task == "multiple-choice":
        records, report = _read_choices(path, "dev", config)
        return TaskData("multiple-choice", [], tokenize_choices(records, tokenizer, config.max_length),
                        metric="accuracy", notes=[report])
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


def example_length(example: dict[str, Any]) -> int:
    """Length of an example for grouping: tokens, or characters for raw classification text."""
    if "prompt_ids" in example:  # multiple choice: the longest row it adds
        return len(example["prompt_ids"]) + max(len(c) for c in example["choice_ids"])
    if "input_ids" in example:
        return len(example["input_ids"])
    return len(example["text"]) + len(example.get("text_pair", ""))
