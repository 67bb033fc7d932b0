"""Loading adapters into a :class:`~peftkit.peft_model.PeftModel`, all or nothing: from folders, from tensors, or in
the place of another adapter of the same layout. A mixin of PeftModel, kept apart because every check and every
rollback of a load lives here, and nothing else does."""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from . import checkpoint
from .tuners.base import PeftConfig, get_submodule_parent, tuner_for, valid_adapter_name
from .tuners.layer import AdapterLayer, module_tree

if TYPE_CHECKING:
    from .peft_model import PeftModel


class AdapterLoading:
    """What PeftModel does to take adapters in (it provides ``peft_config``, ``adapter_tensors``, ...)."""

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False) -> None:
        """Add an adapter from a folder written by peftkit or HF PEFT, checking every key and shape."""
        config, tensors, source = checkpoint.read_adapter_folder(model_id, is_trainable)
        self.add_adapter_from_tensors(adapter_name, config, tensors, source)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in ``model_id`` (by peftkit or HF PEFT)."""
        config, tensors, source = checkpoint.read_adapter_folder(model_id, is_trainable)
        peft_model = cls.from_tensors(model, adapter_name, config, tensors, source)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    @classmethod
    def from_tensors(
        cls, model: nn.Module, adapter_name: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
        source: str | os.PathLike = "tensors",
    ) -> "PeftModel":
        """Wrap ``model`` with one adapter holding ``tensors``; on any error ``model`` is handed back exactly as it
        was (see :meth:`add_adapter_from_tensors`)."""
        # built without __init__, which adds its adapter unchecked: the first adapter must be undoable as well
        peft_model = cls.__new__(cls)
        nn.Module.__init__(peft_model)
        peft_model._hold(model)
        peft_model.add_adapter_from_tensors(adapter_name, config, tensors, source)
        return peft_model

    def add_adapter_from_tensors(
        self, adapter_name: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
        source: str | os.PathLike = "tensors",
    ) -> None:
        """Add adapter ``adapter_name`` holding ``tensors`` (HF PEFT file keys), all or nothing.

        Every load goes through here (:meth:`from_pretrained`, :meth:`load_adapter`, the server), so files are
        checked the same way everywhere: the config first, then, once the adapter is injected, every key, shape and
        value (floating point and finite: :func:`peftkit.checkpoint.copy_checked`) before anything is copied. On any
        error the half-added adapter is taken out again and the model (adapters, parameters, outputs) is exactly as
        before, so a refused load never leaves a broken model behind. ``source`` names the tensors in errors (the
        file they came from).
        """
        tuner = tuner_for(config)
        tuner.check_loadable(config)
        with self._undone_on_error(adapter_name, config):
            self._add_adapter(adapter_name, config, init=False)  # (copy_checked fills every new tensor or refuses)
            optional = tuner.optional_tensors(self.base_model, adapter_name, config, self._layer_tree())
            checkpoint.copy_checked(self.adapter_tensors(adapter_name), tensors, source, optional)

    @contextmanager
    def _undone_on_error(self, adapter_name: str, config: PeftConfig) -> Iterator[None]:
        """Run a block that adds ``adapter_name``; if it raises, restore the model to what it was before the block:
        the adapter's traces removed, the active set and every parameter's ``requires_grad`` as they were."""
        existed = adapter_name in self.peft_config  # add_adapter refuses it then, before changing anything
        layers = [layer for _, layer in self._layer_tree()]
        # the model's own parameters and the adapters' that adding one may change (_apply_active's `only`)
        flags = [(p, p.requires_grad) for _, m in module_tree(self.base_model) for p in m._parameters.values() if p is not None]
        active = list(self._active)
        try:
            yield
        except BaseException:
            if not existed:
                self._take_out(adapter_name, config, keep=layers)
            for p, flag in flags:
                p.requires_grad_(flag)
            self._active = active
            raise

    def _take_out(self, adapter_name: str, config: PeftConfig, keep: list[AdapterLayer]) -> None:
        """Remove a half-added adapter wherever it got: its entries in adapter layers, the layers made for it (each
        replaced by the module it wrapped, so module and parameter names are as before) and the tuner's own state."""
        kept = {id(layer) for layer in keep}
        # innermost first: unwrapping an outer layer first would leave an inner one's path dangling
        for name, layer in reversed(list(self.adapter_layers())):
            layer.delete_adapter(adapter_name)
            if id(layer) not in kept:
                parent, child = get_submodule_parent(self.base_model, name)
                setattr(parent, child, layer.base_layer)
        tuner_for(config).delete_adapter(self.base_model, adapter_name)
        self.peft_config.pop(adapter_name, None)
        self._slots.free(adapter_name)
        self._tree = (None, [])
        self._epoch += 1

    def replace_adapter(self, old: str, new: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
                        source: str | os.PathLike = "tensors") -> bool:
        """Adapter ``old`` becomes ``new``, holding ``tensors``, in ``old``'s own layers and mixed-batch slot, when
        both have one layout (one method, the same keys and shapes, :meth:`Tuner.reuse`); False, with nothing
        changed, when not (nor for a name :meth:`add_adapter` would refuse: it then says why). Values are checked as
        by :meth:`add_adapter_from_tensors`: a refused file leaves ``old`` as it was. Why: a server evicting ``old``
        for ``new`` would otherwise take every layer's modules apart and build them again on its serving thread
        (detach + attach of an all-linear LoRA on SmolLM2-135M with 16 resident: 84 ms; this way 42 ms).

        ``new == old`` refills the adapter in place: its name, slot and layers stay, only its values and config
        change, so no layer renames anything and no mixed-batch order changes (a server keeping its own fixed names
        for slots, ``serve/registry.py``: a renaming replacement made the next decode step 14 ms longer, a refill
        1-3 ms; bench/serve_steps.py part 3 on SmolLM2-135M)."""
        was = self.peft_config.get(old)
        if (was is None or (new != old and new in self.peft_config) or not valid_adapter_name(new)
                or type(config) is not type(was) or self.merged_adapters
                or config.modules_to_save or was.modules_to_save or "SEQ_CLS" in (config.task_type, was.task_type)):
            return False
        current = self.adapter_tensors(old)
        if {k: v.shape for k, v in current.items()} != {k: v.shape for k, v in tensors.items()}:
            return False
        tuner, config = tuner_for(config), copy.copy(config)
        self._epoch += 1  # (from here on layers may change; a refused load changes them back, which is no harm)
        if not tuner.reuse(self.base_model, old, new, config, self._layer_tree()):  # (checks before changing anything)
            return False
        try:
            checkpoint.copy_checked(current, tensors, source)  # all or nothing
        except BaseException:
            tuner.reuse(self.base_model, new, old, was, self._layer_tree())  # the same layout: back as it was
            raise
        config.base_model_name_or_path = config.base_model_name_or_path or was.base_model_name_or_path
        self.peft_config = {(new if n == old else n): (config if n == old else c) for n, c in self.peft_config.items()}
        if new != old:
            self._slots.rename(old, new)
            self._tree = (None, [])
        # the layers renamed old's entries, their active lists included; its parameters are new's, and their
        # requires_grad is right as it is unless new trains where old did not (or the other way round)
        same_training = old not in self._active or was.inference_mode == config.inference_mode
        self._apply_active([new if n == old else n for n in self._active], only=[new], layers_set=same_training)
        return True
