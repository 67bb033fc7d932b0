"""Fused steps: newcomers' prompts in the same forward as the running rows' next tokens.

A prompt prefilled in a forward of its own reads every weight of the model once more, and stalls the running rows
for that forward. On a 2-core CPU, with 14 rows of six methods decoding on SmolLM2-135M (MKL_CBWR=AUTO), a 38-token
prompt cost 83 ms in a prefill of its own and 63 ms inside the decode step, and a second one 60 ms more (the
prompt's own compute dominates on this CPU). A fused step feeds the model one flat sequence: the B decode rows'
next tokens, then each newcomer's whole prompt,

    input_ids (1, B + L_1 + ... + L_n),  position_ids: each token's own position in its request,

so every linear layer (and every adapter: the mixed batch is per token here, :class:`~peftkit.tuners.layer.
MixedBatch`) runs once over all of them. Only attention needs to know which token is whose: the forward runs
with this module's attention function (registered with transformers' ``AttentionInterface``), which attends the
decode tokens over the running batch's cache (through its padding mask) and each newcomer causally over its own,
each part with transformers' own SDPA attention, and the :class:`FusedCache` handed to the model routes each
layer's new keys and values to the cache they belong to.

Prompt- and prefix-tuning rows fuse too (their adapters have no layers: their tokens are the base model's). A
newcomer's virtual front (:mod:`peftkit.tuners.mixed_prompts`) goes where it would go in a prefill of its own: a
prompt-tuning newcomer's n virtual embeddings are the first n tokens of its part of the sequence (filler ids whose
embeddings are swapped for them), positions 0..n-1 and its text from n; a prefix-tuning newcomer's n key/value
columns are in its fresh cache before the forward, its tokens attend over them and causally over each other, and its
text starts at position n (:func:`flat_step` lays the sequence out). Running rows of both have their fronts in the
batch's cache already.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

RAGGED = "peftkit_fused"  # the attention implementation's registered name


@dataclass
class FusedLayout:
    """Who owns which tokens of a fused forward: the first ``rows`` are one decode token each of ``batch_cache``'s
    rows (``batch_mask``: its (rows, width + 1) mask, the new column included), then each newcomer's prompt, in
    order, ``lengths[j]`` tokens into the fresh ``caches[j]``. ``fronts[j]``: newcomer j's (prompt-tuning virtual
    tokens, the first of its ``lengths[j]``; prefix-tuning key/value columns, put in ``caches[j]`` before the forward),
    (0, 0) for every newcomer when not given."""

    rows: int
    batch_cache: DynamicCache | None
    batch_mask: torch.Tensor | None
    lengths: list[int]
    caches: list[DynamicCache]
    fronts: list[tuple[int, int]] = field(default_factory=list)
    attended: int = 0  # layers whose attention ran through fused_attention (checked after the forward)
    starts: list[int] = field(init=False)  # where each newcomer's tokens start in the flat sequence (every layer asks)

    def __post_init__(self) -> None:
        self.fronts = self.fronts or [(0, 0)] * len(self.lengths)
        if len(self.fronts) != len(self.lengths) or len(self.caches) != len(self.lengths):
            raise ValueError(f"a fused layout needs one cache and one front per newcomer: {len(self.lengths)} newcomers, "
                             f"{len(self.caches)} caches, {len(self.fronts)} fronts")
        self.starts = [self.rows + sum(self.lengths[:j]) for j in range(len(self.lengths))]


def flat_step(decode_ids: list[int], decode_positions: torch.Tensor, contexts: list[list[int]],
              fronts: list[tuple[int, int]], filler: int) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
    """A fused step's flat sequence: the running rows' next tokens (``decode_ids``, at ``decode_positions``), then
    each newcomer's ``contexts[j]`` behind its front ``fronts[j]`` = (prompt-tuning virtual tokens, prefix-tuning
    columns), laid out as the module docstring says (``filler``: the id standing in for a virtual token).

    Returns input ids (1, T) and position ids (1, T) (on ``decode_positions``' device), each newcomer's length in the
    sequence (its virtual tokens included: :attr:`FusedLayout.lengths`), and the indices whose logits the step keeps:
    every decode token, then each newcomer's last."""
    ids, positions, lengths = list(decode_ids), [decode_positions], []
    for context, (prompt, prefix) in zip(contexts, fronts):
        ids += [filler] * prompt + list(context)
        lengths.append(prompt + len(context))
        positions.append(torch.arange(prefix, prefix + lengths[-1], device=decode_positions.device))
    ends = torch.tensor(lengths, dtype=torch.long).cumsum(0) + len(decode_ids) - 1
    keep = torch.cat([torch.arange(len(decode_ids)), ends])
    return torch.tensor([ids], dtype=torch.long), torch.cat(positions)[None], lengths, keep


class FusedCache(DynamicCache):
    """The cache the model sees in a fused forward: each layer's new keys and values (1, heads, tokens, dim) are
    split by :class:`FusedLayout` and appended to the decode batch's cache and to each newcomer's own."""

    def __init__(self, layout: FusedLayout, config: Any) -> None:
        super().__init__(config=config)
        self.layout = layout

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layout = self.layout
        if layout.rows:
            assert layout.batch_cache is not None
            keys = key_states[0, :, : layout.rows].transpose(0, 1).unsqueeze(2)  # (rows, heads, 1, dim)
            values = value_states[0, :, : layout.rows].transpose(0, 1).unsqueeze(2)
            layout.batch_cache.layers[layer_idx].update(keys, values)
        for start, length, cache in zip(layout.starts, layout.lengths, layout.caches):
            cache.update(key_states[:, :, start : start + length], value_states[:, :, start : start + length], layer_idx)
        return key_states, value_states  # (unused: fused_attention reads each part's own cache)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def fused_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, *, fused: FusedLayout | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of a fused forward (see the module docstring); query (1, heads, tokens, dim), output (1, tokens,
    heads, dim) as transformers' attention functions return it. Without a layout: plain SDPA."""
    if fused is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer = module.layer_idx
    fused.attended += 1
    parts = []
    if fused.rows:
        assert fused.batch_cache is not None and fused.batch_mask is not None
        cached = fused.batch_cache.layers[layer]
        q = query[0, :, : fused.rows].transpose(0, 1).unsqueeze(2)  # (rows, heads, 1, dim)
        out, _ = sdpa_attention_forward(module, q, cached.keys, cached.values, fused.batch_mask[:, None, None, :],
                                        is_causal=False, **kwargs)
        parts.append(out.reshape(1, fused.rows, *out.shape[2:]))  # (1, rows, heads, dim)
    for start, length, cache, (_, prefix) in zip(fused.starts, fused.lengths, fused.caches, fused.fronts):
        own = cache.layers[layer]
        # causal over its own tokens; a prefix-tuning newcomer's tokens also see all of its prefix columns (an explicit
        # mask: SDPA's is_causal aligns to the top left, and transformers then drops the keys past the queries)
        mask = None
        if prefix:
            mask = torch.ones(length, prefix + length, dtype=torch.bool, device=query.device).tril(prefix)[None, None]
        out, _ = sdpa_attention_forward(module, query[:, :, start : start + length], own.keys, own.values, mask,
                                        is_causal=not prefix, **kwargs)
        parts.append(out)
    return torch.cat(parts, dim=1), None


AttentionInterface.register(RAGGED, fused_attention)


class LayoutIgnored(RuntimeError):
    """The model's attention did not go through :func:`fused_attention`: its fused steps can never be trusted."""


class FusionGate:
    """Whether the next step may be fused (asked by the scheduler's thread before each step that could be).

    A model that cannot take fused steps (attention that ignores the layout, :class:`LayoutIgnored`; a forward that
    refuses the ``fused`` argument, ``TypeError``) is never fused again. Any other failure, say out of memory under
    a burst, pauses fusion for ``pause`` candidate steps, doubling with each failure in a row, and ``max_failures``
    in a row turn it off for good: a transient failure costs a few prefills apart instead of the speed-up until
    restart, and a step that keeps failing is not retried forever. (Each failed step costs a recovery: its rows
    are prefilled again, see the scheduler.)"""

    def __init__(self, pause: int = 16, max_failures: int = 4) -> None:
        self.pause, self.max_failures = pause, max_failures
        self.failures = 0  # in a row
        self.paused = 0  # candidate steps still to prefill apart
        self.off = False

    def open(self) -> bool:
        """Whether this candidate step may be fused (a paused gate counts the step towards reopening)."""
        if self.off:
            return False
        if self.paused:
            self.paused -= 1
            return False
        return True

    def failed(self, err: Exception) -> None:
        self.failures += 1
        if isinstance(err, (LayoutIgnored, TypeError)) or self.failures >= self.max_failures:
            self.off = True
        else:
            self.paused = self.pause * 2 ** (self.failures - 1)

    def succeeded(self) -> None:
        self.failures = 0


@contextmanager
def fused_attention_on(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s attention through :func:`fused_attention` inside the block (the scheduler thread is the only
    one running the model, so switching its config for one forward is safe)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = RAGGED
    try:
        yield
    finally:
        config._attn_implementation = before
