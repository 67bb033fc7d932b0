"""The running decode batch: one key/value cache shared by rows of different lengths.

Rows are left-aligned to a common cache width L: row b holds its n_b real tokens in the last n_b columns and
padding before them, masked out by ``mask`` (B x L, True where a real token is). Position ids are per row
(``lengths``), so rotary embeddings see each request's own positions, while the causal mask works in cache
columns, which all rows share. That lets requests of any length join and leave between decode steps:

- join: left-pad the narrower of the running cache and the newcomers' cache to the same width, then put the
  newcomers' rows after the running ones (masked columns never take part in attention: the softmax gives them
  weight exactly 0, so padding only has to be finite, and is written as zeros);
- leave: the last rows move into the places of the rows that left, then leading columns that are padding in every
  row left are dropped, so the width stays the longest live row.

Each layer's keys and values live in a :class:`SlabLayer`: storage with spare rows and columns, of which the
batch is a view. A decode step writes its one new column in place, a join writes the newcomers' rows, a leave
moves one row per row that left. Storage is reallocated only when it runs out: rows double (up to the batch's
largest size), columns get a quarter of the width spare, so once every so many steps the window, sliding right as
rows leave, is copied back to the start. Before, each decode step concatenated every layer's whole cache into new
tensors, and each join and leave copied it all again: 5-9% of a server's scheduler thread under a 64-adapter
load (py-spy), and a steady churn of multi-megabyte allocations.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..device import pin


def spare_columns(width: int) -> int:
    """Columns a slab makes free after ``width`` live ones when it reallocates: a quarter of the width (at least
    16), so it reallocates once per that many steps (copying the cache once: amortized, 4 columns per step instead
    of all of them) and holds at most 1.25x the live cache plus 16 columns."""
    return max(16, width // 4)


class SlabLayer(DynamicLayer):
    """One layer's cache as a view ``keys = storage[:rows, :, start:end]`` (values alike) of storage with room to
    grow; transformers' attention reads it as any :class:`DynamicLayer` (``update`` returns the views)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.heads, self.dim = keys.shape[1], keys.shape[3]
        # a prefill's own tensors become the storage, without spare room: most newcomers' rows are joined to the
        # running batch right away, and the running batch makes room at its first step
        self._k, self._v = keys.contiguous(), values.contiguous()
        self.rows, self.start, self.end = keys.shape[0], 0, keys.shape[2]
        self._views()

    @property
    def width(self) -> int:
        return self.end - self.start

    def _views(self) -> None:
        self.keys = self._k[: self.rows, :, self.start : self.end]
        self.values = self._v[: self.rows, :, self.start : self.end]

    def _relayout(self, rows: int, left: int, right: int, max_rows: int | None = None) -> None:
        """New storage for at least ``rows`` rows (doubling, up to ``max_rows`` when given), with the live columns
        moved to start at ``left`` and room for ``right`` more after them (plus :func:`spare_columns`)."""
        old_k, old_v, width = self._k, self._v, self.width
        row_cap = old_k.shape[0]
        if rows > row_cap:
            row_cap = max(rows, min(2 * row_cap, max_rows or 2 * row_cap))
        cols = left + width + right + spare_columns(left + width + right)
        self._k = torch.empty(row_cap, self.heads, cols, self.dim, dtype=self.dtype, device=self.device)
        self._v = torch.empty(row_cap, self.heads, cols, self.dim, dtype=self.dtype, device=self.device)
        self._k[: self.rows, :, left : left + width] = old_k[: self.rows, :, self.start : self.end]
        self._v[: self.rows, :, left : left + width] = old_v[: self.rows, :, self.start : self.end]
        self.start, self.end = left, left + width

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states`` (rows, heads, n, dim) as n new columns of every row; the whole live cache back."""
        n = key_states.shape[2]
        if key_states.shape[0] != self.rows:
            raise ValueError(f"the cache holds {self.rows} rows but {key_states.shape[0]} rows of new keys came")
        if self.end + n > self._k.shape[2]:
            self._relayout(self.rows, 0, n)
        self._k[: self.rows, :, self.end : self.end + n] = key_states
        self._v[: self.rows, :, self.end : self.end + n] = value_states
        self.end += n
        self._views()
        return self.keys, self.values

    def join(self, keys: torch.Tensor, values: torch.Tensor, width: int, max_rows: int | None = None) -> None:
        """Add ``keys``' rows (right-aligned, left-padded with zeros) after this layer's, both at ``width`` columns
        (at least either's own width); ``max_rows``: the most rows this cache will hold (room is made up to it)."""
        rows = self.rows + keys.shape[0]
        if rows > self._k.shape[0] or self.end - width < 0:
            self._relayout(rows, width - self.width, 1, max_rows)
        start = self.end - width
        for store, new in ((self._k, keys), (self._v, values)):
            store[: self.rows, :, start : self.start] = 0  # the running rows' new padding
            store[self.rows : rows, :, start : self.end - new.shape[2]] = 0
            store[self.rows : rows, :, self.end - new.shape[2] : self.end] = new
        self.rows, self.start = rows, start
        self._views()

    def move_rows(self, moves: list[tuple[int, int]], rows: int, trim: int) -> None:
        """Copy row ``source`` into row ``target`` for each (source, target), keep the first ``rows`` rows and drop
        the first ``trim`` columns."""
        for source, target in moves:
            self._k[target, :, self.start : self.end] = self._k[source, :, self.start : self.end]
            self._v[target, :, self.start : self.end] = self._v[source, :, self.start : self.end]
        self.rows, self.start = rows, self.start + trim
        self._views()


class KVBatch:
    """Key/value cache, padding mask and per-row lengths for the rows currently decoding together, all on the
    model's device (new columns and row indices are made where the mask lives). ``cache``: a fresh prefill's
    :class:`DynamicCache`; its layers are replaced by :class:`SlabLayer` s holding the same keys and values."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, lengths: torch.Tensor) -> None:
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:
                raise TypeError(
                    f"the server batches full-attention caches only; this model's cache has a {type(layer).__name__} "
                    "(sliding-window or recurrent layers cannot be left-padded and re-batched this way)"
                )
        cache.layers = [SlabLayer(layer.keys, layer.values) for layer in cache.layers]
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

    def drop(self, rows: set[int]) -> list[int]:
        """Remove ``rows``: the last remaining rows move into their places (one row copied per row removed, not
        every row after it), then columns that are padding in every remaining row are trimmed. Returns the former
        index of each remaining row, in its new order (the caller reorders its own per-row state alike)."""
        keep = self.size - len(rows)
        holes = sorted(r for r in rows if r < keep)
        movers = [r for r in range(keep, self.size) if r not in rows]
        order = list(range(self.size))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        order = order[:keep]
        index = torch.tensor(order, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        trim = self.width - int(self.mask.sum(dim=1).max()) if keep else self.width  # one sync, when rows leave
        self.mask = self.mask[:, trim:]
        moves = list(zip(movers, holes))
        for layer in self.cache.layers:
            layer.move_rows(moves, keep, trim)
        return order

    def extend(self, other: "KVBatch", max_rows: int | None = None) -> None:
        """Append ``other``'s rows after this batch's, left-padding whichever cache is narrower; ``max_rows``: the
        most rows this batch will hold (growing storage doubles its rows up to that)."""
        width = max(self.width, other.width)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)], dim=0)
        self.lengths = torch.cat([self.lengths, other.lengths])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.join(theirs.keys, theirs.values, width, max_rows)


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[1]
    return t if missing == 0 else torch.nn.functional.pad(t, [missing, 0])


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
