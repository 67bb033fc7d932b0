"""Greedy generation for sample outputs and ``peftkit generate``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..device import Precision, to_device

@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate_texts(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, adapter_names: list[str] | None = None,
    precision: Precision | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` in one left-padded batch (``adapter_names``: one adapter per prompt), on
    the model's device, under ``precision``'s autocast (None: float32)."""
    was_training = model.training
    model.eval()
    try:
        with _left_padding(tokenizer):
            inputs = tokenizer(list(prompts), return_tensors="pt", padding=True)
        kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
        device = next(model.parameters()).device
        inputs = to_device(dict(inputs), device)
        with (precision or Precision(torch.float32, "default")).autocast(device):
            out = model.generate(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id, **kwargs,
            )
        return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)


def first_word(text: str) -> str:
    """The first word of a text, lower-cased, without surrounding punctuation ("Positive." -> "positive")."""
    words = text.split()
    return words[0].strip(".,;:!?\"'()[]").lower() if words else ""


def answer_spans(examples: Sequence[dict[str, list[int]]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each example: the tokens before its first scored label, and that run of labels."""
    spans = []
    for example in examples:
        labels = example["labels"]
        start = next((i for i, label in enumerate(labels) if label != -100), len(labels))
        end = next((i for i in range(start, len(labels)) if labels[i] == -100), len(labels))
        spans.append((example["input_ids"][:start], labels[start:end]))
    return spans


@torch.no_grad()
def answer_matches(
    model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, list[int]]], batch_size: int,
    precision: Precision | None = None,
) -> tuple[int, int] | None:
    """(answers whose first generated word matches the reference, answers) for examples whose answer is one word
    (a label phrased as text: "positive", "entailment", ...); ``None`` when some answer is longer (free text has
    no exact match to score).

    Each example's prompt is its tokens before the first scored label, exactly what training conditioned on; greedy
    decoding runs for the longest answer's token count plus one, enough for the word and what ends it. Inputs go to
    the model's device and run under ``precision``'s autocast, as training's forward passes do.
    """
    spans = answer_spans(examples)
    references = [tokenizer.decode(answer, skip_special_tokens=True) for _, answer in spans]
    if not spans or any(len(r.split()) != 1 or not prompt for r, (prompt, _) in zip(references, spans)):
        return None
    new_tokens = max(len(answer) for _, answer in spans) + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(spans), batch_size):
        prompts = [prompt for prompt, _ in spans[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with (precision or Precision(torch.float32, "default")).autocast(device):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad)
        for row, reference in zip(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True),
                                  references[start : start + batch_size]):
            correct += first_word(row) == first_word(reference)
    return correct, len(spans)
