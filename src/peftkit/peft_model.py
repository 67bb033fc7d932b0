"""PeftModel: a frozen base model with named adapters of any method.

It keeps the set of adapters (``peft_config``), which are active, and whether they are enabled or merged; it
runs mixed-adapter batches (one adapter per row) and reads and writes adapter folders in HF PEFT's format.
Method details stay in ``tuners/``: this file only talks to :class:`Tuner` and :class:`AdapterLayer`.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import nn

from . import checkpoint, quant
from .adapter_loading import AdapterLoading
from .base_layers import has_quantized_layers
from .families import classifier_modules
from .memory import MemoryFootprint, memory_footprint
from .merge_report import merge_report
from .tuners.base import BASE, PeftConfig, find_targets, get_submodule_parent, tuner_for, valid_adapter_name
from .tuners import mixed_prompts
from .tuners.layer import AdapterLayer, LayerTree, ModulesToSaveWrapper, StackedAdapterLayer, module_tree
from .tuners.mixed_batch import FREE_SLOT, MixedBatch, Slots
from .tying import untie

class PeftModel(AdapterLoading, nn.Module):
    """A base model plus adapters. Create with :func:`get_peft_model` or :meth:`PeftModel.from_pretrained`."""

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self._hold(model)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    def _hold(self, model: nn.Module) -> None:
        """Hold ``model`` with no adapter yet; the first :meth:`add_adapter` freezes its parameters."""
        if isinstance(model, PeftModel) or any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in model.modules()):
            names = list(model.peft_config) if isinstance(model, PeftModel) else "its injected adapter layers"
            raise ValueError(
                f"this model already holds adapters ({names}); wrapping it again would nest them and save keys that "
                "cannot be loaded back. Add another adapter with model.add_adapter(name, config) or load one with "
                "model.load_adapter(folder, name); get_peft_model and PeftModel.from_pretrained take a plain model"
            )
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._disabled = False  # inside disable_adapter(): the base model alone
        self._tree: tuple[tuple[str, ...] | None, LayerTree] = (None, [])  # _layer_tree's memo (None: walk again)
        self._slots = Slots()  # each adapter's slot in mixed batches (tuners/layer.py)
        # a server's choice: frozen adapters' weights live only in the mixed-batch stacks (LoRA), so they exist once;
        # their parameters are then views of slots (saving copies them out as usual), and when the stacks were built
        # under torch.inference_mode, as a server builds them, inference tensors that autograd refuses
        self.hold_in_slots = False
        # bumped by every method that adds, removes, replaces, renames or merges an adapter: a held layer's stacks are
        # checked again only when it moved (StackCache.get; in-place writes to held weights are writes to the slots)
        self._epoch = 0
        # a server's budget of adapters: the mixed-batch stacks get that many slots at once instead of growing (and
        # being built again, all slots copied) every few adapters while the server fills its budget
        self.slot_capacity: int | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)  # config, device, generation_config, ...

    # ---------------------------------------------------------------------------------------------------------
    # Adapters

    def add_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        """Add a new adapter (not made active, except the first: call :meth:`set_adapter`).

        The model keeps its own copy of ``config`` (``peft_config[adapter_name]``), completed with what the model
        decides (default targets, the classifier head, the base model's name); the caller's object is left as it was.
        If wrapping fails part-way (a target the method cannot wrap), the model is left exactly as before.
        """
        if not isinstance(config, PeftConfig):
            raise TypeError(f"config must be a peftkit config (LoraConfig, IA3Config, ...), got {type(config).__name__}")
        with self._undone_on_error(adapter_name, config):
            self._add_adapter(adapter_name, config)

    def _add_adapter(self, adapter_name: str, config: PeftConfig, init: bool = True) -> None:
        """:meth:`add_adapter` without the rollback (callers run it inside :meth:`_undone_on_error`); ``init=False``
        leaves the new weights uninitialised for a caller that overwrites every one (a load)."""
        config = copy.copy(config)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; delete_adapter it first or pick another name")
        if not valid_adapter_name(adapter_name):
            raise ValueError(f"adapter name {adapter_name!r} must be non-empty letters, digits, '_' or '-', not {BASE!r} and "
                             "not a name PyTorch modules use (train, eval, to, keys, ...); pick another name")
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.base_model, "config", None), "name_or_path", None) or None
        if config.task_type == "SEQ_CLS" and config.modules_to_save is None:
            # the classification head trains in full, as HF PEFT does for SEQ_CLS
            heads = [h for h in classifier_modules() if any(n.split(".")[-1] == h for n, _ in self.base_model.named_modules())]
            config.modules_to_save = heads or None
        if not self.peft_config:  # the first adapter: from now on only adapters train
            for p in self.base_model.parameters():
                p.requires_grad_(False)
        self._tree = (None, [])  # the module tree changes: find the adapter layers again
        self._epoch += 1
        tuner_for(config).inject(self.base_model, config, adapter_name, init=init)
        if config.modules_to_save:
            self._wrap_modules_to_save(config, adapter_name)
        self.peft_config[adapter_name] = config
        self._slots.take(adapter_name)
        self._apply_active(self._active or [adapter_name], only=[adapter_name])
        if not self.training:
            self._eval_new_modules(adapter_name)

    def _eval_new_modules(self, adapter_name: str) -> None:
        """Put the modules just made for ``adapter_name`` (created in training mode) in eval mode like the rest of
        this model: otherwise an adapter added to a model in eval mode would run its dropout at inference. Cheaper
        than ``eval()``, which walks every adapter's modules (0.1 s per load with 16 adapters on SmolLM2-135M). A
        method with adapter layers makes nothing outside them, so only the layers are visited (a walk of the whole
        model took 6 ms of each server load with 16 LoRA adapters); prompt and prefix tuning, which keep their
        modules elsewhere in the model, get the whole walk."""
        holding = [layer for _, layer in self._layer_tree() if layer.holds(adapter_name)]
        for module in holding or [m for _, m in module_tree(self.base_model)]:
            if module.training:  # (a layer made for this adapter; the others are in eval mode already)
                module.training = False
            if isinstance(module, AdapterLayer):  # its stores (lora_A, lora_dropout, ...): the new adapter's entries
                for store in module._modules.values():
                    if store is module.base_layer:
                        continue
                    if store.training:  # (nn.Module's __setattr__ is slow: 7 stores in each of 210 layers per load)
                        store.training = False
                    if isinstance(store, nn.ModuleDict) and adapter_name in store:
                        store[adapter_name].eval()

    def _wrap_modules_to_save(self, config: PeftConfig, adapter_name: str) -> None:
        probe = PeftConfig(target_modules=config.modules_to_save)
        for name in find_targets(self.base_model, probe):
            module = self.base_model.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                if isinstance(module, AdapterLayer):
                    raise ValueError(f"{name} is in modules_to_save and also wrapped by an adapter layer; pick one")
                module = ModulesToSaveWrapper(module)
                parent, child = get_submodule_parent(self.base_model, name)
                setattr(parent, child, module)
            module.update_layer(adapter_name, config, name)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make one adapter, or several together (their effects add up), the active set."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        self._apply_active(names)

    def _apply_active(self, names: list[str], only: list[str] | None = None, layers_set: bool = False) -> None:
        """Make ``names`` active and set every adapter's ``requires_grad``; with ``only`` (the adapter just added, or
        after a deletion those whose trainability changed), only those adapters': the others' flags do not change,
        and walking all of them made each load and each eviction cost time in proportion to the adapters loaded
        (50 ms per eviction with 16 LoRA adapters on SmolLM2-135M). ``layers_set``: the layers' active lists and
        flags are right already (a renamed adapter of unchanged trainability), so they are not walked."""
        unchanged, self._active = names == self._active, names
        trainable = [n for n in names if not self.peft_config[n].inference_mode]
        for _, layer in () if layers_set else self._layer_tree():
            # (with the active set unchanged, a layer holding none of `only` has nothing to change: a server's load
            # then visits only the new adapter's layers, not all 210 of SmolLM2-135M)
            if not (unchanged and only is not None and not any(layer.holds(n) for n in only)):
                layer.set_adapter(names, trainable, only)
        for name, config in self.peft_config.items():
            if name not in trainable and (only is None or name in only):
                tuner_for(config).mark_frozen(self.base_model, config, name)
        for name in trainable:
            config = self.peft_config[name]
            tuner_for(config).mark_trainable(self.base_model, config, name)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ValueError("cannot delete the only adapter; use unload() to get the plain base model back")
        tree = self._layer_tree()  # (a deletion leaves every adapter layer where it is: the same tree serves after it)
        for _, layer in tree:
            layer.delete_adapter(adapter_name)
        tuner_for(self.peft_config[adapter_name]).delete_adapter(self.base_model, adapter_name)
        del self.peft_config[adapter_name]
        self._tree = (tuple(self.peft_config), tree)
        self._slots.free(adapter_name)
        self._epoch += 1
        trainable = lambda names: {n for n in names if n != adapter_name and not self.peft_config[n].inference_mode}  # noqa: E731
        was, active = trainable(self._active), [n for n in self._active if n != adapter_name] or [next(iter(self.peft_config))]
        self._apply_active(active, only=sorted(was ^ trainable(active)))  # (a server's adapters: none changes)

    def adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        for name, module in module_tree(self.base_model):
            if isinstance(module, AdapterLayer):
                yield name, module

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block (merged adapters are taken out and put back)."""
        merged = self.merged_adapters
        if merged:
            self.unmerge_adapter()
        layers = [layer for _, layer in self.adapter_layers()]
        for layer in layers:
            layer.disabled = True
        self._disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False
            self._disabled = False
            if merged:
                self.merge_adapter(merged)

    # ---------------------------------------------------------------------------------------------------------
    # Parameters

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counting the base model's once (not the adapter copies)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ---------------------------------------------------------------------------------------------------------
    # Merging

    @property
    def merged_adapters(self) -> list[str]:
        merged: list[str] = []
        for _, layer in self._layer_tree():
            merged += [n for n in layer.merged_adapters if n not in merged]
        return merged

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights; :meth:`unmerge_adapter` undoes it."""
        names = list(adapter_names or self._active)
        self._epoch += 1
        for name in names:
            tuner = tuner_for(self.peft_config[name])
            if not tuner.mergeable:
                raise TypeError(
                    f"adapter {name!r} is {tuner.peft_type}, which adds computation the base weights cannot absorb; "
                    "it cannot be merged (serve it unmerged)"
                )
        shared = {id(m) for _, layer in self.adapter_layers() if isinstance(layer.base_layer, AdapterLayer) for m in (layer, layer.base_layer)}
        for path, layer in self.adapter_layers():
            if id(layer) in shared and set(names) & set(layer.adapter_names):
                raise TypeError(
                    f"{path} holds adapters of several methods; merging {sorted(set(names) & set(layer.adapter_names))} "
                    "into the weights they share is not supported: serve them unmerged"
                )
        quantized = has_quantized_layers(self.base_model)
        with merge_report(self.base_model, names) if quantized else nullcontext():  # warns with the error
            for _, layer in self.adapter_layers():
                here = [n for n in names if n in layer.adapter_names and n not in layer.merged_adapters]
                if not here:
                    continue
                if not isinstance(layer, ModulesToSaveWrapper):  # (those swap in their own copy, never write)
                    untie(self.base_model, layer.base_layer)  # a tied head: never write into the input embeddings
                layer.merge(here)

    def unmerge_adapter(self) -> None:
        self._epoch += 1
        for _, layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, adapter_names: list[str] | None = None, dequantize: bool = False) -> nn.Module:
        """Merge adapters into the weights and return the plain base model: zero added latency.

        ``dequantize``: first replace a 4-bit/8-bit base's layers by full-precision ``nn.Linear`` ones, so the merge
        is exact (W = dequant(W0) + delta, no requantization) and transformers saves and loads the result as a
        plain model."""
        if dequantize and has_quantized_layers(self.base_model):
            self.unmerge_adapter()
            quant.dequantize_model(self.base_model)
        self.merge_adapter(adapter_names)
        return self._unwrap(keep=list(adapter_names or self._active))  # the merge undos go with the layers

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        self.unmerge_adapter()
        return self._unwrap(keep=[])

    def _unwrap(self, keep: list[str]) -> nn.Module:
        for name, layer in reversed(list(self.adapter_layers())):  # innermost first, as in _take_out
            replacement = layer.base_layer
            if isinstance(layer, ModulesToSaveWrapper):
                kept = [n for n in keep if n in layer.modules_to_save]
                if kept:
                    replacement = layer.modules_to_save[kept[0]]
            parent, child = get_submodule_parent(self.base_model, name)
            setattr(parent, child, replacement)
        for config in self.peft_config.values():
            tuner_for(config).unload(self.base_model)
        return self.base_model

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd"
    ) -> None:
        """A new adapter combining existing ones of one method: LoRA ("linear", "cat" or "svd"; see
        ``tuners.lora``) or (IA)^3 ("linear"; see ``tuners.ia3``). Each method's tuner does the combining."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already")
        if len(adapters) != len(weights) or not adapters:
            raise ValueError("adapters and weights must be non-empty lists of the same length")
        missing = [n for n in adapters if n not in self.peft_config]
        if missing:
            raise ValueError(f"no adapters named {missing}; this model has {list(self.peft_config)}")
        kinds = {self.peft_config[n].peft_type for n in adapters}
        if len(kinds) > 1:
            raise ValueError(f"add_weighted_adapter combines adapters of one method; {adapters} are {sorted(kinds)}")
        configs = [self.peft_config[n] for n in adapters]
        config = tuner_for(configs[0]).add_weighted(self.base_model, adapters, weights, adapter_name, combination_type, configs)
        self.peft_config[adapter_name] = config
        self._slots.take(adapter_name)
        self._epoch += 1
        self._apply_active(self._active)

    def memory_footprint(self) -> MemoryFootprint:
        """Bytes of base weights by storage format, adapter bytes, bits per quantized weight (see
        :func:`peftkit.memory_footprint`)."""
        return memory_footprint(self)

    # ---------------------------------------------------------------------------------------------------------
    # Running

    @contextmanager
    def _mixed_batch(self, adapter_names: list[str], batch_size: int | None, per_token: bool = False) -> Iterator[None]:
        if self.training:
            raise RuntimeError("adapter_names (mixed-adapter batches) is for inference: call model.eval() first")
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("adapter_names must be a list of adapter names, one per row")
        if batch_size is not None and len(adapter_names) != batch_size:
            what = "tokens" if per_token else "rows"
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} {what}")
        order = self._slots.order(BASE)
        slot = {n: k for k, n in enumerate(order) if n != FREE_SLOT}
        unknown = sorted({n for n in adapter_names if n not in slot})
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown} in adapter_names; known: {list(slot)}")
        layers = [layer for _, layer in self._layer_tree()]
        if any(layer.merged_adapters for layer in layers):
            raise RuntimeError(f"adapters {self.merged_adapters} are merged; unmerge_adapter() before mixed batches")
        if per_token and not self.takes_per_token():
            raise ValueError("per-token adapter_names need adapters of the stacked kinds only (LoRA, (IA)^3, "
                             "bottleneck), not modules_to_save or selective layers")
        mixed = MixedBatch.build(order, [slot[n] for n in adapter_names], self.device, per_token, self.hold_in_slots,
                                 self.slot_capacity, self._epoch if self.hold_in_slots else None)
        for layer in layers:
            layer.mixed = mixed
        try:
            yield
        finally:
            for layer in layers:
                layer.mixed = None

    def takes_per_token(self) -> bool:
        """Whether ``forward(per_token=True)`` can run: every adapter layer is of a stacked kind (LoRA, (IA)^3,
        bottleneck), which sees each token as a row."""
        return all(isinstance(layer, StackedAdapterLayer) for _, layer in self._layer_tree())

    def _layer_tree(self) -> LayerTree:
        """:meth:`adapter_layers`, found once per set of adapters (forgotten whenever the module tree changes: an
        adapter added, deleted or renamed): walking the module tree on every decode step of a mixed batch cost about a
        tenth of the step, and a server's load into reused layers walked it four times (half its time under cProfile)."""
        names = tuple(self.peft_config)
        if self._tree[0] != names:
            self._tree = (names, list(self.adapter_layers()))
        return self._tree[1]

    def _prepare_inputs(self, kwargs: dict[str, Any], generate: bool) -> dict[str, Any]:
        if self._disabled:
            return kwargs
        for name in self._active:
            kwargs = tuner_for(self.peft_config[name]).prepare_inputs(self, name, kwargs, generate)
        return kwargs

    def _context(self, adapter_names: list[str] | None, args: tuple, kwargs: dict[str, Any], per_token: bool = False):
        if adapter_names is None:
            return nullcontext()
        first = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        count = (first.shape[0] * first.shape[1] if per_token else first.shape[0]) if torch.is_tensor(first) else None
        return self._mixed_batch(adapter_names, count, per_token)

    def forward(self, *args: Any, adapter_names: list[str] | None = None, per_token: bool = False, **kwargs: Any) -> Any:
        """The base model's forward with adapters; ``adapter_names`` picks one adapter (or ``"__base__"``) per row,
        of any methods (prompt and prefix tuning rows get their virtual fronts: :mod:`peftkit.tuners.mixed_prompts`,
        which also says what a mixed batch returns). ``per_token``: ``adapter_names`` has one entry per token of a
        single sequence instead (a fused serving step, :mod:`peftkit.serve.fused`; stacked methods only)."""
        if per_token and adapter_names is not None and mixed_prompts.Fronts.plan(self, adapter_names) is not None:
            raise ValueError("per-token adapter_names cannot hold prompt or prefix tuning adapters (their virtual "
                             "tokens need a batch of rows)")
        with self._context(adapter_names, args, kwargs, per_token):
            if adapter_names is not None:
                return mixed_prompts.forward(self, adapter_names, args, kwargs)
            return self.base_model(*args, **self._prepare_inputs(kwargs, generate=False))

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """transformers' ``generate`` with adapters; ``adapter_names`` as in :meth:`forward`."""
        with self._context(adapter_names, args, kwargs):
            if adapter_names is not None:
                return mixed_prompts.generate(self, adapter_names, args, kwargs)
            return self.base_model.generate(*args, **self._prepare_inputs(kwargs, generate=True))

    # ---------------------------------------------------------------------------------------------------------
    # Files

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Every tensor saved for one adapter, under HF PEFT file keys (sharing storage with the model)."""
        config = self.peft_config[adapter_name]
        tuner = tuner_for(config)
        tree = self._layer_tree()
        tensors = tuner.adapter_tensors(self.base_model, adapter_name, config, tree)
        for name, layer in tree:
            if isinstance(layer, ModulesToSaveWrapper) and adapter_name in layer.modules_to_save:
                tensors.update({f"{tuner.file_prefix}{name}.{k}": v for k, v in layer.adapter_state_dict(adapter_name).items()})
        return tensors

    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None) -> None:
        """Write each adapter as HF PEFT does: "default" in ``save_directory``, others in ``save_directory/<name>``.

        The folder is replaced as one unit (:func:`peftkit.atomic.replace_folder`): a crash leaves the old folder or
        the new one, never a mix; files in it that the save does not write are kept."""
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        checkpoint.save_adapters(save_directory, {n: (self.peft_config[n], self.adapter_tensors(n)) for n in names})


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model`` and add one trainable adapter described by ``config``."""
    return PeftModel(model, config, adapter_name)
