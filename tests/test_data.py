import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peftkit.data import (
    ALPACA_PROMPT_NO_INPUT,
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
    padding_fraction,
    read_records,
    render_prompt,
    tokenize_sft,
    ungroup,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = DATA / "instruct" / "alpaca_sample_1727.json"


@pytest.fixture(scope="module")
def smol_tokenizer():
    from peftkit.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from peftkit.models import load_tokenizer

    return load_tokenizer("minilm-l6")


# ----------------------------------------------------------------------------------------------------------- readers


def test_read_records_every_format_keeps_source_lines(tmp_path):
    rows = [{"q": "2+2?", "a": "4"}, {"q": "Say hi", "a": "hi"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]) + "\n\n" + json.dumps(rows[1]) + "\n")
    (tmp_path / "d.csv").write_text('q,a\n"2+2, please?",4\n"Say\nhi",hi\n')
    # TSV: BOM, a raw quote that must not open a quoted field, no final newline
    (tmp_path / "d.tsv").write_text('\ufeffq\ta\n" 2+2?\t4\nSay hi\thi', encoding="utf-8")
    (tmp_path / "d.txt").write_text("first line\n\n  \nsecond line\n")

    json_records, bad = read_records(tmp_path / "d.json", text_columns=["q", "a"])
    assert [r["q"] for r in json_records] == ["2+2?", "Say hi"] and [r[LINE] for r in json_records] == [0, 1]
    assert bad.count == 0

    jsonl = read_records(tmp_path / "d.jsonl", text_columns=["q", "a"])[0]
    assert [(r["a"], r[LINE]) for r in jsonl] == [("4", 1), ("hi", 3)]

    csv_records = read_records(tmp_path / "d.csv", text_columns=["q", "a"])[0]
    assert [(r["q"], r[LINE]) for r in csv_records] == [("2+2, please?", 2), ("Say\nhi", 3)]

    tsv = read_records(tmp_path / "d.tsv", text_columns=["q", "a"])[0]
    assert [(r["q"], r["a"], r[LINE]) for r in tsv] == [('" 2+2?', "4", 2), ("Say hi", "hi", 3)]

    text = read_records(tmp_path / "d.txt")[0]
    assert [(r["text"], r[LINE]) for r in text] == [("first line", 1), ("second line", 4)]

    with pytest.raises(ValueError, match="unknown data format"):
        read_records(tmp_path / "d.parquet")


def test_bad_rows_are_counted_with_file_and_line_or_raise(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        {"instruction": "ok", "output": "fine"},
        {"instruction": "no output"},
        "{not json",
        {"instruction": "empty", "output": "   "},
        {"instruction": "number", "output": 3},
        [1, 2],
        {"instruction": "ok too", "output": "yes"},
    ]
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))

    records, bad = read_records(path, text_columns=["instruction", "output"])
    assert [r[LINE] for r in records] == [1, 7]
    assert bad.count == 5
    assert bad.messages == [
        f"{path}, line 2, field 'output': missing",
        f"{path}, line 3: invalid JSON (Expecting property name enclosed in double quotes)",
        f"{path}, line 4, field 'output': empty text",
        f"{path}, line 5, field 'output': expected text, got int",
        f"{path}, line 6: expected a JSON object, got a list",
    ]
    assert str(bad).startswith(f"{path}: skipped 5 bad rows")

    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2, field 'output': missing"):
        read_records(path, text_columns=["instruction", "output"], on_bad_row="error")

    with pytest.raises(ValueError, match="on_bad_row must be 'skip' or 'error'"):
        read_records(path, on_bad_row="ignore")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(ValueError, match=r"broken\.json, line 2: invalid JSON"):
        read_records(broken)

    tsv = tmp_path / "bad.tsv"
    tsv.write_text("a\tb\n1\t2\n1\t2\t3\n")
    records, bad = read_records(tsv)
    assert len(records) == 1 and bad.messages == [f"{tsv}, line 3: expected 2 fields, got 3"]


def test_real_alpaca_sample_has_three_empty_outputs():
    records, bad = read_records(ALPACA, text_columns=["instruction", "output"])
    assert len(records) == 1724 and bad.count == 3
    assert [m.split(",")[1].strip() for m in bad.messages] == ["index 284", "index 1223", "index 1347"]
    assert all("field 'output': empty text" in m for m in bad.messages)


# ---------------------------------------------------------------------------------------------------- classification

# counts checked against the files with awk; label 1 = positive / not_entailment / equivalent / acceptable
GLUE_EXPECTED = [
    ("SST-2", "train", 67349, 37569, "accuracy"),
    ("SST-2", "dev", 872, 444, "accuracy"),
    ("RTE", "train", 2490, 1241, "accuracy"),
    ("RTE", "dev", 277, 131, "accuracy"),
    ("MRPC", "train", 3668, 2474, "f1"),
    ("MRPC", "dev", 408, 279, "f1"),
    ("CoLA", "train", 8551, 6023, "matthews_corrcoef"),
    ("CoLA", "dev", 1043, 721, "matthews_corrcoef"),
]


@pytest.mark.parametrize("task,split,rows,positives,metric", GLUE_EXPECTED)
def test_load_glue_reads_every_row(task, split, rows, positives, metric):
    data = load_glue(DATA / "glue" / task, split)
    assert data.bad_rows.count == 0
    assert len(data.records) == rows
    assert sum(r["label"] for r in data.records) == positives
    assert data.metric == metric
    assert len(data.label_names) == 2
    assert ("text_pair" in data.records[0]) == (task in ("RTE", "MRPC"))


def test_load_glue_keeps_raw_quotes_and_last_line():
    mrpc = load_glue(DATA / "glue" / "MRPC", "dev")
    first = mrpc.records[0]
    assert first["text"].startswith("He said the foodservice pie")
    assert first["text_pair"] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert first["label"] == 1 and first[LINE] == 2 and mrpc.label_names == ["not_equivalent", "equivalent"]

    rte = load_glue(DATA / "glue" / "RTE", "dev")
    assert rte.records[0]["label"] == 1 and rte.label_names[1] == "not_entailment"

    cola = load_glue(DATA / "glue" / "CoLA", "dev")  # no header, no final newline
    assert cola.records[-1]["text"] == "John talked to Bill about himself."
    assert cola.records[-1][LINE] == 1043 and cola.records[0][LINE] == 1

    with pytest.raises(ValueError, match="unknown GLUE task"):
        load_glue(DATA / "glue" / "SST-2", "dev", task="qnli")


def test_load_classification_maps_string_labels_and_rejects_unknown(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("review,stars\ngreat,high\nawful,low\nmeh,mid\n\"fine, really\",high\nbad,low\nso-so,mid\n")
    dev = tmp_path / "dev.csv"
    dev.write_text("review,stars\nok,mid\nwow,superb\n,low\nbad,\n")

    data = load_classification(train, text_column="review", label_column="stars")
    assert data.label_names == ["high", "low", "mid"]
    assert [(r["text"], r["label"]) for r in data.records] == [
        ("great", 0), ("awful", 1), ("meh", 2), ("fine, really", 0), ("bad", 1), ("so-so", 2)
    ]

    dev_data = load_classification(dev, text_column="review", label_column="stars", labels=data.label_names)
    assert [(r["text"], r["label"], r[LINE]) for r in dev_data.records] == [("ok", 2, 2)]
    assert dev_data.bad_rows.count == 3
    assert dev_data.bad_rows.messages == [
        f"{dev}, line 3, field 'stars': unknown label 'superb' (known: high, low, mid)",
        f"{dev}, line 4, field 'review': empty text",
        f"{dev}, line 5, field 'stars': missing label",
    ]
    with pytest.raises(ValueError, match=r"dev\.csv, line 3, field 'stars': unknown label 'superb'"):
        load_classification(dev, text_column="review", label_column="stars", labels=["mid"], on_bad_row="error")

    numeric = tmp_path / "n.tsv"
    numeric.write_text("t\tl\na\t10\nb\t2\nc\t-1\n")  # not 0..K-1, each once: ambiguous, so named by hand
    with pytest.raises(ValueError, match="cannot tell the label set"):
        load_classification(numeric, text_column="t", label_column="l")
    assert load_classification(numeric, text_column="t", label_column="l", labels=["-1", "2", "10"]).label_names == ["-1", "2", "10"]


# ------------------------------------------------------------------------------------------------------ instructions


def test_alpaca_template_matches_the_reference_prompts():
    tiny = json.loads((DATA / "instruct" / "alpaca_tiny_100.json").read_text())
    assert sum(1 for r in tiny if r["input"]) > 0 and sum(1 for r in tiny if not r["input"]) > 0
    for record in tiny:
        assert render_prompt(record) + record["output"] == record["text"]
    assert render_prompt({"instruction": "Hi {there}", "input": " "}) == ALPACA_PROMPT_NO_INPUT.format(
        instruction="Hi {there}"
    )


def test_tokenize_sft_puts_loss_on_response_and_eos_only(smol_tokenizer):
    tok = smol_tokenizer
    records = read_records(DATA / "instruct" / "alpaca_tiny_100.json", text_columns=["instruction", "output"])[0]
    examples = tokenize_sft(records, tok, max_length=4096)
    assert len(examples) == 100
    for record, example in zip(records, examples):
        prompt_len = len(tok(render_prompt(record))["input_ids"])
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) == len(labels)
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert labels[prompt_len:] == ids[prompt_len:] and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[prompt_len:]) == record["output"] + "<|im_end|>"
        assert tok.decode(ids) == record["text"] + "<|im_end|>"  # no token lost or merged at the boundary

    first_prompt_len = examples[0]["labels"].count(IGNORE_INDEX)
    assert first_prompt_len == 37
    with pytest.warns(UserWarning, match="dropped 1 of 2 records"):
        short = tokenize_sft([records[0], {"instruction": "x " * 200, "output": "y"}], tok, max_length=40)
    assert [len(e["input_ids"]) for e in short] == [40]
    assert short[0]["labels"][37:] == short[0]["input_ids"][37:40]


def test_tokenize_sft_with_chat_template(smol_tokenizer):
    tok = smol_tokenizer
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    [example] = tokenize_sft([record], tok, max_length=256, template="chat")
    conversation = [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    full = tok.apply_chat_template(conversation, tokenize=False)
    # our example stops at the EOS (<|im_end|>) that closes the assistant turn; the template adds a newline after it
    assert tok.decode(example["input_ids"]) + "\n" == full
    response = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tok.decode(response) == "5<|im_end|>"
    assert render_prompt(record, "chat", tok).endswith("<|im_start|>assistant\n")


def test_chunk_text_covers_every_token_once(smol_tokenizer):
    text = (DATA / "text" / "tinyshakespeare.txt").read_text()[:50_000]
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = chunk_text(text, smol_tokenizer, seq_len=128)
    assert len(chunks) == (len(ids) - 1) // 127
    assert all(len(c["input_ids"]) == 128 and c["labels"] == c["input_ids"] for c in chunks)
    # targets (every token but each chunk's first) tile the token stream without gap or repeat
    targets = [t for c in chunks for t in c["input_ids"][1:]]
    assert targets == ids[1 : 1 + len(targets)]
    assert len(ids) - 1 - len(targets) < 127


# ----------------------------------------------------------------------------------------------------------- packing


def test_pack_examples_best_fit_keeps_every_example_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    examples = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate(lengths)]
    rows = pack_examples(examples, seq_len=128)
    assert all(len(r["input_ids"]) == sum(r["seq_lens"]) <= 128 for r in rows)
    assert sorted(t for r in rows for t in set(r["input_ids"])) == list(range(300))
    assert sum(lengths) == 15_151
    assert -(-sum(lengths) // 128) == 119  # lower bound on the number of rows
    assert len(rows) == 119  # best-fit decreasing reaches it here
    with pytest.raises(ValueError, match="more than seq_len"):
        pack_examples([{"input_ids": [1] * 9, "labels": [1] * 9}], seq_len=8)


def test_packed_collator_layout():
    rows = [
        {"input_ids": [11, 12, 13, 21, 22], "labels": [-100, 12, 13, 21, 22], "seq_lens": [3, 2]},
        {"input_ids": [31, 32, 33, 34], "labels": [31, 32, 33, 34], "seq_lens": [4]},
    ]
    batch = PackedCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22], [31, 32, 33, 34, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, 32, 33, 34, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert int(batch["num_real_tokens"]) == 9 and padding_fraction(batch) == pytest.approx(0.1)
    allowed = batch["attention_mask"] == 0
    assert batch["attention_mask"].shape == (2, 1, 5, 5) and batch["attention_mask"].dtype == torch.float32
    assert allowed[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert allowed[1, 0, 4].int().tolist() == [0, 0, 0, 0, 1]  # padding attends only to itself
    assert torch.equal(PackedCollator(mask_dtype=torch.bool)(rows)["attention_mask"], allowed)


@pytest.fixture(scope="module")
def random_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "attn_implementation,mask_dtype",
    [("sdpa", torch.float32), ("sdpa", torch.bool), ("eager", torch.float32)],
)
def test_packed_row_gives_the_logits_of_each_sequence_alone(random_llama, attn_implementation, mask_dtype):
    model = random_llama
    model.config._attn_implementation = attn_implementation
    generator = torch.Generator().manual_seed(1)
    examples = []
    for n in [7, 12, 3, 20, 9, 15, 5, 1]:
        ids = torch.randint(0, 1000, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    rows = pack_examples(examples, seq_len=32)
    assert [r["seq_lens"] for r in rows] == [[20, 12], [15, 9, 7, 1], [5, 3]]
    batch = PackedCollator(mask_dtype=mask_dtype)(rows)

    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        unmasked = model(input_ids=batch["input_ids"]).logits
        worst = 0.0
        for r, row in enumerate(rows):
            start = 0
            for n in row["seq_lens"]:
                alone = model(input_ids=torch.tensor([row["input_ids"][start : start + n]])).logits[0]
                worst = max(worst, (packed[r, start : start + n] - alone).abs().max().item())
                start += n
    assert worst < 1e-5
    assert (unmasked - packed).abs().max() > 0.1  # without the mask, sequences do leak into each other


# --------------------------------------------------------------------------------------------------------- padding


def test_padding_collator_pads_right():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PaddingCollator(pad_token_id=2)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert int(batch["num_real_tokens"]) == 4 and padding_fraction(batch) == pytest.approx(1 / 3)
    assert "labels" not in PaddingCollator()([{"input_ids": [1, 2]}])


def test_group_by_length_and_packing_cut_padding_on_alpaca(smol_tokenizer):
    records = read_records(ALPACA, text_columns=["instruction", "output"])[0]
    examples = tokenize_sft(records, smol_tokenizer, max_length=512)
    assert len(examples) == 1724
    lengths = [len(e["input_ids"]) for e in examples]
    assert sum(lengths) == 186_278 and max(lengths) == 475
    collate = PaddingCollator(pad_token_id=smol_tokenizer.pad_token_id)

    def padding(batches):
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / padded

    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    shuffled = [order[i : i + 8] for i in range(0, len(order), 8)]
    grouped = group_by_length(lengths, batch_size=8)
    assert sorted(i for b in grouped for i in b) == list(range(len(examples)))
    assert padding(shuffled) == pytest.approx(0.4524, abs=1e-4)
    assert padding(grouped) == pytest.approx(0.0083, abs=1e-4)
    batch = collate([examples[i] for i in grouped[0]])
    expected = 1 - sum(lengths[i] for i in grouped[0]) / batch["input_ids"].numel()
    assert padding_fraction(batch) == pytest.approx(expected)

    # the eval loop runs batches in length order and gets results back in the original order
    results = [[lengths[i] for i in b] for b in grouped]
    assert ungroup(grouped, results) == lengths

    rows = pack_examples(examples, seq_len=512)
    packed_padding = 1 - sum(lengths) / (len(rows) * 512)
    assert -(-sum(lengths) // 512) == 364  # lower bound on the number of rows
    assert len(rows) == 370 and packed_padding == pytest.approx(0.0167, abs=1e-4)


# -------------------------------------------------------------------------------------------- classification batches


def test_classification_collator_pads_pairs(minilm_tokenizer):
    records = load_glue(DATA / "glue" / "RTE", "dev").records[:4]
    batch = ClassificationCollator(minilm_tokenizer, max_length=512)(records)
    lengths = [len(minilm_tokenizer(r["text"], r["text_pair"])["input_ids"]) for r in records]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert int(batch["num_real_tokens"]) == sum(lengths)
    assert batch["labels"].tolist() == [r["label"] for r in records] == [1, 0, 1, 1]
    assert batch["token_type_ids"][0].max() == 1  # the second segment is marked
    truncated = ClassificationCollator(minilm_tokenizer, max_length=16)(records)
    assert truncated["input_ids"].shape == (4, 16)
