"""Multiple-choice data for rank classification: a prompt, its answer choices, and which one is right.

Records are ``{"prompt": str, "choices": [str, ...], "label": int}``. They come from

- a JSON / JSONL file of your own, one object per question::

      {"prompt": "Is the sky blue? Answer:", "choices": [" yes", " no"], "answer": " yes"}

  ``question`` may stand for ``prompt``; ``answer`` is the right choice's text or its 0-based index (``label`` is
  accepted too). A choice is appended to the prompt as written, so put the space between them where you want it;
- a GLUE task folder, phrased as a question the way T0 / T-Few prompt it (``PHRASINGS``: RTE, MRPC, SST-2, CoLA).

Tokenized, an example is ``{"prompt_ids", "choice_ids": [[...], ...], "label"}``; :class:`ChoiceCollator` lays
out each prompt once and each choice's tokens beside it, so that the model reads a prompt once for all its choices
(``MultipleChoiceTask``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .classification import load_glue
from .readers import LINE, BadRows, OnBadRow, read_records
from .tokenization import IGNORE_INDEX


@dataclass(frozen=True)
class Phrasing:
    """A GLUE task as a question: the prompt built from a record and the choices, in the task's label order."""

    prompt: Callable[[dict[str, Any]], str]
    choices: tuple[str, ...]


PHRASINGS = {
    "rte": Phrasing(lambda r: f"{r['text']}\nQuestion: {r['text_pair']} True or False?\nAnswer:", (" True", " False")),
    "mrpc": Phrasing(lambda r: f"Sentence 1: {r['text']}\nSentence 2: {r['text_pair']}\n"
                               "Question: Do both sentences mean the same thing?\nAnswer:", (" no", " yes")),
    "sst-2": Phrasing(lambda r: f"Review: {r['text']}\nQuestion: Is this review positive or negative?\nAnswer:",
                      (" negative", " positive")),
    "cola": Phrasing(lambda r: f"Sentence: {r['text']}\nQuestion: Is this sentence grammatically acceptable?\nAnswer:",
                     (" no", " yes")),
}


def load_choices(path: str | os.PathLike, split: str = "train", on_bad_row: OnBadRow = "skip") -> tuple[list[dict[str, Any]], BadRows]:
    """Multiple-choice records from a JSON / JSONL file, or from a GLUE folder's ``split`` phrased as a question."""
    path = Path(path)
    if path.is_dir():
        name = path.name.lower()
        if name not in PHRASINGS:
            raise ValueError(f"{path}: no multiple-choice phrasing for GLUE task {path.name!r}; "
                             f"known: {', '.join(PHRASINGS)}, or write a JSONL of prompt/choices/answer records")
        data = load_glue(path, split, on_bad_row=on_bad_row)
        phrasing = PHRASINGS[name]
        records = [{"prompt": phrasing.prompt(r), "choices": list(phrasing.choices), "label": r["label"]} for r in data.records]
        return records, data.bad_rows
    rows, bad = read_records(path, on_bad_row=on_bad_row)
    records = []
    for row in rows:
        record, reason = _choice_record(row)
        if reason:
            bad.reject(row.get(LINE, len(records)), None, reason)
        else:
            records.append(record)
    return records, bad


def _choice_record(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """A record in the canonical shape, or the reason the row cannot be one."""
    prompt = row.get("prompt", row.get("question"))
    choices = row.get("choices")
    answer = row.get("answer", row.get("label"))
    if not isinstance(prompt, str) or not prompt.strip():
        return None, "no 'prompt' (or 'question') text"
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        return None, "'choices' must be a list of at least two non-empty strings"
    if isinstance(answer, bool) or answer is None:
        return None, "no 'answer': give the right choice's text or its 0-based index"
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            return None, f"answer index {answer} is outside the {len(choices)} choices"
        return {"prompt": prompt, "choices": choices, "label": answer}, None
    if isinstance(answer, str) and answer in choices:
        return {"prompt": prompt, "choices": choices, "label": choices.index(answer)}, None
    return None, f"answer {answer!r} is not one of the choices {choices}"


def tokenize_choices(records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Token ids of each prompt (special tokens as the tokenizer adds them) and of each choice (none added).

    A prompt too long for ``max_length`` together with its longest choice loses tokens from its start: the end
    of the prompt, next to the answer, matters most.
    """
    examples = []
    for record in records:
        choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in record["choices"]]
        if not all(choice_ids):
            raise ValueError(f"a choice of {record['choices']} tokenizes to nothing")
        prompt_ids = tokenizer(record["prompt"])["input_ids"]
        room = max_length - max(len(c) for c in choice_ids)
        if room < 1:
            raise ValueError(f"a choice of {record['choices']} is longer than max_length {max_length}")
        examples.append({"prompt_ids": prompt_ids[-room:], "choice_ids": choice_ids, "label": int(record["label"])})
    return examples


class ChoiceCollator:
    """Each example's prompt once (right-padded) and its choices' tokens.

    Output: ``prompt_ids`` / ``prompt_mask`` (B, P); ``prompt_lengths`` (B,); ``choice_labels`` (B, C, T) the choices'
    tokens, -100 past a choice's end; ``labels`` (B,) the right choice; ``num_real_tokens`` the tokens a forward
    reads: every prompt once and every choice but its last token (the last is only predicted). Examples must have
    the same number of choices.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        num_choices = {len(e["choice_ids"]) for e in examples}
        if len(num_choices) != 1:
            raise ValueError(f"examples in one batch have different numbers of choices {sorted(num_choices)}")
        b, c = len(examples), num_choices.pop()
        length = max(len(e["prompt_ids"]) for e in examples)
        longest = max(len(ids) for e in examples for ids in e["choice_ids"])
        prompt_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((b, length), dtype=torch.long)
        choice_labels = torch.full((b, c, longest), IGNORE_INDEX, dtype=torch.long)
        for i, example in enumerate(examples):
            prompt_ids[i, : len(example["prompt_ids"])] = torch.tensor(example["prompt_ids"])
            prompt_mask[i, : len(example["prompt_ids"])] = 1
            for j, ids in enumerate(example["choice_ids"]):
                choice_labels[i, j, : len(ids)] = torch.tensor(ids)
        read = int(prompt_mask.sum()) + sum(len(ids) - 1 for e in examples for ids in e["choice_ids"])
        return {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "prompt_lengths": prompt_mask.sum(1),
            "choice_labels": choice_labels, "labels": torch.tensor([e["label"] for e in examples]),
            "num_real_tokens": torch.tensor(read),
        }
