"""Padded batches: collators that pad token examples (``PaddingCollator``) or tokenize and pad classification records
(``ClassificationCollator``), the padding share of a batch, and length-grouped evaluation batches with their inverse."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .tokenization import IGNORE_INDEX

T = TypeVar("T")


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
