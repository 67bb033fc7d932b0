"""Bad data (issue 15 findings 5, 7 and 8): stray labels, label sets that cannot be inferred, files that are not
UTF-8, fields over csv's 128 KiB limit, evaluation files with or without a header or with no usable row, damaged
classification adapters. Each case asserts its message or its numbers, and that no traceback reaches the user."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import DATA
from test_bad_cli import FAILED, USAGE, assert_one_line, run_cli
from test_train import save_tiny_classifier

import peftkit
from peftkit.data import LINE, infer_labels, load_classification, read_records

SST2 = DATA / "glue" / "SST-2"


def sst2_rows(n: int, split: str = "train", skip: int = 0) -> list[tuple[str, str]]:
    """``n`` (sentence, label) rows of real SST-2, alternating labels so both classes are present."""
    lines = (SST2 / f"{split}.tsv").read_text().splitlines()[1:]
    rows = [tuple(line.split("\t")) for line in lines]
    by_label = {"0": [r for r in rows if r[1] == "0"][skip:], "1": [r for r in rows if r[1] == "1"][skip:]}
    return [by_label[str(i % 2)][i // 2] for i in range(n)]


def write_tsv(path: Path, rows, header: str | None = "sentence\tlabel") -> Path:
    lines = ([header] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ the label rule

LABEL_SETS = [  # (label value -> rows, the inferred label set or the error's words)
    ({"0": 50, "1": 1}, ["0", "1"]),  # binary: always clear, however unbalanced
    ({"0": 5, "1": 5, "2": 5}, ["0", "1", "2"]),
    ({"1": 4, "2": 4, "3": 4, "4": 4, "5": 4}, ["1", "2", "3", "4", "5"]),  # star ratings
    ({"-1": 9, "0": 9, "1": 9}, ["-1", "0", "1"]),
    ({"pos": 3, "neg": 2}, ["neg", "pos"]),
    ({"0": 48, "1": 49, "7": 1, "-1": 1, "banana": 1}, "'-1' (1 row), '7' (1 row), 'banana' (1 row); name the classes in id order with --labels (e.g. --labels 0,1)"),
    ({"0": 10, "1": 10, "7": 10}, "cannot tell the label set"),  # a gap
    ({"0": 10, "1": 10, "banana": 10}, "cannot tell the label set"),  # integers and words
    ({"neg": 10, "pos": 10, "pso": 1}, "'pso' (1 row)"),  # a typo
    ({"0": 150, "1": 148, "2": 2}, "'2' (2 rows)"),  # 2 rows but under 1% of 300
    ({"1": 7}, "holds only '1': a classifier needs at least 2 classes"),
]


@pytest.mark.parametrize("counts, expected", LABEL_SETS, ids=[",".join(c) for c, _ in LABEL_SETS])
def test_label_set_is_inferred_only_when_unambiguous(counts, expected):
    if isinstance(expected, list):
        assert infer_labels(Counter(counts), "f.tsv") == expected
    else:
        with pytest.raises(ValueError, match="f.tsv") as raised:
            infer_labels(Counter(counts), "f.tsv")
        assert expected in str(raised.value)


def _stray_file(tmp_path):
    """Issue 15 finding 5: a binary TSV with stray labels 7, -1 and banana (on lines 5, 9 and 13)."""
    rows = sst2_rows(24)
    for i, stray in ((3, "7"), (7, "-1"), (11, "banana")):
        rows[i] = (rows[i][0], stray)
    return write_tsv(tmp_path / "stray.tsv", rows)


def test_stray_labels_stop_a_run_without_labels(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", _stray_file(tmp_path), "--model", tmp_path / "no-model",
                           "--out", tmp_path / "run", "--quiet")
    assert code == FAILED
    assert_one_line(err, "train", "stray.tsv: cannot tell the label set from column 'label'", "--labels 0,1")


def test_stray_labels_under_on_bad_row_error_name_the_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--data", _stray_file(tmp_path), "--model", tmp_path / "no-model",
                           "--labels", "0,1", "--on-bad-row", "error", "--out", tmp_path / "run", "--quiet")
    assert code == FAILED
    assert_one_line(err, "train", "stray.tsv, line 5, field 'label': unknown label '7' (known: 0, 1)")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("cls") / "bert")


@pytest.fixture(scope="module")
def cls_run(classifier, tmp_path_factory):
    """A 2-step LoRA run of the tiny classifier on 24 real SST-2 rows with 3 stray labels, told --labels 0,1."""
    folder = tmp_path_factory.mktemp("cls_run")
    data = _stray_file(folder)
    from peftkit import cli

    code = cli.main(["train", "--model", str(classifier), "--data", str(data), "--labels", "0,1", "--out",
                     str(folder / "run"), "--max-steps", "2", "--batch-size", "8", "--eval-every", "0", "--quiet",
                     "--target-modules", "query,value", "--lr", "0.01"])
    assert code == 0
    return folder / "run"


def test_stray_labels_are_skipped_and_counted_in_summary(cls_run):
    import yaml

    summary = json.loads((cls_run / "summary.json").read_text())
    assert list(summary["skipped_rows"].values()) == [3]
    config = yaml.safe_load((cls_run / "config.yaml").read_text())
    assert config["labels"] == ["0", "1"]  # recorded: eval and --resume map labels as training did


def test_quiet_still_reports_skipped_rows(classifier, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--model", classifier, "--data", _stray_file(tmp_path), "--labels", "0,1",
                           "--out", tmp_path / "run", "--max-steps", "1", "--batch-size", "8", "--eval-every", "0",
                           "--quiet", "--target-modules", "query")
    assert code == 0
    warning = assert_one_line(err, "train", "warning:", "stray.tsv: skipped 3 bad rows")
    assert "line 5, field 'label': unknown label '7'" in warning and "line 13, field 'label': unknown label 'banana'" in warning


# ------------------------------------------------------------------------------- eval on one's own file (finding 8)


def _direct_accuracy(classifier, adapter, rows):
    base, tokenizer = peftkit.load_model(str(classifier), task="seq-cls", num_labels=2)
    model = peftkit.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        predicted = [int(model(**tokenizer(text, truncation=True, max_length=128, return_tensors="pt")).logits.argmax())
                     for text, _ in rows]
    return sum(p == int(label) for p, (_, label) in zip(predicted, rows)) / len(rows)


@pytest.mark.parametrize("layout", ["header", "no header", "label first, no header", "csv with header"])
def test_eval_on_my_own_file(classifier, cls_run, tmp_path, capsys, layout):
    """``peftkit eval --adapter RUN/adapter --data my_test.tsv`` gives the accuracy computed by hand."""
    rows = sst2_rows(10, "dev")
    if layout == "header":
        data = write_tsv(tmp_path / "my_test.tsv", rows)
    elif layout == "no header":
        data = write_tsv(tmp_path / "my_test.tsv", rows, header=None)
    elif layout == "label first, no header":
        data = write_tsv(tmp_path / "my_test.tsv", [(label, text) for text, label in rows], header=None)
    else:
        import csv

        data = tmp_path / "my_test.csv"
        with data.open("w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
    code, out, err = run_cli(capsys, "eval", "--adapter", cls_run / "adapter", "--data", data, "--json")
    assert code == 0, err
    scores = json.loads(out)
    assert scores["accuracy"] == pytest.approx(_direct_accuracy(classifier, cls_run / "adapter", rows), abs=1e-9)
    assert "Traceback" not in err


def test_eval_reads_a_field_over_128_kib(cls_run, tmp_path, capsys):
    """Issue 15 finding 7: a TSV field over csv's 128 KiB limit is read (and truncated to max_length), not a crash."""
    rows = sst2_rows(6, "dev")
    rows[2] = ("great " * 40000, rows[2][1])  # 240,000 characters
    code, out, err = run_cli(capsys, "eval", "--adapter", cls_run / "adapter", "--data",
                             write_tsv(tmp_path / "long.tsv", rows), "--json")
    assert code == 0, err
    records, bad = read_records(tmp_path / "long.tsv")
    assert len(records) == 6 and bad.count == 0 and len(records[2]["sentence"]) == 240000
    assert json.loads(out)["accuracy"] * 6 == pytest.approx(round(json.loads(out)["accuracy"] * 6))


@pytest.mark.parametrize("content, message", [
    ("sentence\tlabel\n", "no usable examples"),
    ("sentence\tlabel\ngood\tpositive\nbad\tnegative\n", "unknown label 'positive' (known: 0, 1)"),
    ("sentence\tlabel\ngood\t\n", "missing label"),
], ids=["header only", "word labels for an integer classifier", "empty label"])
def test_eval_on_a_file_without_usable_rows_says_so(cls_run, tmp_path, capsys, content, message):
    (tmp_path / "t.tsv").write_text(content)
    code, _, err = run_cli(capsys, "eval", "--adapter", cls_run / "adapter", "--data", tmp_path / "t.tsv")
    assert code == FAILED
    assert_one_line(err, "eval", "t.tsv: no usable examples", message)


def test_eval_with_word_labels_named_by_labels(classifier, cls_run, tmp_path, capsys):
    rows = sst2_rows(8, "dev")
    named = [(text, "positive" if label == "1" else "negative") for text, label in rows]
    data = write_tsv(tmp_path / "words.tsv", named)
    code, out, err = run_cli(capsys, "eval", "--adapter", cls_run / "adapter", "--data", data, "--labels", "negative,positive", "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(_direct_accuracy(classifier, cls_run / "adapter", rows), abs=1e-9)
    code, _, err = run_cli(capsys, "eval", "--adapter", cls_run / "adapter", "--data", data, "--labels", "a,b,c")
    assert code == USAGE
    assert_one_line(err, "eval", "classifies into 2 classes, but the labels are a,b,c")


def test_labels_for_a_glue_folder_must_be_its_own(tmp_path, capsys):
    glue = tmp_path / "SST-2"
    glue.mkdir()
    for split in ("train", "dev"):
        write_tsv(glue / f"{split}.tsv", sst2_rows(6, split))
    code, _, err = run_cli(capsys, "train", "--data", glue, "--model", tmp_path / "no-model", "--labels", "neg,pos",
                           "--out", tmp_path / "run", "--quiet")
    assert code == USAGE
    assert_one_line(err, "train", "the GLUE task SST-2 has the labels 0,1; drop --labels")


# --------------------------------------------------------------------------------------- damaged classification adapter


@pytest.mark.parametrize("damage", ["garbage bytes", "truncated", "missing"])
@pytest.mark.parametrize("verb", ["eval", "merge"])
def test_damaged_classification_adapter(cls_run, tmp_path, capsys, damage, verb):
    """Issue 15 finding 7: eval / merge of a corrupted classification adapter (was a SafetensorError traceback)."""
    adapter = tmp_path / "adapter"
    shutil.copytree(cls_run / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    if damage == "garbage bytes":
        weights.write_bytes(b"\x89not a safetensors file at all" * 10)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        weights.unlink()
    argv = ["eval", "--adapter", adapter, "--data", write_tsv(tmp_path / "t.tsv", sst2_rows(4, "dev"))] if verb == "eval" \
        else ["merge", "--adapter", adapter, "--out", tmp_path / "merged"]
    code, _, err = run_cli(capsys, *argv)
    assert code == FAILED
    line = assert_one_line(err, verb, "adapter_model.safetensors")
    expected = "no adapter weights at" if damage == "missing" else "is not a readable safetensors file (truncated or corrupted?)"
    assert line == f"peftkit {verb}: error: {weights} {expected}" if damage != "missing" else \
        line == f"peftkit {verb}: error: {expected} {weights}", line
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------------------------------------------- non-UTF-8


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".tsv", ".txt"])
def test_non_utf8_data_names_the_file_and_line(tmp_path, suffix):
    good = {".json": '[\n{"text": "a", "label": "0"},\n{"text": "caf\u00e9", "label": "1"}\n]\n',
            ".jsonl": '{"text": "a", "label": "0"}\n{"text": "caf\u00e9", "label": "1"}\n',
            ".csv": "text,label\na,0\ncaf\u00e9,1\n", ".tsv": "text\tlabel\na\t0\ncaf\u00e9\t1\n", ".txt": "a\ncaf\u00e9\n"}[suffix]
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(good.encode("latin-1"))
    line = 3 if suffix == ".json" else (2 if suffix in (".jsonl", ".txt") else 3)
    with pytest.raises(ValueError) as raised:
        read_records(path)
    assert str(raised.value).startswith(f"{path}, line {line}: not UTF-8 text (byte 0xe9 at column ")
    assert "save the file as UTF-8" in str(raised.value)
    path.write_text(good, encoding="utf-8-sig")  # the same text as UTF-8 (with a BOM) reads
    records, _ = read_records(path)
    assert any("caf\u00e9" in str(r.get("text")) for r in records)


def test_non_utf8_training_data_through_the_cli(tmp_path, capsys):
    rows = "sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(6)) + "na\xefve\t1\n"
    (tmp_path / "d.tsv").write_bytes(rows.encode("latin-1"))
    code, _, err = run_cli(capsys, "train", "--data", tmp_path / "d.tsv", "--model", tmp_path / "no-model",
                           "--out", tmp_path / "run", "--quiet")
    assert code == FAILED
    assert_one_line(err, "train", f"{tmp_path / 'd.tsv'}, line 8: not UTF-8 text (byte 0xef at column 3)")


def test_a_csv_row_the_csv_module_rejects_is_a_counted_bad_row(tmp_path):
    """A csv.Error on one row (here a field over the limit while it is lowered) is that row's problem, not the file's."""
    import csv

    (tmp_path / "d.tsv").write_text("text\tlabel\nshort\t0\n" + "x" * 50 + "\t1\nfine\t1\n")
    limit = csv.field_size_limit()
    try:
        from peftkit.data import readers

        original = readers._no_field_limit
        import contextlib

        readers._no_field_limit = contextlib.nullcontext  # keep csv's limit, lowered to 40 below
        csv.field_size_limit(40)
        records, bad = read_records(tmp_path / "d.tsv")
    finally:
        readers._no_field_limit = original
        csv.field_size_limit(limit)
    assert [r["text"] for r in records] == ["short", "fine"] and [r[LINE] for r in records] == [2, 4]
    assert bad.count == 1 and bad.messages[0].startswith(f"{tmp_path / 'd.tsv'}, line 3: unreadable TSV row (field larger")
    data = load_classification(tmp_path / "d.tsv", text_column="text", label_column="label")  # csv's limit lifted
    assert [r["label"] for r in data.records] == [0, 1, 1] and data.bad_rows.count == 0
