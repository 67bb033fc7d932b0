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
