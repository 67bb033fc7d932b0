"""Data: readers, prompt templates, tokenization, packing and collators.

Records and examples are plain lists of dicts; collators turn a list of examples into a dict of tensors.
Labels follow the Hugging Face convention: ``labels`` is aligned with ``input_ids`` (not shifted) and
``IGNORE_INDEX`` (-100) marks positions without loss; the loss shifts by one (see ``peftkit.losses``).

Every collator also returns ``num_real_tokens`` (a 0-d tensor: tokens that are not padding), so that the trainer can
report useful tokens per second and ``padding_fraction(batch)``.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from bisect import bisect_left, insort
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

IGNORE_INDEX = -100
LINE = "_line"  # every record keeps its source line (1-based) under this key; for a JSON list, its index (0-based)

OnBadRow = Literal["skip", "error"]
Template = Literal["alpaca", "chat"]
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------- readers


@dataclass
class BadRows:
    """Rows rejected while reading one file: how many, and the first ``MAX_MESSAGES`` reasons."""

    path: str
    on_bad_row: OnBadRow = "skip"
    unit: str = "line"  # "index" for a JSON list
    count: int = 0
    messages: list[str] = field(default_factory=list)

    MAX_MESSAGES = 5

    def reject(self, where: int, column: str | None, reason: str) -> None:
        """Count a bad row, or raise ValueError naming file, line and field when ``on_bad_row == "error"``."""
        message = f"{self.path}, {self.unit} {where}" + (f", field {column!r}" if column else "") + f": {reason}"
        if self.on_bad_row == "error":
            raise ValueError(message)
        self.count += 1
        if len(self.messages) < self.MAX_MESSAGES:
            self.messages.append(message)

    def __str__(self) -> str:
        if not self.count:
            return f"{self.path}: no bad rows"
        return f"{self.path}: skipped {self.count} bad rows, e.g. " + "; ".join(self.messages)


def read_records(
    path: str | os.PathLike,
    *,
    text_columns: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    on_bad_row: OnBadRow = "skip",
) -> tuple[list[dict[str, Any]], BadRows]:
    """Read a JSON list of objects, JSONL, CSV, TSV or plain-text file into a list of dicts.

    The format follows the suffix (.json, .jsonl, .csv, .tsv, .txt). CSV and TSV take column names from the header
    line, or from ``columns`` when the file has no header. TSV is read with quoting off (GLUE's MRPC has raw ``"``
    inside sentences) and a UTF-8 byte-order mark is dropped. Plain text gives one ``{"text": line}`` per non-blank
    line. Each record stores its line number under ``LINE``.

    A row is bad when it cannot be parsed, has the wrong number of fields, or lacks a non-empty string in one of
    ``text_columns``. With ``on_bad_row="skip"`` bad rows are dropped and counted in the returned ``BadRows``;
    with ``"error"`` the first one raises ValueError.
    """
    return _read_checked(path, columns, on_bad_row, lambda row: _text_problem(row, text_columns or ()))


def _read_checked(
    path: str | os.PathLike,
    columns: Sequence[str] | None,
    on_bad_row: OnBadRow,
    check: Callable[[dict[str, Any]], tuple[str, str] | None],
) -> tuple[list[dict[str, Any]], BadRows]:
    # One pass that parses and checks each row, so that "error" mode stops at the first bad row in file order.
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    bad = BadRows(str(path), on_bad_row, unit="index" if suffix == ".json" else "line")
    if suffix == ".json":
        rows = _read_json(path, bad)
    elif suffix == ".jsonl":
        rows = _read_jsonl(path, bad)
    elif suffix in (".csv", ".tsv"):
        rows = _read_delimited(path, "\t" if suffix == ".tsv" else ",", columns, bad)
    elif suffix == ".txt":
        rows = _read_text(path)
    else:
        raise ValueError(f"{path}: unknown data format {suffix!r} (expected .json, .jsonl, .csv, .tsv or .txt)")

    records = []
    for where, row in rows:
        problem = check(row)
        if problem:
            bad.reject(where, *problem)
            continue
        row[LINE] = where
        records.append(row)
    return records, bad


def _text_problem(row: dict[str, Any], text_columns: Sequence[str]) -> tuple[str, str] | None:
    for column in text_columns:
        value = row.get(column)
        if value is None:
            return column, "missing"
        if not isinstance(value, str):
            return column, f"expected text, got {type(value).__name__}"
        if not value.strip():
            return column, "empty text"
    return None


def _read_json(path: Path, bad: BadRows) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}")
    for index, row in enumerate(data):
        if isinstance(row, dict):
            yield index, row
        else:
            bad.reject(index, None, f"expected a JSON object, got a {type(row).__name__}")


def _read_jsonl(path: Path, bad: BadRows) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                bad.reject(line, None, f"invalid JSON ({err.msg})")
                continue
            if isinstance(row, dict):
                yield line, row
            else:
                bad.reject(line, None, f"expected a JSON object, got a {type(row).__name__}")


def _read_delimited(
    path: Path, delimiter: str, columns: Sequence[str] | None, bad: BadRows
) -> Iterator[tuple[int, dict]]:
    # Quoting off for TSV: a field like `" The pie business ...` would otherwise open a quoted field that swallows
    # the following lines. CSV keeps standard quoting, since commas inside text need it.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops the BOM that MRPC starts with
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        header = list(columns) if columns else next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for fields in reader:
            # line_num counts physical lines, so a quoted CSV field spanning lines still reports where its row starts
            line, start = start, reader.line_num + 1
            if not fields:
                continue
            if len(fields) != len(header):
                bad.reject(line, None, f"expected {len(header)} fields, got {len(fields)}")
                continue
            yield line, dict(zip(header, fields))


def _read_text(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            text = text.rstrip("\r\n")
            if text.strip():
                yield line, {"text": text}


# ---------------------------------------------------------------------------------------------------- classification


@dataclass
class ClassificationData:
    """Classification records ``{"text", "text_pair" (pairs only), "label": int, LINE}`` and what scores them."""

    records: list[dict[str, Any]]
    label_names: list[str]  # label id -> name
    metric: str  # "accuracy", "f1" (of label 1) or "matthews_corrcoef"
    bad_rows: BadRows


def load_classification(
    path: str | os.PathLike,
    *,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    labels: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    metric: str = "accuracy",
    on_bad_row: OnBadRow = "skip",
) -> ClassificationData:
    """Read a classification data set from any file ``read_records`` reads, with named text and label columns.

    ``labels`` lists the label values as written in the file, in id order. Leave it out for the training split
    (then the distinct values are sorted, integers numerically) and pass the training split's
    ``label_names`` for evaluation splits: there a label outside the list is a bad row.
    """
    text_columns = [text_column] + ([text_pair_column] if text_pair_column else [])
    known = None if labels is None else set(labels)

    def check(row: dict[str, Any]) -> tuple[str, str] | None:
        if problem := _text_problem(row, text_columns):
            return problem
        value = _label_value(row, label_column)
        if not value:
            return label_column, "missing label"
        if known is not None and value not in known:
            return label_column, f"unknown label {value!r} (known: {', '.join(labels)})"
        return None

    rows, bad = _read_checked(path, columns, on_bad_row, check)
    if labels is None:
        labels = sorted({_label_value(row, label_column) for row in rows}, key=_label_order)
    label_ids = {value: i for i, value in enumerate(labels)}
    records = []
    for row in rows:
        record = {"text": row[text_column], "label": label_ids[_label_value(row, label_column)], LINE: row[LINE]}
        if text_pair_column:
            record["text_pair"] = row[text_pair_column]
        records.append(record)
    return ClassificationData(records, list(labels), metric, bad)


def _label_value(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    return "" if value is None else str(value).strip()


def _label_order(value: str) -> tuple[int, int | str]:
    return (0, int(value)) if value.lstrip("-").isdigit() else (1, value)


@dataclass(frozen=True)
class GlueTask:
    text_column: str
    text_pair_column: str | None
    label_column: str
    labels: tuple[str, ...]  # as written in the file, in id order
    label_names: tuple[str, ...]
    metric: str
    columns: tuple[str, ...] | None = None  # for files without a header line


GLUE_TASKS = {
    "sst-2": GlueTask("sentence", None, "label", ("0", "1"), ("negative", "positive"), "accuracy"),
    "rte": GlueTask(
        "sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("entailment", "not_entailment"),
        "accuracy",
    ),
    "mrpc": GlueTask("#1 String", "#2 String", "Quality", ("0", "1"), ("not_equivalent", "equivalent"), "f1"),
    "cola": GlueTask(
        "sentence", None, "label", ("0", "1"), ("unacceptable", "acceptable"), "matthews_corrcoef",
        columns=("source", "label", "orig_label", "sentence"),
    ),
}


def load_glue(
    folder: str | os.PathLike, split: str = "train", *, task: str | None = None, on_bad_row: OnBadRow = "skip"
) -> ClassificationData:
    """Load ``<folder>/<split>.tsv`` of a GLUE task (SST-2, RTE, MRPC, CoLA), named by ``task`` or the folder name.

    Metrics follow GLUE: accuracy for SST-2 and RTE, F1 of the positive class for MRPC, Matthews correlation for CoLA.
    """
    folder = Path(folder)
    name = (task or folder.name).lower()
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}: expected one of {', '.join(GLUE_TASKS)}")
    spec = GLUE_TASKS[name]
    data = load_classification(
        folder / f"{split}.tsv",
        text_column=spec.text_column,
        text_pair_column=spec.text_pair_column,
        label_column=spec.label_column,
        labels=spec.labels,
        columns=spec.columns,
        metric=spec.metric,
        on_bad_row=on_bad_row,
    )
    return replace(data, label_names=list(spec.label_names))


# ------------------------------------------------------------------------------------------------------ instructions

# Stanford Alpaca's prompt templates, verbatim (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def render_prompt(record: dict[str, Any], template: Template = "alpaca", tokenizer: Any = None) -> str:
    """The text that precedes the response of an Alpaca record ``{instruction, input (optional), output}``.

    ``"alpaca"``: the Alpaca template, with or without the Input section. ``"chat"``: the tokenizer's chat template
    for one user turn (instruction, then a blank line and the input if any), ending with the assistant header.
    """
    instruction, context = record["instruction"], record.get("input") or ""
    if template == "alpaca":
        if context.strip():
            return ALPACA_PROMPT.format(instruction=instruction, input=context)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer that has a chat template")
        user = f"{instruction}\n\n{context}" if context.strip() else instruction
        messages = [{"role": "user", "content": user}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}: expected 'alpaca' or 'chat'")


def tokenize_sft(
    records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, template: Template = "alpaca"
) -> list[dict[str, list[int]]]:
    """Tokenize instruction records for supervised fine-tuning with loss on the response only.

        input_ids = prompt + response + [EOS]
        labels    = [-100] * len(prompt) + response + [EOS]

    truncated on the right to ``max_length``. Prompt and response are tokenized separately, so the boundary between
    them is exact whatever the tokenizer merges. Records whose prompt alone fills ``max_length`` have no response
    token left to learn from: they are dropped, with a warning.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenize_sft needs a tokenizer with an EOS token")
    prompts = [render_prompt(r, template, tokenizer) for r in records]
    # The chat template already writes its special tokens; the Alpaca text gets the tokenizer's usual ones (e.g. BOS).
    prompt_ids = tokenizer(prompts, add_special_tokens=template == "alpaca")["input_ids"]
    response_ids = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]

    examples = []
    for prompt, response in zip(prompt_ids, response_ids):
        if len(prompt) >= max_length:
            continue
        response = response + [tokenizer.eos_token_id]
        examples.append(
            {
                "input_ids": (prompt + response)[:max_length],
                "labels": ([IGNORE_INDEX] * len(prompt) + response)[:max_length],
            }
        )
    if len(examples) < len(records):
        warnings.warn(
            f"tokenize_sft: dropped {len(records) - len(examples)} of {len(records)} records whose prompt fills "
            f"max_length={max_length}",
            stacklevel=2,
        )
    return examples


def chunk_text(text: str, tokenizer: Any, seq_len: int) -> list[dict[str, list[int]]]:
    """Cut a long text into causal-LM examples of exactly ``seq_len`` tokens (labels = input_ids).

    Consecutive chunks overlap by one token, chunk k = ids[k(L-1) : k(L-1) + L]: the loss never scores a chunk's
    first token (nothing precedes it), so with the overlap every token but the very first is a target exactly once.
    The tail shorter than ``seq_len`` is dropped.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    starts = range(0, len(ids) - seq_len + 1, seq_len - 1)
    return [{"input_ids": ids[s : s + seq_len], "labels": ids[s : s + seq_len]} for s in starts]


# ----------------------------------------------------------------------------------------------------------- packing


def pack_examples(examples: Sequence[dict[str, list[int]]], seq_len: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most ``seq_len`` tokens, instead of padding each one.

    Best-fit decreasing: longest example first, each into the open row with the least room that still fits it.
    A row is ``{"input_ids", "labels", "seq_lens"}``: the concatenated examples and their lengths, in order.
    Shuffle the rows, not the examples, for training.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[dict[str, list[int]]]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted, so bisect finds the best fit
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than seq_len={seq_len}; tokenize with max_length")
        j = bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(examples[i])
        if room > n:
            insort(free, (room - n, r))
    return [
        {
            "input_ids": [t for e in row for t in e["input_ids"]],
            "labels": [t for e in row for t in e["labels"]],
            "seq_lens": [len(e["input_ids"]) for e in row],
        }
        for row in rows
    ]


@dataclass
class PackedCollator:
    """Batch rows from ``pack_examples`` so that no token sees, or is scored across, a sequence boundary.

    Rows are right-padded to the longest. Returns
      - ``input_ids``, ``labels`` (B, L): labels are -100 at every packed sequence's first position (the shifted
        loss would otherwise score the previous sequence's last token predicting it) and on padding;
      - ``position_ids`` (B, L): restart at 0 for every packed sequence, as if it were alone;
      - ``attention_mask`` (B, 1, L, L): block-diagonal causal, query i may attend key j iff j <= i and both are in
        the same sequence (padding forms one more block, so no row is fully masked);
      - ``num_real_tokens``.

    transformers (5.x, ``masking_utils``) passes a 4-D ``attention_mask`` through to attention unchanged. The default
    float mask (0 = attend, dtype min = blocked) is added to the scores, which both the "sdpa" and "eager" attention
    paths accept; ``mask_dtype=torch.bool`` (True = attend) is smaller but only right for sdpa and flex attention:
    eager attention adds the mask to the scores, and adding a boolean mask silently blocks nothing. A float mask
    must have the model's dtype.
    """

    pad_token_id: int = 0
    mask_dtype: torch.dtype = torch.float32

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((len(rows), length), dtype=torch.long)
        segment_ids = torch.empty((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
            lens = torch.tensor(list(row["seq_lens"]) + ([length - n] if length > n else []))
            starts = lens.cumsum(0) - lens
            segment_ids[b] = torch.repeat_interleave(torch.arange(len(lens)), lens)
            position_ids[b] = torch.arange(length) - starts[segment_ids[b]]
            labels[b, starts[: len(row["seq_lens"])]] = IGNORE_INDEX

        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
        allowed = allowed[:, None]  # one mask for all heads
        if self.mask_dtype == torch.bool:
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape, dtype=self.mask_dtype).masked_fill(
                ~allowed, torch.finfo(self.mask_dtype).min
            )
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": mask,
            "num_real_tokens": torch.tensor(sum(len(row["input_ids"]) for row in rows)),
        }


# --------------------------------------------------------------------------------------------------------- padding


@dataclass
class PaddingCollator:
    """Right-pad examples to the longest in the batch.

    Returns ``input_ids``, ``attention_mask`` (B, L; 1 = token, 0 = padding), ``labels`` (-100 on padding; only if
    the examples have labels) and ``num_real_tokens``.
    """

    pad_token_id: int = 0

    def __call__(self, examples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for b, e in enumerate(examples):
            input_ids[b, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            attention_mask[b, : len(e["input_ids"])] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "labels" in examples[0]:
            labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
            for b, e in enumerate(examples):
                labels[b, : len(e["labels"])] = torch.tensor(e["labels"])
            batch["labels"] = labels
        batch["num_real_tokens"] = attention_mask.sum()
        return batch


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Share of the batch's token positions that are padding: 1 - num_real_tokens / (B * L)."""
    return 1.0 - int(batch["num_real_tokens"]) / batch["input_ids"].numel()


def group_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of example indices with similar lengths, for evaluation: padding to the longest wastes little.

    Sorted longest first, so that the batch needing the most memory runs first and an out-of-memory error shows
    at once. Run the batches, then put the results back in the original order with ``ungroup``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def ungroup(batches: Sequence[Sequence[int]], batch_results: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of ``group_by_length``: per-batch results (one per index) back in the original example order."""
    results: list[Any] = [None] * sum(len(b) for b in batches)
    for indices, values in zip(batches, batch_results, strict=True):
        for i, value in zip(indices, values, strict=True):
            results[i] = value
    return results


# -------------------------------------------------------------------------------------------- classification batches


@dataclass
class ClassificationCollator:
    """Tokenize classification records (``text``, optional ``text_pair``, ``label``), padded to the longest.

    Returns the tokenizer's tensors (``input_ids``, ``attention_mask``, ``token_type_ids`` for BERT), ``labels``
    (B,) and ``num_real_tokens``. Pairs are truncated longest-first to ``max_length``.
    """

    tokenizer: Any
    max_length: int = 512

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [r["text_pair"] for r in records] if "text_pair" in records[0] else None
        batch = dict(
            self.tokenizer(
                [r["text"] for r in records],
                pairs,
                padding="longest",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )
        batch["labels"] = torch.tensor([r["label"] for r in records], dtype=torch.long)
        batch["num_real_tokens"] = batch["attention_mask"].sum()
        return batch
