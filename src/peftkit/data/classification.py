"""Classification data sets: records with text, optional text pair and an integer label, from any file the readers
read (``load_classification``) or from a GLUE task folder (``load_glue``, ``GLUE_TASKS``)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .readers import LINE, BadRows, OnBadRow, _read_checked, _text_problem


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

    ``labels`` lists the label values as written in the file, in id order: a row with another label is a bad row
    (skipped and counted, or an error under ``on_bad_row="error"``), as in a GLUE folder. Leave it out for a
    training split to infer it from the file with :func:`infer_labels` (an error when the file is ambiguous), and
    pass the training split's labels for evaluation splits.
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
        labels = infer_labels(Counter(_label_value(row, label_column) for row in rows), path, label_column)
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
    return (0, int(value)) if _is_integer(value) else (1, value)


def _is_integer(value: str) -> bool:
    return value.lstrip("-").isdigit()


def infer_labels(counts: Counter[str], path: str | os.PathLike, column: str = "label") -> list[str]:
    """The label set of a training file, in id order, when its label values leave no doubt; else a ValueError that
    lists the values with their row counts and asks for ``--labels``.

    No doubt means (``counts``: label value -> rows):
      - the values are 0 and 1 (a binary task), or
      - the values are consecutive integers (0..K-1, 1..5, -1..1: no gap) or are all words (not integers),
        and every value is found in at least 2 rows and in at least 1% of the rows: a value seen once is more
        likely a stray than a class.
    A mixture of integers and words, or integers with a gap (0, 1, 7), is never inferred. One value alone is not a
    classification task. Integers are ordered numerically (the lowest is class 0), words alphabetically.
    """
    values = sorted(counts, key=_label_order)
    total = sum(counts.values())
    if len(values) < 2:
        raise ValueError(f"{path}: the label column {column!r} holds {'only ' + repr(values[0]) if values else 'no value'}: "
                         "a classifier needs at least 2 classes; check --label-column, or name them with --labels")
    if values == ["0", "1"]:
        return values
    integers = all(_is_integer(v) for v in values)
    low = int(values[0]) if integers else 0
    shaped = values == [str(low + i) for i in range(len(values))] if integers else not any(_is_integer(v) for v in values)
    frequent = [v for v in values if counts[v] >= max(2, 0.01 * total)]
    if shaped and len(frequent) == len(values):
        return values
    shown = ", ".join(f"{v!r} ({counts[v]} row{'s' if counts[v] > 1 else ''})" for v in sorted(values, key=lambda v: -counts[v])[:10])
    more = f" and {len(values) - 10} more" if len(values) > 10 else ""
    guess = ",".join(frequent) if len(frequent) >= 2 else "A,B"
    raise ValueError(
        f"{path}: cannot tell the label set from column {column!r}: {shown}{more}; name the classes in id order "
        f"with --labels (e.g. --labels {guess}): rows with other labels are then skipped and counted, or stop the "
        "run with --on-bad-row error"
    )


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
