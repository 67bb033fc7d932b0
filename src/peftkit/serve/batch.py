"""The running decode batch: one key/value cache shared by rows of different lengths.

Rows are left-aligned to a common cache width L: row b holds its n_b real tokens in the last n_b columns and
padding before them, masked out by ``mask`` (B x L, True where a real token is). Position ids are per row
(``lengths``), so rotary embeddings see each request's own positions, while the causal mask works in cache
columns, which all rows share. That lets requests of any length join and leave between decode steps:

- join: left-pad the shorter of the running cache and the newcomers' cache to the same width, then concatenate
  along the batch axis (masked columns never take part in attention: the softmax gives them weight exactly 0);
- leave: keep the other rows (``index_select``), then drop leading columns that are padding in every row left,
  so the width stays the longest live row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..device import pin


class KVBatch:
    """Key/value cache, padding mask and per-row lengths for the rows currently decoding together, all on the
    model's device (new columns and row indices are made where the mask lives)."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, lengths: torch.Tensor) -> None:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise TypeError(
                    f"the server batches full-attention caches only; this model's cache has a {type(layer).__name__} "
                    "(sliding-window or recurrent layers cannot be left-padded and re-batched this way)"
                )
        self.cache = cache
        self.mask = mask  # (B, L) bool
        self.lengths = lengths  # (B,) long: real tokens per row, i.e. the position id of the next token

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def step_inputs(self, tokens: int = 1) -> dict[str, torch.Tensor]:
        """Mask and positions for feeding ``tokens`` new tokens per row (the cache grows by that many columns): one
        per decode step, or a later chunk of a chunked prefill. Row b's new tokens take positions
        lengths[b] .. lengths[b] + tokens - 1."""
        ones = torch.ones(self.size, tokens, dtype=torch.bool, device=self.mask.device)
        steps = torch.arange(tokens, device=self.lengths.device)
        return {"attention_mask": torch.cat([self.mask, ones], dim=1), "position_ids": self.lengths[:, None] + steps}

    def advance(self, tokens: int = 1) -> None:
        """Account for the columns the last forward appended."""
        ones = torch.ones(self.size, tokens, dtype=torch.bool, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.lengths = self.lengths + tokens

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order), then trim columns that are padding in every remaining row."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        trim = self.width - int(self.mask.sum(dim=1).max()) if rows else self.width  # one sync, when rows leave
        self.mask = self.mask[:, trim:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]

    def extend(self, other: "KVBatch") -> None:
        """Append ``other``'s rows after this batch's, left-padding whichever cache is narrower."""
        width = max(self.width, other.width)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)], dim=0)
        self.lengths = torch.cat([self.lengths, other.lengths])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, dim=2), _pad_left(theirs.keys, width, dim=2)], dim=0)
            mine.values = torch.cat([_pad_left(mine.values, width, dim=2), _pad_left(theirs.values, width, dim=2)], dim=0)


def _pad_left(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [missing, 0]  # F.pad lists the last dimension first
    return F.pad(t, pad)


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) left-padded with ``pad_id``, and the matching bool mask, built on the host and copied to
    ``device`` (default: the CPU) from pinned memory."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = True
    if device is None:
        return ids, mask
    return pin(ids, device), pin(mask, device)
