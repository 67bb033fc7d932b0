"""Readers: JSON list, JSONL, CSV, TSV and plain-text files into records (plain dicts), with bad rows counted or raised.

Every record keeps its source line under ``LINE``; ``BadRows`` says how many rows were rejected and why.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

LINE = "_line"  # every record keeps its source line (1-based) under this key; for a JSON list, its index (0-based)

OnBadRow = Literal["skip", "error"]


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

    A file that is not UTF-8 is refused, naming its first bad line (decoding it some other way could silently
    change the text). A CSV/TSV field may be longer than the csv module's default limit (128 KiB).

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


def read_utf8(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped), or ValueError naming the first line that is not
    UTF-8 and what to do."""
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}): save the file as "
            "UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > NEW"
        ) from None


def _read_json(path: Path, bad: BadRows) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(read_utf8(path))
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
    for line, text in enumerate(read_utf8(path).split("\n"), start=1):
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
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""), delimiter=delimiter, quoting=quoting)
    with _no_field_limit():
        header = list(columns) if columns else _next_row(reader, path)
        if header is None:
            return
        start = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:  # the reader goes on with the next line
                line, start = start, reader.line_num + 1
                bad.reject(line, None, f"unreadable {'TSV' if delimiter == chr(9) else 'CSV'} row ({err})")
                continue
            # line_num counts physical lines, so a quoted CSV field spanning lines still reports where its row starts
            line, start = start, reader.line_num + 1
            if not fields:
                continue
            if len(fields) != len(header):
                bad.reject(line, None, f"expected {len(header)} fields, got {len(fields)}")
                continue
            yield line, dict(zip(header, fields))


def _next_row(reader: Any, path: Path) -> list[str] | None:
    try:
        return next(reader, None)
    except csv.Error as err:
        raise ValueError(f"{path}, line 1: unreadable header line ({err})") from None


@contextmanager
def _no_field_limit() -> Iterator[None]:
    """Lift the csv module's 128 KiB field limit (a long document is valid data) while one file is read."""
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def _read_text(path: Path) -> Iterator[tuple[int, dict]]:
    for line, text in enumerate(read_utf8(path).split("\n"), start=1):
        text = text.rstrip("\r")
        if text.strip():
            yield line, {"text": text}
