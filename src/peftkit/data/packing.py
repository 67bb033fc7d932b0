"""Packing: several examples per row instead of padding each one (``pack_examples``), and the collator that keeps the
packed sequences apart in attention, positions and loss (``PackedCollator``)."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .tokenization import IGNORE_INDEX


def pack_examples(examples: Sequence[dict[str, list[int]]], seq_len: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most ``seq_len`` tokens, instead of padding each one.

    Best-fit decreasing: longest example first, each into the open row with the least room that still fits it.
    A row is ``{"input_ids", "labels", "seq_lens"}``: the concatenated examples and their lengths, in order.
    Shuffle the rows, not the examples, for training.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[dict[str, list[int]]]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted, so bisect finds the best fit
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than seq_len={seq_len}; tokenize with max_length")
        j = bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(examples[i])
        if room > n:
            insort(free, (room - n, r))
    return [
        {
            "input_ids": [t for e in row for t in e["input_ids"]],
            "labels": [t for e in row for t in e["labels"]],
            "seq_lens": [len(e["input_ids"]) for e in row],
        }
        for row in rows
    ]


@dataclass
class PackedCollator:
    """Batch rows from ``pack_examples`` so that no token sees, or is scored across, a sequence boundary.

    Rows are right-padded to the longest. Returns
      - ``input_ids``, ``labels`` (B, L): labels are -100 at every packed sequence's first position (the shifted
        loss would otherwise score the previous sequence's last token predicting it) and on padding;
      - ``position_ids`` (B, L): restart at 0 for every packed sequence, as if it were alone;
      - ``attention_mask`` (B, 1, L, L): block-diagonal causal, query i may attend key j iff j <= i and both are in
        the same sequence (padding forms one more block, so no row is fully masked);
      - ``num_real_tokens``.

    transformers (5.x, ``masking_utils``) passes a 4-D ``attention_mask`` through to attention unchanged. The default
    float mask (0 = attend, dtype min = blocked) is added to the scores, which both the "sdpa" and "eager" attention
    paths accept; ``mask_dtype=torch.bool`` (True = attend) is smaller but only right for sdpa and flex attention:
    eager attention adds the mask to the scores, and adding a boolean mask silently blocks nothing. A float mask
    must have the model's dtype.
    """

    pad_token_id: int = 0
    mask_dtype: torch.dtype = torch.float32

    def __call__(self, rows: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((len(rows), length), dtype=torch.long)
        segment_ids = torch.empty((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[b, :n] = torch.tensor(row["input_ids"])
            labels[b, :n] = torch.tensor(row["labels"])
            lens = torch.tensor(list(row["seq_lens"]) + ([length - n] if length > n else []))
            starts = lens.cumsum(0) - lens
            segment_ids[b] = torch.repeat_interleave(torch.arange(len(lens)), lens)
            position_ids[b] = torch.arange(length) - starts[segment_ids[b]]
            labels[b, starts[: len(row["seq_lens"])]] = IGNORE_INDEX

        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
        allowed = allowed[:, None]  # one mask for all heads
        if self.mask_dtype == torch.bool:
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape, dtype=self.mask_dtype).masked_fill(
                ~allowed, torch.finfo(self.mask_dtype).min
            )
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": mask,
            "num_real_tokens": torch.tensor(sum(len(row["input_ids"]) for row in rows)),
        }
