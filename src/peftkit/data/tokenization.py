"""Tokenization into training examples ``{"input_ids", "labels"}``: instruction records with loss on the response only
(``tokenize_sft``), conversations with loss on the assistant's turns only (``tokenize_conversations``, see :mod:`.chat`) and long texts cut into causal-LM chunks (``chunk_text``). ``IGNORE_INDEX`` marks labels without
loss."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from .chat import assistant_spans
from .prompts import Template, render_prompt

IGNORE_INDEX = -100


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
    _warn_dropped("tokenize_sft", len(records) - len(examples), len(records), f"records whose prompt fills max_length={max_length}")
    return examples


def _warn_dropped(source: str, dropped: int, total: int, what: str) -> None:
    """One warning for the examples a tokenizer function left out, naming the function and why."""
    if dropped:
        warnings.warn(f"{source}: dropped {dropped} of {total} {what}", stacklevel=3)


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


def tokenize_conversation(messages: Sequence[dict[str, str]], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one conversation: labels are the token ids inside assistant spans (answer and
    end-of-turn token), -100 elsewhere; truncated on the right to ``max_length``."""
    text, spans = assistant_spans(tokenizer, messages)
    cuts = sorted({0, len(text), *(c for span in spans for c in span)})
    pieces = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    ids_per_piece = tokenizer([text[a:b] for a, b in pieces], add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    labels: list[int] = []
    for (a, _), ids in zip(pieces, ids_per_piece):
        scored = any(s <= a < e for s, e in spans)
        input_ids += ids
        labels += ids if scored else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def tokenize_conversations(
    conversations: Sequence[Sequence[dict[str, str]]], tokenizer: Any, max_length: int
) -> list[dict[str, list[int]]]:
    """:func:`tokenize_conversation` for each; those left with no assistant token after truncation are dropped,
    with a warning."""
    examples = [tokenize_conversation(m, tokenizer, max_length) for m in conversations]
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    _warn_dropped("tokenize_conversations", len(examples) - len(kept), len(examples),
                  f"conversations with no assistant token within max_length={max_length}")
    return kept
