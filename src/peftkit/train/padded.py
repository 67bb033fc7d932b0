"""What tasks with one padded row (or row group) per example share: the collator call, the example count, and
no special attention implementation (packed batches need one: :class:`peftkit.train.tasks.LMTask`)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Sequence

import torch


class PaddedTask:
    """Mixin: ``self.collator`` turns examples into a batch whose ``labels`` hold one entry per example."""

    mode = "padded"
    collator: Callable[[Sequence[Any]], dict[str, torch.Tensor]]

    def collate(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        return self.collator(examples)

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    @staticmethod
    def attention() -> AbstractContextManager:
        return nullcontext()
