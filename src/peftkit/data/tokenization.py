"""Tokenization into training examples ``{"input_ids", "labels"}``: instruction records with loss on the response only
(``tokenize_sft``) and long texts cut into causal-LM chunks (``chunk_text``). ``IGNORE_INDEX`` marks labels without
loss."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

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
