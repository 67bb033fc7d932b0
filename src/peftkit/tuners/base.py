"""The contract every PEFT method keeps, target matching, and the method registry.

A method is three things: a :class:`PeftConfig` subclass, an :class:`AdapterLayer` subclass that wraps one module
of the base model, and a :class:`Tuner` that decides which modules to wrap and how its adapters map to file keys.
Nothing outside ``tuners/`` knows method details; :class:`peftkit.PeftModel` talks to tuners and layers only
through the methods defined here.

Adapter layers keep the original module as ``base_layer`` (frozen) and hold their adapters in ``nn.ModuleDict`` /
``nn.ParameterDict`` attributes keyed by adapter name (listed in ``adapter_attrs``), so parameter names look like
HF PEFT's: ``...q_proj.lora_A.default.weight``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, NamedTuple

import torch
from torch import nn

from ..base_layers import is_linear
from ..families import head_names, layer_containers
from ..tying import shared_parameters, warn_if_tied
from .layer import AdapterLayer, LayerTree, ModulesToSaveWrapper, model_layer, module_tree

BASE = "__base__"  # the adapter name that means "no adapter" in mixed batches
FILE_PREFIX = "base_model.model."  # HF PEFT's key prefix for module parameters in adapter files

# Fields HF PEFT writes that carry no meaning for loading weights here.
_METADATA_FIELDS = {"auto_mapping", "peft_version", "revision", "megatron_core", "qalora_group_size"}


# ----------------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class PeftConfig:
    """Fields shared by every method; each method's config adds its own.

    ``target_modules``: a list of module names (a name matches exactly or as a dotted suffix), a regex string
    (full match against the module path), or ``"all-linear"``. ``exclude_modules`` takes the same forms.
    ``layers_to_transform``: only modules in these layer indices (found by ``layers_pattern``, default any of the
    layer containers in :mod:`peftkit.families`: ``layers``, ``h``, ``layer``, ``blocks``). ``modules_to_save``:
    modules trained fully and saved with the adapter.
    """

    peft_type: ClassVar[str] = ""
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        layers = self.layers_to_transform
        if layers is not None and (not isinstance(layers, list) or not all(_is_int(i) and i >= 0 for i in layers)):
            raise ValueError(f"{type(self).__name__}.layers_to_transform must be layer indices >= 0, got {layers!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"{type(self).__name__}.{name} must be a list of module names or a regex string, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON written to ``adapter_config.json`` (HF PEFT's field names)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PeftConfig":
        """Build from a saved config, accepting HF PEFT's extra fields when they are off, refusing them when on."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, refused = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key == "peft_type" or key in _METADATA_FIELDS or value in (None, False, {}, [], ""):
                continue
            else:
                refused.append(f"{key}={value!r}")
        if refused:
            raise ValueError(
                f"{source}: peftkit does not support these {cls.peft_type} options: {', '.join(refused)}. "
                "Remove them from adapter_config.json only if the adapter was trained without them."
            )
        return cls(**kwargs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(config: PeftConfig, field: str, value: Any, optional: bool = False) -> None:
    """Refuse ``value`` for ``config.<field>`` unless it is an integer >= 1 (or None when ``optional``)."""
    if optional and value is None:
        return
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{type(config).__name__}.{field} must be a positive integer, got {value!r}")


def check_positive_number(config: PeftConfig, field: str, value: Any, why: str = "") -> None:
    """Refuse ``value`` unless it is a finite number > 0; ``why`` says what a wrong one would do."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{type(config).__name__}.{field} must be a finite number > 0{why}, got {value!r}")


def check_fraction(config: PeftConfig, field: str, value: Any) -> None:
    """Refuse ``value`` unless it is a probability in [0, 1) (a dropout rate)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{type(config).__name__}.{field} must be a number in [0, 1), got {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Target matching

def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index(name: str, patterns: list[str] | str | None) -> int | None:
    patterns = [patterns] if isinstance(patterns, str) else (patterns or layer_containers())
    for pattern in patterns:
        found = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def valid_adapter_name(name: str) -> bool:
    """Adapter names are non-empty letters, digits, '_' or '-' (they become module keys and file folders), and not
    the base model's ``BASE`` nor an attribute of PyTorch's module containers (``train``, ``to``, ``keys``: the
    adapter's ``nn.ModuleDict`` entries could not take them)."""
    return bool(name) and name != BASE and re.fullmatch(r"[\w\-]+", name) is not None and name not in _CONTAINER_ATTRS


_CONTAINER_ATTRS = frozenset(dir(nn.ModuleDict()) + dir(nn.ParameterDict()))  # (instance attributes too: `training`)


def output_head_names(model: nn.Module) -> set[str]:
    """Module paths of the output head(s): never targeted by ``all-linear``."""
    heads, names = set(), head_names()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in module_tree(model):  # (not into adapters' own storage: a walk per load, see module_tree)
        if head is not None and module is head:
            heads.add(name)
        elif name.split(".")[-1] in names:
            heads.add(name)
    return heads


def find_targets(model: nn.Module, config: PeftConfig, allowed: tuple[type, ...] | None = None) -> list[str]:
    """Names of the modules ``config`` selects, in model order. Raises ``ValueError`` listing candidates if none."""
    spec = config.target_modules
    if spec is None:
        raise ValueError(f"{type(config).__name__} needs target_modules; candidates:\n{describe_targets(model)}")
    heads = output_head_names(model) if spec == "all-linear" else set()
    found = []
    for name, module in module_tree(model, into_adapters=False):  # (modules inside adapter layers are no targets)
        if not name:
            continue
        base = model_layer(module)  # a module wrapped earlier
        if spec == "all-linear":
            if not is_linear(base) or name in heads:
                continue
        elif not _matches(name, spec):
            continue
        if config.exclude_modules and _matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None and _layer_index(name, config.layers_pattern) not in config.layers_to_transform:
            continue
        found.append(name)
    if not found:
        raise ValueError(
            f"target_modules={spec!r} (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}) matched no module. Modules that can be targeted:\n"
            + describe_targets(model)
        )
    return found


def _layer_chain(module: nn.Module) -> Iterable[nn.Module]:
    """``module`` and, while it is an adapter layer, the layers it wraps."""
    yield module
    while isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSaveWrapper):
        module = module.base_layer
        yield module


def describe_targets(model: nn.Module, limit: int = 40) -> str:
    """Distinct module-name suffixes with their types, e.g. ``q_proj (Linear) x30``: what users can target."""
    counts: dict[tuple[str, str], int] = {}
    for name, module in model.named_modules():
        if name and (is_linear(module) or isinstance(module, (nn.Embedding, nn.Conv2d))):
            key = (re.sub(r"\.\d+\.", ".*.", name).split(".")[-1], type(module).__name__)
            counts[key] = counts.get(key, 0) + 1
    lines = [f"  {suffix} ({kind}) x{n}" for (suffix, kind), n in list(counts.items())[:limit]]
    return "\n".join(lines) or "  (no linear, embedding or conv layers)"


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


# ----------------------------------------------------------------------------------------------------------------
# Tuners and the registry


class CliOption(NamedTuple):
    """A run option (``peftkit train --r 8``, ``TrainConfig.r``) as a method takes it: the config field it sets and
    the value a run uses when neither flag nor config file gives one (None: the config class's own default)."""

    field: str
    default: Any = None


class Tuner:
    """How one method attaches adapters to a model and maps them to adapter-file keys.

    The default handles methods whose adapters live in :class:`AdapterLayer` wrappers around targeted modules;
    methods with other state (prompt embeddings, selected base parameters) override the hooks.

    A method offered by ``peftkit train`` says so here too, so the command line has no table of its own:
    ``cli_names`` maps each ``--method`` name to the config fields that name fixes (Houlsby vs Pfeiffer),
    ``cli_options`` the run options it takes, ``default_lr`` its peak learning rate for (language modelling,
    classification) runs.
    """

    peft_type: ClassVar[str] = ""
    config_cls: ClassVar[type[PeftConfig]] = PeftConfig
    layer_cls: ClassVar[type[AdapterLayer]] = AdapterLayer
    mergeable: ClassVar[bool] = True  # can merge_adapter fold it into the base weights?
    # Key prefix of the model's own modules (modules_to_save) in this method's files. HF PEFT's prompt-learning
    # models have no tuner wrapper between PeftModel and the transformers model, so theirs is "base_model.".
    file_prefix: ClassVar[str] = FILE_PREFIX
    cli_names: ClassVar[dict[str, dict[str, Any]]] = {}
    cli_options: ClassVar[dict[str, CliOption]] = {}
    default_lr: ClassVar[tuple[float, float]]

    def make_layer(self, module: nn.Module, config: PeftConfig, module_name: str) -> AdapterLayer:
        """Wrap one targeted module (override to choose a layer class by module type)."""
        return self.layer_cls(module)

    def inject(self, model: nn.Module, config: PeftConfig, adapter_name: str, init: bool = True) -> None:
        """Add adapter ``adapter_name`` to every module ``config`` targets, wrapping modules seen for the first time
        (``init=False``: its values are loaded next, see :meth:`AdapterLayer.update_layer`).

        A module that holds another method's adapters gets this method's layer around that one (LoRA rows and
        (IA)^3 rows on one ``v_proj``): each layer leaves rows and active sets that are not its own to the layer
        it wraps, so the methods never see each other's adapters."""
        shared = None  # (the model's tied parameters, found once, when a module is first wrapped)
        for name in self.target_names(model, config):
            module = model.get_submodule(name)
            layer = next((m for m in _layer_chain(module) if isinstance(m, self.layer_cls)), None)
            if layer is None:
                if isinstance(module, ModulesToSaveWrapper):
                    raise ValueError(f"{name} is in modules_to_save (trained in full); it cannot take {self.peft_type} adapters")
                if not isinstance(module, AdapterLayer):
                    shared = shared_parameters(model) if shared is None else shared
                    warn_if_tied(model, name, module, type(config).__name__, shared)
                layer = self.make_layer(module, config, name)
                parent, child = get_submodule_parent(model, name)
                setattr(parent, child, layer)
            layer.update_layer(adapter_name, config, name, init=init)

    def target_names(self, model: nn.Module, config: PeftConfig) -> list[str]:
        return find_targets(model, config)

    def layers(self, model: nn.Module, tree: LayerTree | None = None) -> Iterable[tuple[str, AdapterLayer]]:
        """This method's layers under the model's module names (file keys): a layer wrapped by another method's layer
        is at ``<module>.base_layer``, which is still ``<module>`` to the files. ``tree``: the model's adapter layers
        as (path, layer) when the caller has them already (PeftModel keeps them per set of adapters; a walk of
        SmolLM2-135M's modules costs 3 ms), else the model is walked."""
        for name, module in module_tree(model) if tree is None else tree:
            if type(module) is not ModulesToSaveWrapper and isinstance(module, self.layer_cls):
                yield re.sub(r"(\.base_layer)+$", "", name), module

    def adapter_tensors(self, model: nn.Module, adapter_name: str, config: PeftConfig,
                        tree: LayerTree | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors under HF PEFT file keys (``base_model.model.<path>.<key>``), sharing storage with
        the live parameters: saving clones them, loading validates a file against their shapes and copies in."""
        out = {}
        for name, layer in self.layers(model, tree):
            for key, value in layer.adapter_state_dict(adapter_name).items():
                out[f"{FILE_PREFIX}{name}.{key}"] = value
        return out

    def optional_tensors(self, model: nn.Module, adapter_name: str, config: PeftConfig,
                         tree: LayerTree | None = None) -> dict[str, torch.Tensor]:
        """Tensors a file may carry beyond the adapter's own (loaded when present, never required or saved);
        ``tree`` as for :meth:`layers`."""
        return {}

    def check_loadable(self, config: PeftConfig) -> None:
        """Raise if a file of this method cannot be restored as ``config`` asks (``inference_mode`` is False when
        loading to train further); called before the adapter is added, so a refused load leaves the model as it was."""

    def mark_trainable(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        """Extra parameters this method trains besides its adapter layers (LoRA's ``bias``, for instance)."""

    def mark_frozen(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        """Stop training state this method keeps outside adapter layers (the adapter is inactive or in inference
        mode); called before :meth:`mark_trainable` runs for the adapters that train."""

    def delete_adapter(self, model: nn.Module, adapter_name: str) -> None:
        """Drop state this method keeps outside adapter layers (its layers' adapters are removed already)."""

    def reuse(self, model: nn.Module, old: str, new: str, config: PeftConfig, tree: LayerTree | None = None) -> bool:
        """Rename adapter ``old`` to ``new`` in place, set up as ``config`` says, if ``config`` gives every layer the
        same shapes ``old`` has (``new == old``: the name stays, only the setup changes); False, with nothing changed,
        if not (the default: this method never reuses, and :meth:`PeftModel.replace_adapter` falls back to deleting
        and adding)."""
        return False

    def unload(self, model: nn.Module) -> None:
        """Undo changes made outside adapter layers (hooks, patched attributes) when the model is unloaded."""

    def add_weighted(
        self, model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
        combination_type: str, configs: list[PeftConfig],
    ) -> PeftConfig:
        """Add adapter ``adapter_name`` to ``model`` as a weighted combination of ``adapters`` (all of this method,
        with ``configs`` theirs) and return its config. Methods that can combine adapters override this."""
        raise TypeError(
            f"{self.peft_type} adapters cannot be combined by add_weighted_adapter; LoRA and (IA)^3 adapters can"
        )

    def prepare_inputs(
        self, peft_model: nn.Module, adapter_name: str, kwargs: dict[str, Any], generate: bool
    ) -> dict[str, Any]:
        """Rewrite forward (or, with ``generate``, generate) keyword arguments before the base model sees them,
        for methods that act on inputs rather than layers (prompt and prefix tuning)."""
        return kwargs


TUNERS: dict[str, Tuner] = {}


def register(tuner_cls: type[Tuner]) -> type[Tuner]:
    """Class decorator: make a method available by its ``peft_type`` (used when loading adapter files)."""
    TUNERS[tuner_cls.peft_type] = tuner_cls()
    return tuner_cls


def tuner_for(config_or_type: PeftConfig | str) -> Tuner:
    peft_type = config_or_type if isinstance(config_or_type, str) else config_or_type.peft_type
    if peft_type not in TUNERS:
        raise ValueError(f"unknown peft_type {peft_type!r}; peftkit knows {sorted(TUNERS)}")
    return TUNERS[peft_type]


def method_names() -> list[str]:
    """The ``--method`` names, in the order their tuners were registered."""
    return [name for tuner in TUNERS.values() for name in tuner.cli_names]


def tuner_for_method(method: str) -> Tuner:
    """The tuner behind ``peftkit train --method NAME``."""
    for tuner in TUNERS.values():
        if method in tuner.cli_names:
            return tuner
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(method_names())}")


def config_from_dict(data: dict[str, Any], source: str = "config") -> PeftConfig:
    """Build the right config class from a saved ``adapter_config.json`` dict."""
    if "peft_type" not in data:
        raise ValueError(f"{source}: no 'peft_type' field; is this an adapter_config.json?")
    try:
        tuner = tuner_for(str(data["peft_type"]).upper())
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return tuner.config_cls.from_dict(data, source)
