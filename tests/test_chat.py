"""Conversation data: OpenAI and ShareGPT records through the chat template, loss on the assistant's turns only.

The loss positions are checked by decoding exactly the tokens whose label is not -100 and comparing them with the
assistant texts, on SmolLM2's own template and on a tokenizer without one (the built-in ChatML template supplied).
"""

import itertools
import json
import subprocess
import sys

import pytest
import torch

from peftkit.data import (
    IGNORE_INDEX,
    PackedCollator,
    conversation_messages,
    pack_examples,
    render_chat,
    set_chat_template,
    tokenize_conversation,
)
from peftkit.train.task_data import infer_task

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there, what is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course!\nAnything else?"},
]
SHAREGPT = {"conversations": [{"from": "system", "value": "You are terse."}, {"from": "human", "value": "Hi there, what is 2+2?"},
                              {"from": "gpt", "value": "It is 4."}, {"from": "human", "value": "And 3+3?"},
                              {"from": "gpt", "value": "6, of course!\nAnything else?"}]}


def scored_runs(tokenizer, input_ids, labels):
    """The decoded text of every maximal run of positions that carry loss (and those labels equal the inputs)."""
    runs = []
    for scored, group in itertools.groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        group = list(group)
        if scored:
            assert all(i == label for i, label in group)
            runs.append(tokenizer.decode([i for i, _ in group]))
    return runs


def test_smollm2_loss_is_exactly_the_assistant_turns(smollm2):
    _, tokenizer = smollm2
    example = tokenize_conversation(CONVERSATION, tokenizer, 512)
    assert scored_runs(tokenizer, example["input_ids"], example["labels"]) == [
        "It is 4.<|im_end|>", "6, of course!\nAnything else?<|im_end|>"]
    # cutting the text at the span boundaries gives the very tokens of the whole rendered conversation here
    whole = tokenizer(render_chat(tokenizer, CONVERSATION, add_generation_prompt=False), add_special_tokens=False)
    assert example["input_ids"] == whole["input_ids"]
    # and every answer starts exactly where the prompt the model is served at inference ends
    prompt = tokenizer(render_chat(tokenizer, CONVERSATION[:3 - 1], add_generation_prompt=True), add_special_tokens=False)
    n = len(prompt["input_ids"])
    assert example["input_ids"][:n] == prompt["input_ids"] and example["labels"][n - 1] == IGNORE_INDEX
    assert example["labels"][n] != IGNORE_INDEX


def test_sharegpt_is_read_as_the_same_conversation(smollm2):
    _, tokenizer = smollm2
    assert conversation_messages(SHAREGPT) == CONVERSATION
    assert tokenize_conversation(conversation_messages(SHAREGPT), tokenizer, 512) == tokenize_conversation(
        conversation_messages({"messages": CONVERSATION}), tokenizer, 512)


def test_a_tokenizer_without_template_needs_one_and_then_works(tiny_lm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    with pytest.raises(ValueError, match=r"has no chat template: supply one with --chat-template FILE\|NAME"):
        tokenize_conversation(CONVERSATION, tokenizer, 512)
    set_chat_template(tokenizer, "chatml")
    example = tokenize_conversation(CONVERSATION, tokenizer, 512)
    assert scored_runs(tokenizer, example["input_ids"], example["labels"]) == [
        "It is 4.<|im_end|>", "6, of course!\nAnything else?<|im_end|>"]
    assert tokenizer.decode(example["input_ids"]) == render_chat(tokenizer, CONVERSATION, add_generation_prompt=False)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "turn 0: unknown role 'bot' (expected one of system, user, assistant)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "model", "value": "x"}]},
     "turn 1: unknown role 'model' (expected one of system, human, user, gpt, assistant)"),
    ({"messages": [{"role": "assistant", "content": 3}]}, "turn 0 (assistant): 'content' must be text, got int"),
])
def test_bad_conversations_say_what_is_wrong(record, message):
    with pytest.raises(ValueError) as err:
        conversation_messages(record)
    assert str(err.value).startswith(message)


def test_packing_keeps_each_conversations_loss_positions(smollm2):
    _, tokenizer = smollm2
    first = tokenize_conversation(CONVERSATION, tokenizer, 512)
    second = tokenize_conversation([{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}], tokenizer, 512)
    rows = pack_examples([first, second], seq_len=1024)
    assert len(rows) == 1
    batch = PackedCollator(tokenizer.pad_token_id)(rows)
    runs = scored_runs(tokenizer, batch["input_ids"][0].tolist(), batch["labels"][0].tolist())
    assert sorted(runs) == sorted(["It is 4.<|im_end|>", "6, of course!\nAnything else?<|im_end|>", "Blue.<|im_end|>"])
    # position ids restart at each conversation, so each is seen as if alone
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, len(rows[0]["input_ids"]) - rows[0]["seq_lens"][-1]]


def write_chats(path, n=12):
    rows = [{"messages": [{"role": "user", "content": f"Is {i} even?"}, {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}]}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_chat_files_are_recognised_and_bad_rows_named(tmp_path):
    assert infer_task(write_chats(tmp_path / "c.jsonl")) == "sft"
    sharegpt = tmp_path / "s.json"
    sharegpt.write_text(json.dumps([SHAREGPT]))
    assert infer_task(sharegpt) == "sft"

    from peftkit.train import TrainConfig
    from peftkit.train.task_data import _read_conversations

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    config = TrainConfig(data=str(bad), on_bad_row="error")
    with pytest.raises(ValueError) as err:
        _read_conversations(bad, config)
    assert str(err.value) == f"{bad}, line 2: no assistant turn: nothing to learn from (every conversation needs at least one answer)"
    conversations, report = _read_conversations(bad, TrainConfig(data=str(bad)))
    assert conversations == [CONVERSATION] and str(report).startswith(f"{bad}: skipped 1 bad rows, e.g. {bad}, line 2: no assistant turn")


def test_cli_names_the_flag_then_trains_with_a_supplied_template(tmp_path, tiny_lm):
    data = write_chats(tmp_path / "chats.jsonl")
    base = [sys.executable, "-m", "peftkit", "train", "--model", str(tiny_lm), "--data", str(data), "--max-steps", "2",
            "--quiet", "--num-samples", "1", "--sample-tokens", "4"]
    failed = subprocess.run(base + ["--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines()[-1].endswith("has no chat template: supply one with --chat-template FILE|NAME")
    done = subprocess.run(base + ["--out", str(tmp_path / "b"), "--chat-template", "chatml"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    samples = (tmp_path / "b" / "samples.md").read_text()
    assert "<|im_start|>user\nIs " in samples and "<|im_start|>assistant\n" in samples


class ScriptedGenerator(torch.nn.Module):
    """Greedy 'generation' that appends fixed continuations, one per row (mechanics of answer_matches only)."""

    def __init__(self, continuations):
        super().__init__()
        self.continuations = continuations
        self.seen = []
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # tells answer_matches the device

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        self.seen.append((input_ids.tolist(), attention_mask.tolist(), max_new_tokens))
        rows = [ids + c[:max_new_tokens] for ids, c in zip(input_ids.tolist(), self.continuations)]
        return torch.tensor(rows)


def test_answer_matches_are_first_word_exact_matches(smollm2):
    from peftkit.train.generation import answer_matches, first_word

    _, tokenizer = smollm2
    assert [first_word(t) for t in ("Positive.", "  negative, clearly", "", "'Yes'")] == ["positive", "negative", "", "yes"]
    examples = [tokenize_conversation([{"role": "user", "content": f"Review {i}"}, {"role": "assistant", "content": a}], tokenizer, 512)
                for i, a in enumerate(["positive", "negative", "positive"])]
    said = ["Positive!", "The review is negative", "positive"]
    model = ScriptedGenerator([tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * 3 for t in said])
    assert answer_matches(model, tokenizer, examples, batch_size=8) == (2, 3)
    (ids, mask, new_tokens), = model.seen
    # left-padded prompts that end exactly where the answer starts; the longest answer's tokens + 1 are generated
    prompt_lens = [e["labels"].index(next(x for x in e["labels"] if x != IGNORE_INDEX)) for e in examples]
    assert [sum(m) for m in mask] == prompt_lens and all(row[-n:] == e["input_ids"][:n] for row, n, e in zip(ids, prompt_lens, examples))
    assert new_tokens == max(len(tokenizer("positive<|im_end|>", add_special_tokens=False)["input_ids"]),
                             len(tokenizer("negative<|im_end|>", add_special_tokens=False)["input_ids"])) + 1
    long = [tokenize_conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": "two words"}], tokenizer, 512)]
    assert answer_matches(model, tokenizer, long, batch_size=8) is None  # free text: no exact match to score
