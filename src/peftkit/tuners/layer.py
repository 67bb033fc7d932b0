"""Adapter layers: the shared wrapper every layer-based method builds on.

An adapter layer keeps the original module as ``base_layer`` (frozen) and holds its adapters in ``nn.ModuleDict`` /
``nn.ParameterDict`` attributes keyed by adapter name (listed in ``adapter_attrs``), so parameter names look like
HF PEFT's: ``...q_proj.lora_A.default.weight``. :class:`AdapterLayer` holds the state every method shares (active,
merged, disabled, a mixed batch) and merging; :class:`StackedAdapterLayer` is the template for methods whose
adapters can run one per row of a batch: it decides between the base layer alone, the active adapters and a mixed
batch, and builds and caches the per-row stacks, so that a method writes only its math.

Adapters of several methods can share a module: each method's layer wraps the one before (a bottleneck layer around
an (IA)^3 layer around a LoRA layer around ``down_proj``). A layer leaves rows and active sets that are not its own
to the layer it wraps, so the methods never see each other; :attr:`AdapterLayer.model_layer` is the model's own
layer under all of them (its kind, shapes, device), and files name every one of them by the module's path.
"""

from __future__ import annotations

import abc
import copy
import operator
from typing import TYPE_CHECKING, Any, ClassVar, Hashable, Iterable, Iterator

import torch
from torch import nn

from ..base_layers import BaseLayerKind, Undo, kind_of
from .mixed_batch import FREE_SLOT, MixedBatch, gather_rows, slot_address

if TYPE_CHECKING:  # (tuners.base imports this module)
    from .base import PeftConfig


class Uninitialised(nn.Linear):
    """``nn.Linear`` without torch's default (Kaiming) initialisation, for adapter weights that are loaded right
    after (``update_layer(init=False)``): that init cost ~35 us per weight, ~10 ms of each adapter load with 100
    LoRA layers on SmolLM2-135M, for values the file overwrites. It also skips ``register_parameter``, whose name
    check (``hasattr``, through a raised and formatted AttributeError) is needless on a fresh module: making the 420
    weights of an all-linear LoRA adapter on SmolLM2-135M takes 3.8 ms instead of 5.2."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)  # (not nn.Linear's, which initialises)
        self.in_features, self.out_features = in_features, out_features
        self._parameters["weight"] = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self._parameters["bias"] = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None


class AdapterLayer(nn.Module, abc.ABC):
    """Wraps ``base_layer`` and holds named adapters. Subclasses implement ``update_layer`` and ``forward``.

    State: ``active_adapters`` (names summed in ``forward``), ``merged_adapters`` (names folded into the base
    weights, oldest first) with ``merge_undos`` (the :class:`Undo` of each of those merges), ``disabled`` (bypass
    all adapters), ``mixed`` (a :class:`MixedBatch` while one is running). ``kind``: what the base layer is
    (:mod:`peftkit.base_layers`); methods ask it for shapes, dtype, device and weight updates.
    """

    adapter_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.merge_undos: list[Undo] = []
        self.disabled = False
        self.mixed: MixedBatch | None = None
        self.revision = 0  # bumped by delete_adapter, so caches of per-adapter state never take a new one for the old

    @property
    def kind(self) -> BaseLayerKind | None:
        """The model layer's kind (:attr:`model_layer`), looked up each time: ``dequantize_model`` may swap the base
        layer underneath."""
        return kind_of(self.model_layer)

    @property
    def model_layer(self) -> nn.Module:
        """The model's own layer under this one: ``base_layer``, or, where adapters of several methods share a
        module (each method's layer wraps the one before), the layer under all of them."""
        return model_layer(self.base_layer)

    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_attrs[0]).keys())

    def holds(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` is here (without listing the names: asked of every layer in each load)."""
        return adapter_name in getattr(self, self.adapter_attrs[0])

    @property
    def has_adapters(self) -> bool:
        """Whether any adapter is left here (asked in every forward: cheaper than listing the names)."""
        return len(getattr(self, self.adapter_attrs[0])) > 0

    @abc.abstractmethod
    def update_layer(self, adapter_name: str, config: PeftConfig, module_name: str, init: bool = True) -> None:
        """Create the parameters of adapter ``adapter_name`` for this layer; ``init=False`` when every one of them is
        about to be overwritten (a load: :meth:`PeftModel.add_adapter_from_tensors` copies the whole file in), so a
        method may leave them uninitialised instead of spending time on values nobody reads."""

    def adapter_parameters(self, adapter_name: str) -> Iterable[nn.Parameter]:
        for attr in self.adapter_attrs:
            store = getattr(self, attr)
            if adapter_name in store:
                item = store[adapter_name]
                yield from ([item] if isinstance(item, nn.Parameter) else item.parameters())

    def set_adapter(self, names: list[str], trainable: Iterable[str] = (), only: Iterable[str] | None = None) -> None:
        """Make ``names`` (those this layer has) active; only adapters in ``trainable`` get gradients (``requires_grad``
        is set for the adapters in ``only``, default all)."""
        have = self.adapter_names
        self.active_adapters = [n for n in names if n in have]
        trainable = set(trainable)
        for name in have if only is None else [n for n in only if n in have]:
            for p in self.adapter_parameters(name):
                p.requires_grad_(name in trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge before deleting it")
        for attr in self.adapter_attrs:
            store = getattr(self, attr)
            if adapter_name in store:
                del store[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        self.revision += 1

    def rename_adapter(self, old: str, new: str) -> None:
        """Give adapter ``old``'s entries the name ``new`` (its tensors and modules stay as they are)."""
        for attr in self.adapter_attrs:
            store = getattr(self, attr)
            if old in store:
                store[new] = store.pop(old)
        self.active_adapters = [new if n == old else n for n in self.active_adapters]

    def merge(self, adapter_names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights."""
        for name in adapter_names or self.active_adapters:
            if name in self.adapter_names and name not in self.merged_adapters:
                self.merge_undos.append(self._merge_one(name))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo every merge, newest first, restoring the base weights."""
        while self.merged_adapters:
            self.merged_adapters.pop()
            self.merge_undos.pop()()

    def _merge_one(self, adapter_name: str) -> Undo:
        """Fold the adapter's update into the base weights (through ``self.kind.apply_update``) and return how to
        take it out again. Layers whose adapters add computation that no weight can absorb (bottleneck adapters)
        keep this refusal."""
        raise TypeError(
            f"{type(self).__name__} adapters add layers to the model and cannot be merged into its weights; "
            "serve them unmerged (or use LoRA / (IA)^3 for zero-latency merging)"
        )

    def bypass(self) -> bool:
        """True when forward should be the base layer alone (adapters off, or merged, or none active; in a mixed
        batch: none left in this layer, e.g. after deleting the only adapter that targeted it)."""
        if self.mixed is not None:
            return not self.has_adapters
        return self.disabled or bool(self.merged_adapters) or not self.active_adapters

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed as in files, relative to the layer ("lora_A.weight" for the parameter
        ``lora_A.<name>.weight``). They share storage with the parameters, so loading copies into them."""
        out = {}
        for attr in self.adapter_attrs:
            store = getattr(self, attr)
            if adapter_name not in store:
                continue
            item = store[adapter_name]
            if isinstance(item, nn.Parameter):
                out[attr] = item.detach()
            else:
                out.update({f"{attr}.{k}": v.detach() for k, v in item.state_dict().items()})
        return out


def model_layer(module: nn.Module) -> nn.Module:
    """``module`` without the adapter layers wrapped around it."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def module_tree(root: nn.Module, into_adapters: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """``root.named_modules()`` without the adapters' own storage: an adapter layer's ``lora_A.<name>``, ... are
    skipped and only its ``base_layer`` is walked (or nothing under it, with ``into_adapters=False``: the layer
    stands for the module it wraps).

    Why: ``named_modules`` also visits every adapter's sub-modules, so finding targets or adapter layers cost time
    in proportion to the adapters loaded (0.2 s per load with 16 LoRA adapters on SmolLM2-135M in a server)."""
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        name, module = stack.pop()
        yield name, module
        if isinstance(module, AdapterLayer):
            children = [("base_layer", module.base_layer)] if into_adapters else []
        else:
            children = [(k, m) for k, m in module._modules.items() if m is not None]
        stack.extend((f"{name}.{k}" if name else k, m) for k, m in reversed(children))


LayerTree = list[tuple[str, AdapterLayer]]  # a model's adapter layers under their module paths, as module_tree walks them


class Replacements:
    """How many registered parameters or submodules of any module have been replaced by other objects in this process
    (``layer.lora_B[name].weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``, ``lora_B[name] =
    nn.Linear(...)``), counted by torch's global registration hooks. A :class:`StackCache` holds its sources by object,
    and such a replacement leaves the old object unchanged: without this count the stacks would keep serving the old
    weights. New names (every adapter added) do not count, nor do modules replaced outside adapter layers' own
    containers (wrapping a model's layer, in this model or another), so loads stay as cheap as they were."""

    count = 0

    @classmethod
    def seen(cls, module: nn.Module, name: str, value: Any) -> None:
        if isinstance(value, nn.Parameter) or value is None and name in module._parameters:
            old = module._parameters.get(name)
        elif isinstance(module, (nn.ModuleDict, AdapterLayer)):
            old = module._modules.get(name)
        else:
            return
        if old is not None and old is not value:  # (the hooks run before the assignment)
            cls.count += 1


torch.nn.modules.module.register_module_parameter_registration_hook(Replacements.seen)
torch.nn.modules.module.register_module_module_registration_hook(Replacements.seen)


class StackCache:
    """Per-adapter tensors stacked for mixed batches, one slot per adapter (``MixedBatch.order``), kept up to date
    slot by slot: loading or deleting an adapter rewrites its slot in place instead of rebuilding every slot (which
    cost a server 0.2-0.3 s per load on its first step with 16 adapters, and a fresh copy of all of them each time).

    The check runs in every forward of every layer, so it is kept cheap: the slots' keys and source tensors are
    assembled again only when the order or the layer's :meth:`StackedAdapterLayer.stack_signature` changes, from a
    memo per adapter name that only a new name, or a deleted or renamed one (:meth:`forget`), looks up afresh (looking
    up every slot's tensors in every layer after each load cost a server 20-45 ms on the next step with 16 adapters);
    otherwise their version counters (bumped by every in-place write: optimizer steps, loading, merging) and storage
    pointers (changed by ``.to()``) tell which slots' values moved, and :class:`Replacements` tells when an object
    was swapped for another. Stacks hold one spare slot per :attr:`HEADROOM`
    adapters, so adding adapters one by one rebuilds them every few adds (amortized: each add copies a few slots),
    while a server at its budget reuses freed slots and never rebuilds; a new adapter that does not fit (more slots,
    a larger rank) makes the layer build them all again. The stacks cost (slots) x (the largest rank per layer) x
    (in + out features): with 16 LoRA adapters on SmolLM2-135M, 243 MiB against 80 MiB of the adapters' own weights.
    """

    HEADROOM = 8

    def __init__(self) -> None:
        self.structure: tuple | None = None
        self.entries: dict[str, tuple[Any, tuple[torch.Tensor, ...]]] = {}  # name -> (slot key, source tensors)
        self.keys: list = []
        self.sources: list[tuple[torch.Tensor, ...]] = []
        self.state: list[tuple[int, int]] = []  # (version, storage) of every source, slot after slot
        self.built: list = []  # (key, state) of each slot the stacks hold now
        self.value: tuple = ()
        self.present: frozenset[int] = frozenset()  # the slots of the adapters this layer holds
        self.trusted: tuple[int, int] | None = None  # (model epoch, Replacements.count) of a check that found all held

    FREE = (None, ())  # what a free slot's entry in ``built`` is

    def forget(self, name: str) -> None:
        """``name``'s tensors are no longer what the memo holds (the adapter was deleted or renamed)."""
        self.entries.pop(name, None)

    def get(self, layer: StackedAdapterLayer, order: tuple[str, ...], used: tuple[int, ...] | None = None,
            epoch: int | None = None) -> tuple:
        """The stacks for ``order``, every slot in ``used`` (the slots this forward reads; None: all) up to date.

        ``epoch`` (:attr:`MixedBatch.epoch`): when every adapter here views its slot, writing one writes the stacks,
        so nothing needs checking until the model changes an adapter or an object is replaced (unseen: a held
        tensor's ``.data`` swapped). The checks cost a 16-row step of 12 mixed adapters 7.5 ms of 120 (SmolLM2-135M,
        16 resident, Xeon): a forward's weight traffic pushes the tensors they read out of the caches."""
        if epoch is not None:
            if self.trusted == (epoch, Replacements.count):
                return self.value
            used = None  # (a full check: it leaves no slot stale, so what it finds holds until the epoch moves)
        self._refresh(layer, order, used)
        self.trusted = (epoch, Replacements.count) if epoch is not None and self._all_held() else None
        return self.value

    def _all_held(self) -> bool:
        """Whether every slot's source i views that slot of stack i (LoRA's held factors), by the state the last full
        check recorded (asking each layer's adapters instead cost a server 12 ms per load)."""
        places = [(k, i) for k, sources in enumerate(self.sources) for i in range(len(sources))]
        return all(i < len(self.value) and torch.is_tensor(self.value[i]) and ptr == slot_address(self.value[i], k)
                   for (k, i), (_, ptr) in zip(places, self.state, strict=True))

    def _refresh(self, layer: StackedAdapterLayer, order: tuple[str, ...], used: tuple[int, ...] | None) -> None:
        # (the revision changes when an adapter is deleted: a new one of the same name is then a new slot entry)
        structure = (order, layer.stack_signature(), layer.revision, Replacements.count)
        if structure != self.structure:
            if self.structure is not None and structure[3] != self.structure[3]:
                self.entries.clear()  # (an object was replaced somewhere: look every source up again)
            self._assemble(layer, order)
            self.structure = structure
        elif used is not None and self.value and 2 * len(used) < len(self.keys) and self._current(used):
            # The slots this forward reads are as built; the others are brought up to date when a forward reads one
            # of them. So a step checks its own adapters, not every resident one's: with 73 resident and a step of
            # 12, the checks of SmolLM2-135M's 210 layers cost 2.9 ms this way against 11 ms. With few adapters
            # resident the one flat check below is cheaper (16 resident: 1.2 ms against 2.2), hence the threshold.
            return
        state = self._state()
        if state != self.state:  # (one flat comparison per step; which slots moved is worked out only when one did)
            built = self._built(state)
            if built != self.built:
                with torch.no_grad():  # mixed batches are for inference
                    self._update(layer, order, built)
                moved = self._state()  # an update may move sources: a layer that holds an adapter in its slot
                if moved != state:
                    state = moved
                    self.built[: len(order)] = self._built(state)[: len(order)]
            self.state = state

    def _state(self) -> list[tuple[int, int]]:
        try:
            return [(t._version, t.data_ptr()) for sources in self.sources for t in sources]
        except RuntimeError:  # an adapter added under torch.inference_mode: its tensors keep no version (and can
            # only change in place inside inference mode, which this cannot see; replacing them still shows)
            return [(-1 if t.is_inference() else t._version, t.data_ptr()) for sources in self.sources for t in sources]

    def _current(self, slots: Iterable[int]) -> bool:
        """Whether each of ``slots`` holds what :meth:`_built` would record for it now: its key and its sources'
        state, worked out exactly as :meth:`_state` does (a parameter pointed at an inference tensor keeps its own
        version counter, so asking ``is_inference`` first would disagree with the record)."""
        keys, sources, built = self.keys, self.sources, self.built
        if any(k >= len(keys) or k >= len(built) for k in slots):
            return False
        try:
            now = [(keys[k], tuple((t._version, t.data_ptr()) for t in sources[k])) for k in slots]
        except RuntimeError:
            now = [(keys[k], tuple((-1 if t.is_inference() else t._version, t.data_ptr()) for t in sources[k]))
                   for k in slots]
        return all(built[k] == entry for k, entry in zip(slots, now))

    def _built(self, state: list[tuple[int, int]]) -> list:
        """Each slot's (key, state of its sources), then a free entry for each slot past the last adapter."""
        built, at = [], 0
        for key, sources in zip(self.keys, self.sources):
            built.append((key, tuple(state[at : at + len(sources)])))
            at += len(sources)
        return built + [self.FREE] * (len(self.built) - len(built))

    def _assemble(self, layer: StackedAdapterLayer, order: tuple[str, ...]) -> None:
        """Each slot's key and source tensors for ``order``, looking up only names the memo lacks or whose key moved.
        When they come out as they were (a load or deletion in a slot whose adapter this layer holds neither before
        nor after), the slots' state is left as it stands: recomputing it in every such layer cost a server's first
        step after a load about 2 of its 23 extra ms (SmolLM2-135M, 16 resident, serve_steps.py part 3)."""
        names = set(layer.adapter_names)
        for name in [n for n in self.entries if n not in names]:
            del self.entries[name]
        for name in order:
            if name in names:
                key = (name, layer.slot_signature(name))
                if self.entries.get(name, (None,))[0] != key:
                    self.entries[name] = (key, layer.stack_sources(name))
        keys = [self.entries[n][0] if n in names else None for n in order]
        sources = [self.entries[n][1] if n in names else () for n in order]
        if keys == self.keys and len(sources) == len(self.sources) and all(map(operator.is_, sources, self.sources)):
            return  # (another slot's adapter changed, none of this layer's: its built state stands as it is)
        self.keys, self.sources = keys, sources
        self.present = frozenset(k for k, key in enumerate(self.keys) if key is not None)
        self.state = []  # (compared afresh against the slots' built state)

    def _update(self, layer: StackedAdapterLayer, order: tuple[str, ...], built: list) -> None:
        capacity = len(self.built)
        slots = order + (FREE_SLOT,) * (len(built) - len(order))
        dirty = [k for k, b in enumerate(built) if k >= capacity or b != self.built[k]]
        if not (self.value and len(built) <= capacity and all(layer.fill_slot(self.value, k, slots[k]) for k in dirty)):
            capacity = len(order) + max(1, len(order) // self.HEADROOM)
            reserved = layer.mixed.capacity if layer.mixed is not None and layer.mixed.capacity else 0
            capacity = max(capacity, reserved + 1)  # (+ the base's slot)
            self.value = layer.build_stacks(order + (FREE_SLOT,) * (capacity - len(order)))
        self.built = built[: len(order)] + [self.FREE] * (capacity - len(order))


class StackedAdapterLayer(AdapterLayer):
    """The template for methods whose adapters can serve one row each of a mixed batch (LoRA, (IA)^3, bottleneck).

    ``forward`` runs the base layer alone when the adapters are disabled, merged, none is active or none is left
    here; the active adapters through :meth:`active_forward`; or, in a mixed batch, each row through its own
    adapter with :meth:`mixed_forward`, given the per-adapter stacks that :meth:`build_stacks` makes from the
    tensors :meth:`stack_sources` names, cached until those change. Row ``i`` of a stack belongs to adapter
    ``mixed.order[i]``; rows for names this layer lacks (and for the base, ``order[0]``) must leave the output as
    the base layer's. A method supplies the four methods below and nothing else of the dispatch.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._stacks = StackCache()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._stacks.forget(adapter_name)

    def rename_adapter(self, old: str, new: str) -> None:
        super().rename_adapter(old, new)
        self._stacks.forget(old)
        self._stacks.forget(new)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mixed = self.mixed  # (each check below runs in every wrapped layer of every step: they are kept few)
        if self.bypass() or mixed is None and not self.has_adapters:  # (a layer whose adapters were all deleted stays wrapped)
            return self.base_layer(x, *args, **kwargs)
        if mixed is None:
            return self.active_forward(x, self.active_adapters, args, kwargs)
        stacks = self._stacks.get(self, mixed.order, mixed.used, mixed.epoch)
        if mixed.per_token:  # one flat sequence: each token is a row
            out = self.mixed_forward(x.reshape(-1, 1, *x.shape[2:]), stacks, args, kwargs)
            return out.reshape(*x.shape[:2], *out.shape[2:])
        return self.mixed_forward(x, stacks, args, kwargs)

    @abc.abstractmethod
    def active_forward(self, x: torch.Tensor, names: list[str], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """The output with the adapters ``names`` applied together (the method's own composition rule)."""

    @abc.abstractmethod
    def mixed_forward(self, x: torch.Tensor, stacks: tuple, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """The output with row b through adapter ``mixed.order[mixed.index[b]]`` (use :meth:`rows` on a stack)."""

    @abc.abstractmethod
    def stack_sources(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The tensors the stacks are built from for this adapter (their changes invalidate the cache)."""

    @abc.abstractmethod
    def build_stacks(self, order: tuple[str, ...]) -> tuple:
        """Every adapter in ``order`` stacked on a leading axis, with identity rows for names this layer lacks."""

    def stack_signature(self) -> tuple:
        """Whatever besides the adapter names decides the stacks' shape (LoRA: ranks and scales)."""
        return tuple(self.adapter_names)

    def slot_signature(self, adapter_name: str) -> Any:
        """What besides its tensors decides one adapter's slot (LoRA: its rank and scale)."""
        return None

    def fill_slot(self, stacks: tuple, slot: int, adapter_name: str) -> bool:
        """Write ``adapter_name``'s entries (identity ones for a name this layer lacks) into slot ``slot`` of
        ``stacks`` in place; False when they do not fit there (then every slot is built again). This default takes
        them from :meth:`build_stacks` of that name alone, and fits when every stack is a tensor of the same shape
        per slot; methods whose entries are padded (LoRA's ranks) say how."""
        if not all(torch.is_tensor(a) for a in stacks):  # (bottleneck stacks carry their non-linearities too)
            return False
        own = self.build_stacks((adapter_name,))
        if not all(torch.is_tensor(b) and a.shape[1:] == b.shape[1:] for a, b in zip(stacks, own)):
            return False
        for stack, entry in zip(stacks, own):
            stack[slot].copy_(entry[0])
        return True

    def rows(self, stack: torch.Tensor, batch: int, key: Hashable = None) -> torch.Tensor:
        """Each row's entry of ``stack``: ``stack[mixed.index]``; with ``key``, in the mixed batch's scratch buffer of
        that name (:class:`~peftkit.tuners.mixed_batch.Scratch`: valid until this forward's next gather with it)."""
        return gather_rows(stack, self.mixed.index, batch, self.mixed.scratch if key is not None else None, key)


class ModulesToSaveWrapper(AdapterLayer):
    """A module trained in full per adapter (e.g. a classification head): one copy per adapter name.

    Saved in adapter files under the module's own key (``base_model.model.score.weight``), as HF PEFT does.
    """

    adapter_attrs = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: PeftConfig, module_name: str, init: bool = True) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.base_layer)

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[adapter_name].state_dict())

    def merge(self, adapter_names: list[str] | None = None) -> None:
        # nothing to fold: the copy simply stays in use (merge_and_unload swaps it in)
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.mixed is not None:
            out = None
            for name, rows in zip(self.mixed.order, self.mixed.rows):
                if rows is None:
                    continue
                module = self.modules_to_save[name] if name in self.modules_to_save else self.base_layer
                part = module(x.index_select(0, rows), *args, **kwargs)
                if out is None:
                    out = part.new_empty((x.shape[0],) + part.shape[1:])
                out.index_copy_(0, rows, part)
            return out
        if self.disabled or not self.active_adapters:
            return self.base_layer(x, *args, **kwargs)
        return self.modules_to_save[self.active_adapters[0]](x, *args, **kwargs)


