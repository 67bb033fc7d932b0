"""Prompt- and prefix-tuning rows in mixed-adapter batches: each row's own virtual front.

Layer methods (LoRA, (IA)^3, bottleneck) mix per row inside their layers (:class:`~peftkit.tuners.layer.
StackedAdapterLayer`). Prompt and prefix tuning act on the inputs instead: a prompt-tuning row needs its n virtual
embeddings before its tokens, a prefix-tuning row its n key/value columns in the cache before them, other rows
nothing. One batch holds them all by giving every row a front of the same width, masked where the row has no virtual
column (P: the longest prefix in the batch, Q: the longest prompt; each front is right-aligned):

    cache columns   [ prefix front (P)   | prompt front (Q)   | the input (L)  ]
    prefix row      [ 0 .. 0  its prefix | 0 ............ 0   | its tokens     ]
    prompt row      [ 0 ............. 0  | 0 .. 0  its prompt | its tokens     ]
    other rows      [ 0 ............. 0  | 0 ............ 0   | its tokens     ]

Each row's position ids count its unmasked columns from 0 (``cumsum(mask) - 1``, or the caller's positions shifted
by the row's virtual count, as each method shifts them alone): a prompt row numbers its virtual tokens 0..n-1 and its
text from n, a prefix row its text from n, other rows their text from 0 whatever the padding, which is how HF PEFT
numbers them for one adapter. Masked columns get softmax weight exactly 0, so every row's real tokens see what they
see served alone. The fronts are built only on a fresh cache; later calls (decoding, later prefill chunks) find the
virtual columns in the cache and pass a mask covering them (:func:`cache_mask`).

The forward returns logits for the input's columns only (batch x L, aligned with ``input_ids`` whatever the rows'
methods); hidden states and attentions, when asked for, cover the front too. Decoder-only models only: an encoder's
pooler reads the first column, which the fronts move (refused); a decoder's sequence classifier, given embeddings,
reads the last column, so its input must be left-padded (refused otherwise). ``labels`` are refused (each row's
front would shift the loss differently): compute the loss from the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..families import is_encoder, model_type_of
from ..hf_compat import find_cache, with_cache
from .base import tuner_for
from .prefix import PrefixTuningTuner, cache_dtype, prefix_keys_values
from .prompt import PromptTuningTuner, cache_is_filled, extend_front, input_batch

_WHAT = "a mixed batch with prompt- or prefix-tuning rows"


@dataclass(frozen=True)
class Fronts:
    """Per row of a mixed batch: its adapter, and how many prompt-tuning and prefix-tuning columns it gets."""

    names: tuple[str, ...]
    prompt: tuple[int, ...]
    prefix: tuple[int, ...]

    @classmethod
    def plan(cls, peft_model: nn.Module, adapter_names: list[str]) -> "Fronts | None":
        """The fronts ``adapter_names`` asks for, or None when no row is prompt or prefix tuning."""
        prompt, prefix = [], []
        for name in adapter_names:
            config = peft_model.peft_config.get(name)  # None for the base
            tuner = tuner_for(config) if config is not None else None
            prompt.append(config.num_virtual_tokens if isinstance(tuner, PromptTuningTuner) else 0)
            prefix.append(config.num_virtual_tokens if isinstance(tuner, PrefixTuningTuner) else 0)
        if not any(prompt) and not any(prefix):
            return None
        return cls(tuple(adapter_names), tuple(prompt), tuple(prefix))

    @property
    def prefix_width(self) -> int:
        return max(self.prefix)

    @property
    def prompt_width(self) -> int:
        return max(self.prompt)

    def front_mask(self, like: torch.Tensor) -> torch.Tensor:
        """(batch, P + Q) ones where a row has a virtual column, in ``like``'s dtype and device."""
        P, Q = self.prefix_width, self.prompt_width
        column = torch.arange(P + Q, device=like.device)
        prefix = torch.tensor(self.prefix, device=like.device)[:, None]
        prompt = torch.tensor(self.prompt, device=like.device)[:, None]
        front = ((column < P) & (column >= P - prefix)) | (column >= P + Q - prompt)
        return front.to(like.dtype)

    def mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mask of every column the cache holds after the fronts and the input: (batch, P + Q + L)."""
        return torch.cat((self.front_mask(attention_mask), attention_mask), dim=1)

    def counts(self, device: torch.device) -> torch.Tensor:
        """Each row's virtual columns (a row has prompt or prefix columns, never both)."""
        return torch.tensor([a + b for a, b in zip(self.prompt, self.prefix)], dtype=torch.long, device=device)

    def positions(self, full_mask: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """Position ids of the prompt front and the input, (batch, Q + L): virtual tokens 0..n-1, then the caller's
        positions shifted by the row's virtual count, or (none given) the row's unmasked columns counted from 0."""
        counted = (full_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, self.prefix_width :]
        if position_ids is None:
            return counted
        shifted = position_ids + self.counts(position_ids.device).to(position_ids.dtype)[:, None]
        return torch.cat((counted[:, : self.prompt_width].to(position_ids.dtype), shifted), dim=1)

    def prompt_embeddings(self, peft_model: nn.Module, like: torch.Tensor) -> torch.Tensor:
        """(batch, Q, dim): each prompt row's virtual embeddings right-aligned, zeros elsewhere, in ``like``'s dtype."""
        Q = self.prompt_width
        front = like.new_zeros(like.shape[0], Q, like.shape[-1])
        tuner = tuner_for("PROMPT_TUNING")
        for row, (name, count) in enumerate(zip(self.names, self.prompt)):
            if count:
                front[row, Q - count :] = tuner.encoder(peft_model.base_model, name)().to(like.dtype)
        return front

    def fill_prefixes(self, peft_model: nn.Module, cache: Any, device: torch.device) -> None:
        """Put each prefix row's keys and values (right-aligned, zeros in other rows) into the empty ``cache``."""
        model = peft_model.base_model
        P, batch, dtype = self.prefix_width, len(self.names), cache_dtype(model)
        tuner = tuner_for("PREFIX_TUNING")
        stacked = None
        for row, (name, count) in enumerate(zip(self.names, self.prefix)):
            if not count:
                continue
            kv = prefix_keys_values(tuner.encoder(model, name)(), peft_model.peft_config[name], dtype)
            if stacked is None:  # (2 * layers, batch, heads, P, head_dim)
                stacked = kv.new_zeros(kv.shape[0], batch, kv.shape[1], P, kv.shape[3]).to(device)
            stacked[:, row, :, P - count :] = kv.to(device)
        assert stacked is not None
        for layer in range(stacked.shape[0] // 2):
            cache.update(stacked[2 * layer], stacked[2 * layer + 1], layer)

    def model_inputs(self, peft_model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The base model's keyword arguments for a first forward on a fresh cache: embeddings with the prompt
        front, the mask and positions over the fronts, the cache holding the prefixes."""
        model = peft_model.base_model
        kwargs = dict(kwargs)
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)  # inside the mixed batch: per-row LoRA embeddings apply
        batch, length = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        full = self.mask(mask)
        kwargs["position_ids"] = self.positions(full, kwargs.get("position_ids"))
        kwargs["attention_mask"] = full
        kwargs["inputs_embeds"] = torch.cat((self.prompt_embeddings(peft_model, embeds), embeds), dim=1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = extend_front(kwargs["token_type_ids"], self.prompt_width, 0)
        if self.prefix_width:
            cache = find_cache(kwargs)
            if cache is None:
                from transformers import DynamicCache

                cache = DynamicCache(config=model.config)
            self.fill_prefixes(peft_model, cache, embeds.device)
            kwargs = with_cache(kwargs, model, cache)
        return kwargs


def cache_mask(peft_model: nn.Module, adapter_names: list[str], attention_mask: torch.Tensor) -> torch.Tensor:
    """The mask of every column the cache holds after a first mixed forward over inputs masked by
    ``attention_mask`` (the fronts, then the input): what the next steps' masks extend, its row sums their positions."""
    fronts = Fronts.plan(peft_model, adapter_names)
    return attention_mask if fronts is None else fronts.mask(attention_mask)


def forward(peft_model: nn.Module, adapter_names: list[str], args: tuple, kwargs: dict[str, Any]) -> Any:
    """The base model's forward for a mixed batch (inside :meth:`PeftModel._mixed_batch`), with the virtual fronts
    on a fresh cache; logits trimmed to the input's columns."""
    model = peft_model.base_model
    fronts = Fronts.plan(peft_model, adapter_names)
    if fronts is None:
        return model(*args, **kwargs)
    if cache_is_filled(kwargs):  # the fronts are in the cache already (passed under the name this version reads)
        return model(*args, **with_cache(kwargs, model, find_cache(kwargs)))
    if args:
        raise TypeError(f"{_WHAT} rewrites the inputs: pass input_ids=... (or inputs_embeds=...) by keyword")
    if is_encoder(model_type_of(model)):
        raise ValueError(
            f"{_WHAT} needs a decoder-only model; {model_type_of(model)} is an encoder, whose first column (what its "
            "pooler reads) the shared virtual fronts would move. Run these adapters one at a time (set_adapter)"
        )
    length = input_batch(kwargs, _WHAT)[1]
    if kwargs.get("labels") is not None:
        raise ValueError(
            f"labels are not supported in {_WHAT}: the rows' virtual fronts differ, so one shifted loss over the batch "
            "would mix positions; compute the loss from the returned logits (aligned with input_ids)"
        )
    mask = kwargs.get("attention_mask")
    out = model(**fronts.model_inputs(peft_model, kwargs))
    logits = getattr(out, "logits", None)
    if logits is not None and logits.dim() == 3 and logits.shape[1] > length:  # per-token logits
        out.logits = logits[:, -length:]
    elif logits is not None and logits.dim() == 2 and mask is not None and not bool(mask[:, -1].all()):
        # a sequence classifier given embeddings reads the last column, which is padding in a right-padded row
        raise ValueError(f"sequence classification in {_WHAT} needs left-padded input (each row's last column real)")
    return out


def generate(peft_model: nn.Module, adapter_names: list[str], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """transformers' ``generate`` for a mixed batch: the fronts go into a fresh cache first (the prefixes, and the
    prompt fronts run through the model), then ``generate`` continues from that cache over ``input_ids`` with the
    full mask, numbering positions by ``cumsum(mask) - 1`` as above. Returns ``input_ids`` plus the new tokens."""
    model = peft_model.base_model
    fronts = Fronts.plan(peft_model, adapter_names)
    if fronts is None:
        return model.generate(*args, **kwargs)
    if "input_ids" in kwargs:
        ids = kwargs.pop("input_ids")
    else:
        ids, args = (args[0], args[1:]) if args else (None, args)
    if not torch.is_tensor(ids) or kwargs.get("inputs_embeds") is not None:
        raise TypeError(f"generate with {_WHAT} takes the prompts as input_ids (not inputs_embeds)")
    if find_cache(kwargs) is not None:
        raise ValueError(f"generate with {_WHAT} starts its own cache holding the virtual fronts; pass no cache")
    gen = kwargs.get("generation_config") or model.generation_config
    if (kwargs.get("num_beams", gen.num_beams) or 1) > 1 or (kwargs.get("num_return_sequences", gen.num_return_sequences) or 1) > 1:
        raise ValueError(f"generate with {_WHAT} runs one sequence per row: num_beams and num_return_sequences must be 1")
    mask = kwargs.pop("attention_mask", None)
    if mask is None:
        mask = torch.ones_like(ids)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    P, Q = fronts.prefix_width, fronts.prompt_width
    full = fronts.mask(mask)
    with torch.no_grad():
        if P:
            fronts.fill_prefixes(peft_model, cache, ids.device)
        if Q:  # the prompt fronts alone: causal, so they see only the prefix columns, as they would in one pass
            front = fronts.prompt_embeddings(peft_model, model.get_input_embeddings()(ids))
            model(inputs_embeds=front, attention_mask=full[:, : P + Q], position_ids=fronts.positions(full, None)[:, :Q],
                  use_cache=True, **with_cache({}, model, cache))
    # the front's columns are in the cache: generate feeds only input_ids' last L tokens (any filler values work)
    filler = ids[:, :1].expand(-1, P + Q)
    out = model.generate(*args, input_ids=torch.cat((filler, ids), dim=1), attention_mask=full,
                         **with_cache(kwargs, model, cache))
    return out[:, P + Q :]


def right_align(cache: Any, mask: torch.Tensor) -> torch.Tensor:
    """Move each row's unmasked cache columns to the right end, in order, and drop columns masked in every row; the
    new mask. Attention is indifferent to where a key sits once its position is in it (rotary embeddings are applied
    before caching), so this only restores the server batch's layout: every row's columns contiguous at the right
    (:class:`peftkit.serve.batch.KVBatch`), which a front followed by a left-padded input is not."""
    order = torch.sort(mask.long(), dim=1, stable=True).indices  # masked columns first, then the row's own in order
    order = order[:, mask.shape[1] - int(mask.sum(dim=1).max()) :]
    for layer in cache.layers:
        index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)
    return mask.gather(1, order)
