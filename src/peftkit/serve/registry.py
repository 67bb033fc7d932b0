"""The served base model and its named adapters.

Reading an adapter folder (JSON and safetensors from disk) is the slow part of loading one; :func:`read_adapter`
does it on a worker thread while the scheduler keeps decoding. Only :meth:`AdapterRegistry.attach` and
:meth:`AdapterRegistry.detach` change the model, and the scheduler runs them between decode steps.

With no adapter loaded the model is served plain; the first adapter wraps it in a :class:`PeftModel`, and removing
the last one unwraps it again (a PeftModel always has at least one adapter).

Inside the model, adapters go by keys of the registry's own (``a0``, ``a1``, ...), not by the names requests use: an
adapter loaded in an evicted one's place (:meth:`AdapterRegistry.replace`) takes over its key, so its layers, its
slot in the stacked weights and every layer's mixed-batch order stay as they were and only the values change (the
way vLLM's LoRA slots work). Renaming instead made every layer look its slots up again on the next step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .. import checkpoint
from ..device import Precision
from ..hf_compat import with_cache
from ..peft_model import PeftModel
from ..tuners.base import BASE, PeftConfig
from ..tuners.mixed_prompts import Fronts, right_align
from .fused import FusedCache, FusedLayout, FusionGate, LayoutIgnored, fused_attention_on


logger = logging.getLogger("peftkit.serve")


class AdapterPathError(ValueError):
    """A requested adapter path is outside the configured adapters directory."""


class AdapterConflict(Exception):
    """The name is taken, or a load or removal of it is under way."""


class UnknownAdapter(Exception):
    """No adapter of that name is loaded."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    created: int  # unix time it was loaded
    bytes: int = 0  # what its tensors take on the model's device (see AdapterRegistry.tensor_bytes)
    pinned: bool = True  # named at start or posted by an admin: never evicted to make room (serve/residency.py)
    layout: int | None = None  # layout_of its config and tensors: adapters of one layout can take each other's place
    virtual: int = 0  # positions its virtual front takes before every prompt (prompt or prefix tuning's tokens)


def layout_of(config: PeftConfig, tensors: dict[str, torch.Tensor]) -> int:
    """A fingerprint of an adapter's shape: its method and every tensor's key and shape (not the values)."""
    return hash((type(config).__name__, frozenset((key, tuple(t.shape)) for key, t in tensors.items())))


def resolve_adapter_path(root: str | os.PathLike, requested: str) -> Path:
    """``requested`` (relative to ``root`` or absolute) as a real path, refusing anything that is not inside ``root``.

    Symlinks and ``..`` are resolved first, so neither can lead out of the directory.
    """
    base = Path(root).resolve()
    if not requested or "\x00" in requested:
        raise AdapterPathError("path must be a non-empty folder name inside the adapters directory")
    target = (base / requested).resolve()  # an absolute ``requested`` replaces base here, and is then checked
    if not target.is_relative_to(base):
        raise AdapterPathError(f"path {requested!r} is outside the adapters directory; give a folder inside it")
    return target


def read_adapter(path: str | os.PathLike) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """An adapter folder's config and tensors, read from disk (runs off the scheduler and event-loop threads)."""
    config, tensors, _ = checkpoint.read_adapter_folder(path)
    return config, tensors


class AdapterRegistry:
    """The model and its adapters. ``forward``, ``attach`` and ``detach`` run on the scheduler thread only; the
    name lookups are safe from any thread."""

    def __init__(self, model: nn.Module, tokenizer: Any, base_name: str, precision: Precision | None = None,
                 slot_capacity: int | None = None) -> None:
        model.eval()
        self.slot_capacity = slot_capacity  # the budget's adapters (--max-adapters): stacks sized once for them
        self.model = model
        self.device = next(model.parameters()).device  # adapters attach beside their base layers, on this device
        self.precision = precision or Precision(torch.float32, "default")
        self.peft: PeftModel | None = None
        self.base_name = base_name
        self.context_length = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = frozenset(eos + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._adapters: dict[str, AdapterInfo] = {}
        self._pending: set[str] = set()  # names with a load or removal under way
        self._keys: dict[str, str] = {}  # adapter name -> its key in the model (scheduler thread; see the docstring)
        self._next_key = 0
        self.fusion = FusionGate()  # fused prefill-and-decode steps (serve/fused.py), paused or off after failures

    # ---------------------------------------------------------------------------------------------------------
    # Names (any thread)

    def models(self) -> list[AdapterInfo]:
        with self._lock:
            return list(self._adapters.values())

    def lookup(self, model: str) -> str | None:
        """The adapter name a request's ``model`` selects (``BASE`` for the base model), or None if unknown."""
        if model == self.base_name:
            return BASE
        with self._lock:
            return model if model in self._adapters else None

    def reserve(self, name: str, loading: bool) -> None:
        """Claim ``name`` for a load (it must be new) or a removal (it must be loaded); :meth:`release` ends it."""
        with self._lock:
            if name in self._pending:
                raise AdapterConflict(f"adapter {name!r} is being loaded or removed right now; retry when that is done")
            if loading and (name in self._adapters or name in (self.base_name, BASE)):
                raise AdapterConflict(f"the name {name!r} is taken; DELETE /v1/adapters/{name} first or pick another name")
            if not loading and name not in self._adapters:
                raise UnknownAdapter(f"no adapter named {name!r}; loaded: {sorted(self._adapters)}")
            self._pending.add(name)
            if not loading:  # new requests stop finding it at once; running ones finish first
                del self._adapters[name]

    def release(self, name: str) -> None:
        with self._lock:
            self._pending.discard(name)

    def restore(self, info: AdapterInfo) -> None:
        """Undo a :meth:`reserve` for removal that did not happen: requests find ``info.name`` again."""
        with self._lock:
            self._adapters[info.name] = info
            self._pending.discard(info.name)

    def info(self, name: str) -> AdapterInfo | None:
        with self._lock:
            return self._adapters.get(name)

    def virtual_tokens(self, name: str) -> int:
        """Positions adapter ``name`` (or ``BASE``) puts before every prompt: its prompt- or prefix-tuning virtual
        tokens, which count against the model's context like the prompt's own (any thread)."""
        info = self.info(name) if name != BASE else None
        return info.virtual if info is not None else 0

    # ---------------------------------------------------------------------------------------------------------
    # The model (scheduler thread)

    def attach(self, name: str, config: PeftConfig, tensors: dict[str, torch.Tensor], path: str,
               pinned: bool = True) -> AdapterInfo:
        """Add adapter ``name`` to the model with ``tensors`` (checked key by key and shape by shape); a refused
        one leaves the model exactly as it was. ``pinned``: never evicted for room (see serve/residency.py)."""
        source, key = str(Path(path) / checkpoint.WEIGHTS_NAME), f"a{self._next_key}"
        if self.peft is None:  # the first adapter wraps the plain model
            self.peft = PeftModel.from_tensors(self.model, key, config, tensors, source)
            self.peft.eval()  # (later adapters are made in the model's mode)
            self.peft.hold_in_slots = True  # (inference only: each adapter's weights exist once, in its slot)
            self.peft.slot_capacity = self.slot_capacity
        else:
            self.peft.add_adapter_from_tensors(key, config, tensors, source)
        self._next_key += 1
        self._keys[name] = key
        return self._record(name, config, tensors, path, pinned)

    def replace(self, old: str, name: str, config: PeftConfig, tensors: dict[str, torch.Tensor], path: str,
                pinned: bool = True) -> AdapterInfo | None:
        """Attach ``name`` in the place of ``old`` (hidden for removal, no request using it): it takes over ``old``'s
        key, layers and slot, which are refilled in place (:meth:`PeftModel.replace_adapter`); None, with nothing
        changed, when their layouts differ."""
        source, key = str(Path(path) / checkpoint.WEIGHTS_NAME), self._keys[old]
        if self.peft is None or not self.peft.replace_adapter(key, key, config, tensors, source):
            return None
        self._keys[name] = self._keys.pop(old)
        return self._record(name, config, tensors, path, pinned)

    def _record(self, name: str, config: PeftConfig, tensors: dict[str, torch.Tensor], path: str,
                pinned: bool) -> AdapterInfo:
        info = AdapterInfo(name=name, path=str(path), created=int(time.time()), bytes=self.tensor_bytes(tensors),
                           pinned=pinned, layout=layout_of(config, tensors), virtual=sum(self.front(name)))
        with self._lock:
            self._adapters[name] = info
        return info

    def detach(self, name: str) -> None:
        """Remove adapter ``name`` from the model (no request may be using it)."""
        key = self._keys.pop(name)
        assert self.peft is not None and key in self.peft.peft_config
        if len(self.peft.peft_config) == 1:
            self.model = self.peft.unload()
            self.peft = None
        else:
            self.peft.delete_adapter(key)

    def tensor_bytes(self, tensors: dict[str, torch.Tensor]) -> int:
        """What attaching ``tensors`` adds to the model, known before attaching: their elements at the model's
        floating-point parameter dtype, which adapter parameters are made in (attaching checks that every key and
        shape matches a parameter, so the count is exact). Summing the model's parameters before and after instead
        would cost two walks of the model on the scheduler thread (13 ms each for SmolLM2-135M)."""
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        return sum(t.numel() for t in tensors.values()) * torch.empty((), dtype=dtype).element_size()

    def attached(self) -> int:
        """How many adapters the model holds right now (scheduler thread)."""
        return 0 if self.peft is None else len(self.peft.peft_config)

    def has_adapter(self, name: str) -> bool:
        return name == BASE or name in self._keys

    def key(self, name: str) -> str:
        """Adapter ``name``'s name inside the model (``BASE`` stays ``BASE``; scheduler thread)."""
        return name if name == BASE else self._keys[name]

    def _keyed(self, names: list[str]) -> list[str]:
        return [self.key(n) for n in names]

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any,
                adapter_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run left-padded prompts into ``cache``: the last position's logits (batch, vocab), and the mask of every
        column the cache now holds (what decoding continues from).

        A fresh (empty) cache first gets each row's virtual front (prompt tuning: its virtual tokens; prefix tuning:
        its key/value prefix; :mod:`peftkit.tuners.mixed_prompts`), counted in the returned mask, and the cache is
        then right-aligned so every row's columns end at the last one (:class:`~peftkit.serve.batch.KVBatch`'s
        layout). A filled cache (a later chunk of the same rows) gets no front again: ``attention_mask`` must then
        cover the cache's columns and the chunk's. Position ids count each row's unmasked columns from 0, virtual
        ones included, so padding never shifts a row's positions.
        """
        filled = cache.get_seq_length()
        if attention_mask.shape[1] != filled + input_ids.shape[1]:
            raise ValueError(
                f"prefill: the mask has {attention_mask.shape[1]} columns but the cache holds {filled} and the chunk "
                f"has {input_ids.shape[1]}; pass a mask covering both"
            )
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, filled:]
        logits = self.forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                              adapter_names=adapter_names)
        fronts = Fronts.plan(self.peft, self._keyed(adapter_names)) if self.peft is not None and not filled else None
        if fronts is None:
            return logits, attention_mask
        return logits, right_align(cache, fronts.mask(attention_mask))

    def fused_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, layout: FusedLayout,
                      adapter_names: list[str], keep: torch.Tensor) -> torch.Tensor:
        """One flat sequence of decode tokens and whole prompts (:mod:`peftkit.serve.fused`), ``adapter_names`` one
        per token; the logits (len(keep), vocab) at the token positions ``keep``. Every cache in ``layout`` grows."""
        cache = FusedCache(layout, self.model.config)
        tokens, adapter_names = input_ids.shape[1], self._keyed(adapter_names)
        fronted = set()
        if self.peft is not None:  # prompt- and prefix-tuning adapters have no layers: their tokens run as the base's
            fronted = {n for n in set(adapter_names) if Fronts.plan(self.peft, [n]) is not None}
        served = [BASE if n in fronted else n for n in adapter_names] if fronted else adapter_names
        # a 4D mask is passed to attention as it is (fused_attention ignores it and masks each part itself)
        mask = torch.ones(1, 1, tokens, tokens, dtype=torch.bool, device=self.device)
        inputs = with_cache({"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}, self.model, cache)
        try:
            with self.precision.autocast(self.device), fused_attention_on(self.model), \
                    self._newcomer_fronts(layout, adapter_names if fronted else []):
                if self.peft is None:
                    out = self.model(**inputs, use_cache=True, logits_to_keep=keep, fused=layout)
                else:
                    out = self.peft(**inputs, adapter_names=served, per_token=True, use_cache=True,
                                    logits_to_keep=keep, fused=layout)
            if layout.attended != len(layout.caches[0].layers if layout.caches else layout.batch_cache.layers):
                # a model whose attention does not go through transformers' attention interface attended over the
                # raw new keys: never use those logits
                raise LayoutIgnored(f"{type(self.model).__name__}'s attention does not take fused steps")
        except Exception as err:
            # newcomers are prefilled apart for a while, or for good (FusionGate); the scheduler recovers this step
            self.fusion.failed(err)
            logger.warning("fused step failed (%s: %s); newcomers are prefilled apart %s", type(err).__name__, err,
                           "from now on" if self.fusion.off else f"for the next {self.fusion.paused} steps that could fuse")
            raise
        self.fusion.succeeded()
        return out.logits[0].float()

    @contextmanager
    def _newcomer_fronts(self, layout: FusedLayout, adapter_names: list[str]) -> Iterator[None]:
        """Inside the block, each fused newcomer's virtual front is in place (:mod:`peftkit.serve.fused`): its
        prefix-tuning columns in its fresh cache, and its prompt-tuning embeddings in the input embeddings' output at
        its first tokens (a hook: the other tokens' embeddings are the model's own, per-token embedding adapters
        included). ``adapter_names``: the fused step's, per token (empty when no adapter of its adds a front)."""
        swaps = []
        for start, cache, (prompt, prefix) in zip(layout.starts, layout.caches, layout.fronts):
            if not (prompt or prefix):
                continue
            fronts = Fronts.plan(self.peft, [adapter_names[start]]) if adapter_names else None
            if fronts is None or (fronts.prompt[0], fronts.prefix[0]) != (prompt, prefix):
                raise ValueError(f"a fused newcomer's front {(prompt, prefix)} is not what its adapter adds")
            if prefix:
                fronts.fill_prefixes(self.peft, cache, self.device)
            if prompt:
                swaps.append((start, prompt, fronts))
        if not swaps:
            yield
            return

        def put_prompts(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for start, prompt, fronts in swaps:
                out[:, start : start + prompt] = fronts.prompt_embeddings(self.peft, out[:, :prompt])[0]
            return out

        hook = self.model.get_input_embeddings().register_forward_hook(put_prompts)
        try:
            yield
        finally:
            hook.remove()

    def front(self, name: str) -> tuple[int, int]:
        """What adapter ``name`` puts before a request's context: (prompt-tuning virtual tokens, prefix-tuning
        key/value columns); (0, 0) for other methods and the base."""
        fronts = Fronts.plan(self.peft, [self.key(name)]) if self.peft is not None and name != BASE else None
        return (0, 0) if fronts is None else (fronts.prompt[0], fronts.prefix[0])

    @property
    def fusable(self) -> bool:
        """Whether fused steps are still possible at all (not turned off for good)."""
        return not self.fusion.off

    def can_fuse(self) -> bool:
        """Whether newcomers can join the running rows' fused forward now: every adapter layer takes a per-token
        batch, and fusion is not paused or off (:class:`~peftkit.serve.fused.FusionGate`). Rows and newcomers of any
        method may fuse (prompt and prefix tuning with their fronts, :meth:`fused_forward`). Asked once per step that
        could fuse."""
        if self.peft is not None and not self.peft.takes_per_token():
            return False
        return self.fusion.open()

    def forward(self, *, adapter_names: list[str], cache: Any, **inputs: Any) -> torch.Tensor:
        """Logits at the last position, (batch, vocab), each row through its own adapter; ``cache`` grows in place."""
        inputs = with_cache(inputs, self.model, cache)
        with self.precision.autocast(self.device):
            if self.peft is None:
                out = self.model(**inputs, use_cache=True, logits_to_keep=1)
            else:
                out = self.peft(**inputs, adapter_names=self._keyed(adapter_names), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()
