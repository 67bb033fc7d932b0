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
    GLUE_TASKS, LINE, BadRows, chat_sample, chunk_text, conversation_messages, is_conversation,
    load_choices, load_classification, load_glue, read_records, read_utf8,
    tokenize_choices, tokenize_conversations, tokenize_sft,
)
from ..errors import SettingsError
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
    notes: list[str] = field(default_factory=list)  # where the eval split came from, tokenization warnings
    bad_rows: list[BadRows] = field(default_factory=list)  # one per file read: rows skipped and why
    file_labels: list[str] = field(default_factory=list)  # seq-cls: label values as written in the data, id order

    def skipped_rows(self) -> dict[str, int]:
        """Rows skipped as bad, per file read (what summary.json records)."""
        return {bad.path: bad.count for bad in self.bad_rows}

    def bad_row_reports(self) -> list[str]:
        """One line per file with skipped rows: how many, and the first reasons (shown even with --quiet)."""
        return [str(bad) for bad in self.bad_rows if bad.count]


def infer_task(path: str | os.PathLike, records: Sequence[dict[str, Any]] | None = None) -> str:
    """The task a data path implies: a GLUE folder or a table with a label column -> seq-cls; instruction records
    (``instruction`` and ``output``) or conversations (``messages`` / ``conversations``) -> sft; records with ``choices`` -> multiple-choice; a ``.txt`` file or records with only ``text`` -> text."""
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
    if {"instruction", "output"} <= keys or is_conversation(records[0]):
        return "sft"
    if "label" in keys or _guess_label_column(keys):
        return "seq-cls"
    if "text" in keys:
        return "text"
    raise ValueError(
        f"cannot tell the task of {path} from its fields {sorted(keys - {LINE})}: expected instruction/output or messages/conversations (sft), "
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


def _table_spec(path: Path, config: TrainConfig, labels: Sequence[str] | None) -> dict[str, Any]:
    """Which columns of a plain classification file hold the text, the text pair and the label.

    From ``--text-column`` / ``--label-column`` when given, else guessed from the header line. A CSV/TSV whose first
    line names no label column and has two fields is read as ``text<TAB>label`` (or ``label<TAB>text``) without a
    header: the label field is the one whose first value is one of ``labels`` (or an integer when they are unknown).
    """
    rows, _ = read_records(path, on_bad_row="skip")
    if not rows:
        raise ValueError(f"{path}: no usable examples: the file has no data rows")
    keys = [k for k in rows[0] if k != LINE]
    label = config.label_column or _guess_label_column(set(keys))
    columns = None
    if label is None and path.suffix.lower() in (".csv", ".tsv") and len(keys) == 2 and not config.text_column:
        known = set(labels) if labels else None
        is_label = [(v.strip() in known) if known else v.strip().lstrip("-").isdigit() for v in keys]
        if is_label.count(True) == 1:
            columns = ("label", "text") if is_label[0] else ("text", "label")
            keys, label = list(columns), "label"
    if label is None:
        raise ValueError(f"{path}: no label column among {keys}: add a header line (e.g. sentence<TAB>label) or pass "
                         "--label-column (and --text-column)")
    text, pair = (config.text_column, config.text_pair_column) if config.text_column else _guess_text_columns(keys, label)
    return dict(text_column=text, text_pair_column=pair, label_column=label, columns=columns)


def _classification_data(config: TrainConfig, path: Path, tokenizer: Any) -> TaskData:
    notes = []
    if path.is_dir():
        glue = GLUE_TASKS.get(path.name.lower())
        if glue is not None and config.labels is not None and list(config.labels) != list(glue.labels):
            raise SettingsError(f"--labels {','.join(config.labels)}: the GLUE task {path.name} has the labels "
                                f"{','.join(glue.labels)}; drop --labels")
        train = load_glue(path, "train", on_bad_row=config.on_bad_row)
        held = None
        if config.eval_data is None:
            if not (path / "dev.tsv").exists():
                raise FileNotFoundError(f"{path} has no dev.tsv: pass --eval-data")
            held = load_glue(path, "dev", on_bad_row=config.on_bad_row)
            notes.append(f"eval: {path / 'dev.tsv'} ({len(held.records)} examples)")
        spec = dict(text_column=glue.text_column, text_pair_column=glue.text_pair_column, label_column=glue.label_column,
                    columns=glue.columns)
        file_labels = list(glue.labels)
    else:
        spec = _table_spec(path, config, config.labels)
        train = load_classification(path, **spec, labels=config.labels, on_bad_row=config.on_bad_row)
        file_labels, held = list(train.label_names), None
    bad_rows = [train.bad_rows] + ([held.bad_rows] if held is not None else [])
    train_records = train.records
    if config.eval_data is not None:
        eval_spec = spec if path.is_dir() else _table_spec(Path(config.eval_data), config, file_labels)
        held = load_classification(
            config.eval_data, **eval_spec, labels=file_labels, metric=train.metric, on_bad_row=config.on_bad_row
        )
        bad_rows.append(held.bad_rows)
        notes.append(f"eval: {config.eval_data} ({len(held.records)} examples)")
    if held is None:
        train_records, eval_records = _hold_out(train_records, config)
        notes.append(f"eval: {len(eval_records)} examples held out of {path} (never trained on)")
    else:
        eval_records = held.records[: config.max_eval_examples]
    if not train_records:
        raise ValueError(f"{path}: no usable training examples ({train.bad_rows})")
    return TaskData("seq-cls", train_records, eval_records, list(train.label_names), train.metric, notes=notes,
                    bad_rows=bad_rows, file_labels=file_labels)


def _read_instructions(path: str | os.PathLike, config: TrainConfig) -> tuple[list[dict[str, Any]], BadRows]:
    records, bad = read_records(path, text_columns=["instruction", "output"], on_bad_row=config.on_bad_row)
    if not records:
        raise ValueError(f"{path}: no instruction records with non-empty 'instruction' and 'output' ({bad})")
    return records, bad


def _read_conversations(path: str | os.PathLike, config: TrainConfig) -> tuple[list[list[dict[str, str]]], BadRows]:
    """Every conversation of a JSON/JSONL file as OpenAI messages; a malformed one is a bad row (skipped and counted,
    or the error with ``--on-bad-row error``) that names its line and what is wrong."""
    records, bad = read_records(path, on_bad_row=config.on_bad_row)
    conversations = []
    for record in records:
        try:
            conversations.append(conversation_messages(record))
        except ValueError as err:
            bad.reject(record[LINE], None, str(err))
    if not conversations:
        raise ValueError(f"{path}: no usable conversations ({bad})")
    return conversations, bad


def _is_chat_file(path: str | os.PathLike) -> bool:
    if Path(path).suffix.lower() not in (".json", ".jsonl"):
        return False
    records, _ = read_records(path)
    return bool(records) and is_conversation(records[0])


def _sft_data(config: TrainConfig, path: Path, tokenizer: Any) -> TaskData:
    """Instruction records (loss on the response) or conversations (loss on every assistant turn; samples answer
    each held-out conversation's last turn)."""
    chat = _is_chat_file(path)
    read, unit = (_read_conversations, "conversations") if chat else (_read_instructions, "records")
    records, bad = read(path, config)
    notes, bad_rows = [], [bad]
    if config.eval_data is not None:
        eval_records, eval_bad = read(config.eval_data, config)
        eval_records = eval_records[: config.max_eval_examples]
        notes.append(f"eval: {config.eval_data} ({len(eval_records)} {unit})")
        bad_rows.append(eval_bad)
    else:
        records, eval_records = _hold_out(records, config)
        notes.append(f"eval: {len(eval_records)} {unit} held out of {path} (never trained on)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if chat:
            train = tokenize_conversations(records, tokenizer, config.max_length)
            held = tokenize_conversations(eval_records, tokenizer, config.max_length)
            eval_records = [chat_sample(tokenizer, m) for m in eval_records]
        else:
            train = tokenize_sft(records, tokenizer, config.max_length, config.template)
            held = tokenize_sft(eval_records, tokenizer, config.max_length, config.template)
    notes += [str(w.message) for w in caught]
    return TaskData("sft", train, held, eval_records=eval_records, notes=notes, bad_rows=bad_rows)


def _read_choices(path: str | os.PathLike, split: str, config: TrainConfig) -> tuple[list[dict[str, Any]], BadRows]:
    records, bad = load_choices(path, split, on_bad_row=config.on_bad_row)
    if not records:
        raise ValueError(f"{path}: no multiple-choice records ({bad}); see peftkit.data.choices for the format")
    return records, bad


def _choice_data(config: TrainConfig, path: Path, tokenizer: Any) -> TaskData:
    records, bad = _read_choices(path, "train", config)
    notes, bad_rows = [], [bad]
    if config.eval_data is not None or path.is_dir():
        source = config.eval_data if config.eval_data is not None else path
        eval_records, eval_bad = _read_choices(source, "dev", config)
        eval_records = eval_records[: config.max_eval_examples]
        notes.append(f"eval: {source} ({len(eval_records)} questions)")
        bad_rows.append(eval_bad)
    else:
        records, eval_records = _hold_out(records, config)
        notes.append(f"eval: {len(eval_records)} questions held out of {path} (never trained on)")
    return TaskData("multiple-choice", tokenize_choices(records, tokenizer, config.max_length),
                    tokenize_choices(eval_records, tokenizer, config.max_length), metric="accuracy", notes=notes,
                    bad_rows=bad_rows)


def _read_text(path: Path) -> str:
    if path.suffix.lower() == ".txt":
        return read_utf8(path)
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


def load_eval_data(config: TrainConfig, tokenizer: Any, num_labels: int | None = None) -> TaskData:
    """Every example of ``config.data`` as evaluation data (a GLUE folder: its dev split), none held back for
    training; a ValueError when none is usable.

    Classification labels: ``config.labels`` (``--labels``, or the ones a run recorded), else for a classifier of
    ``num_labels`` outputs the integers 0..num_labels-1, else inferred from the file (:func:`peftkit.data.infer_labels`).
    """
    path = Path(config.data)
    if config.task == "seq-cls":
        if path.is_dir():
            data = load_glue(path, "dev", on_bad_row=config.on_bad_row)
            file_labels = list(GLUE_TASKS[path.name.lower()].labels)
        else:
            labels = config.labels or ([str(i) for i in range(num_labels)] if num_labels else None)
            data = load_classification(path, **_table_spec(path, config, labels), labels=labels, on_bad_row=config.on_bad_row)
            file_labels = list(data.label_names)
        if not data.records:
            hint = "" if config.labels else f"; if the file's labels are not {','.join(file_labels)}, name them in class-id order with --labels"
            raise ValueError(f"{path}: no usable examples ({data.bad_rows}){hint}")
        return TaskData("seq-cls", [], data.records, list(data.label_names), data.metric, bad_rows=[data.bad_rows],
                        file_labels=file_labels)
    if config.task == "multiple-choice":
        records, bad = _read_choices(path, "dev", config)
        return TaskData("multiple-choice", [], tokenize_choices(records, tokenizer, config.max_length),
                        metric="accuracy", bad_rows=[bad])
    if config.task == "sft" and _is_chat_file(path):
        conversations, bad = _read_conversations(path, config)
        return TaskData("sft", [], tokenize_conversations(conversations, tokenizer, config.max_length),
                        eval_records=[chat_sample(tokenizer, m) for m in conversations], bad_rows=[bad])
    if config.task == "sft":
        records, bad = _read_instructions(path, config)
        return TaskData("sft", [], tokenize_sft(records, tokenizer, config.max_length, config.template),
                        eval_records=records, bad_rows=[bad])
    chunks = chunk_text(_read_text(path), tokenizer, config.max_length)
    if not chunks:
        raise ValueError(f"{path}: no text to evaluate (it is empty or shorter than a few tokens)")
    return TaskData("text", [], chunks)


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
