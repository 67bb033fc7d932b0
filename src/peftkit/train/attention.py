"""Packed attention: causal attention within each sequence of a packed row, through transformers'
AttentionInterface."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "peftkit_packed"


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed sequence of a row, found where ``position_ids`` restart.

    For sequences of lengths L_1..L_n packed in one row, this costs sum_i L_i^2 instead of the (sum_i L_i)^2 of a
    block-diagonal mask, and gives the same result: token t of sequence i attends to tokens of sequence i up to t.
    query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D), as transformers' attention functions return.
    """
    if position_ids is None:
        raise RuntimeError(
            f"{type(module).__name__} did not pass position_ids to its attention function, so packed sequences cannot "
            "be told apart; this model needs the 4-D mask path (peftkit.train falls back to it for such models)"
        )
    positions = position_ids.expand(query.shape[0], -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    gqa = key.shape[1] != query.shape[1]
    rows = []
    for b, row_starts in enumerate(starts):
        bounds = row_starts.nonzero().flatten().tolist() + [query.shape[2]]
        pieces = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                dropout_p=dropout if module.training else 0.0, is_causal=True, scale=scaling, enable_gqa=gqa,
            )
            for s, e in zip(bounds[:-1], bounds[1:])
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register_packed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def supports_packed_attention(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers model) dispatches attention through transformers' AttentionInterface."""
    return bool(getattr(model, "_supports_attention_backend", False)) and hasattr(getattr(model, "config", None), "_attn_implementation")


@contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with attention implementation ``name`` inside the block (restored after)."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
