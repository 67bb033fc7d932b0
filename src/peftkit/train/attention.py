"""Packed attention: causal attention within each sequence of a packed row, through transformers'
AttentionInterface."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "peftkit_packed"


def packed_bounds(seq_lens: Sequence[Sequence[int]], length: int) -> tuple[tuple[int, ...], ...]:
    """Per row, the offsets where its packed sequences start, then ``length`` (the row's end): rows of
    ``pack_examples`` with ``seq_lens`` [3, 4] padded to 9 give (0, 3, 7, 9); padding is one more sequence.

    Computed on the host from the lengths the packer knows, once per batch, and passed to every layer's
    attention as the ``packed_bounds`` keyword (transformers forwards a model's extra keywords to its attention
    function): reading the bounds back from ``position_ids`` on the device would cost one host-device
    synchronisation per row per layer."""
    bounds = []
    for lens in seq_lens:
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        if offsets[-1] < length:
            offsets.append(length)
        bounds.append(tuple(offsets))
    return tuple(bounds)


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_bounds: tuple[tuple[int, ...], ...] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed sequence of a row, between the offsets ``packed_bounds`` gives
    (:func:`packed_bounds`).

    For sequences of lengths L_1..L_n packed in one row, this costs sum_i L_i^2 instead of the (sum_i L_i)^2 of a
    block-diagonal mask, and gives the same result: token t of sequence i attends to tokens of sequence i up to t.
    query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D), as transformers' attention functions return.
    """
    if packed_bounds is None or len(packed_bounds) != query.shape[0]:
        raise RuntimeError(
            f"{type(module).__name__}'s attention got no packed_bounds for its {query.shape[0]} row(s): pass "
            "packed_bounds=packed_bounds(seq_lens, length) to the model's forward (this model needs the 4-D mask "
            "path if it does not forward extra keywords to attention)"
        )
    gqa = key.shape[1] != query.shape[1]
    rows = []
    for b, bounds in enumerate(packed_bounds):
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
