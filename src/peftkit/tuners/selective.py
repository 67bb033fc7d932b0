"""Selective fine-tuning: train chosen parameters of the model itself. BitFit (Ben Zaken et al. 2022) trains the biases.

An adapter is a trainable copy theta_a of each chosen parameter theta_0 (taken when the adapter is added), kept in a
:class:`SelectiveLayer` around the module that owns theta_0. The module runs with

    theta = theta_a                                   one active adapter holds theta
    theta = theta_0 + sum_a (theta_a - theta_0)       several active adapters hold theta (their changes add up)

so the base model itself never changes: ``disable_adapter()``, ``delete_adapter`` and ``unload()`` give the original
values back, adapters of this kind can coexist and switch, and rows of one batch can use different ones. Merging
writes theta into the base parameter (the original is kept for ``unmerge_adapter``); ``merge_and_unload()`` returns
the plain model with the trained values, at the base model's cost.

Files hold the chosen tensors under their own names, ``base_model.model.<parameter name>`` (e.g.
``base_model.model.bert.encoder.layer.5.output.dense.bias``), with peft_type ``BITFIT`` or ``SELECTIVE`` (peftkit's
own; HF PEFT has neither). Parameters inside ``modules_to_save`` modules (trained in full anyway) are never chosen,
and a parameter shared by two modules (tied input and output embeddings) is refused: training one copy would untie it.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from ..base_layers import Undo
from .base import (
    AdapterLayer,
    PeftConfig,
    Tuner,
    _layer_index,
    _matches,
    get_submodule_parent,
    register,
)
from .layer import module_tree


@dataclass
class BitFitConfig(PeftConfig):
    """BitFit: train every bias parameter, or the biases of modules chosen by ``target_modules`` (names or a regex,
    as for LoRA), ``exclude_modules`` and ``layers_to_transform``."""

    peft_type: ClassVar[str] = "BITFIT"


@dataclass
class SelectiveConfig(PeftConfig):
    """Train chosen existing parameters.

    ``layers``: indices of transformer layers whose parameters all train; negative counts from the top, so
    ``layers=[-2, -1]`` trains the top two (layers are found by ``layers_pattern``, default ``layers``/``h``/``layer``/
    ``blocks``). ``parameter_pattern``: a regex searched in each parameter name (``re.search``; anchor it with ``^...$``
    for a full match), e.g. ``r"\\.mlp\\."`` or ``r"norm"``. With both, a parameter must satisfy both.
    """

    peft_type: ClassVar[str] = "SELECTIVE"
    layers: list[int] | int | None = None
    parameter_pattern: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if self.layers is not None and (
            not isinstance(self.layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        ):
            raise ValueError(f"SelectiveConfig.layers must be layer indices (negative counts from the top), got {self.layers!r}")
        if self.layers is None and self.parameter_pattern is None:
            raise ValueError("SelectiveConfig needs layers=[...] (e.g. [-2, -1] for the top two) and/or parameter_pattern")
        if self.target_modules is not None or self.layers_to_transform is not None:
            raise ValueError(
                "SelectiveConfig chooses parameters with layers and parameter_pattern; remove target_modules / "
                "layers_to_transform"
            )
        if self.parameter_pattern is not None:
            try:
                re.compile(self.parameter_pattern)
            except re.error as err:
                raise ValueError(f"SelectiveConfig.parameter_pattern {self.parameter_pattern!r} is not a regex: {err}") from None


class SelectiveLayer(AdapterLayer):
    """Runs ``base_layer`` with adapter values substituted for some of its own parameters (``torch.func.functional_call``).

    ``selected[adapter][param]`` is the trainable copy of ``base_layer.<param>``.
    """

    adapter_attrs = ("selected",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.selected = nn.ModuleDict()
        self._originals: dict[str, torch.Tensor] = {}  # base values from before the first merge

    def update_layer(self, adapter_name: str, config: PeftConfig, module_name: str, init: bool = True) -> None:
        # which parameters to copy is decided across the whole model (tied weights, layer indices), so the tuner picks
        # them and calls add_selection; a config alone does not say what to create in one module
        raise TypeError(f"{type(self).__name__} adapters are added by BitFitTuner / SelectiveTuner, which call add_selection")

    def add_selection(self, adapter_name: str, param_names: list[str]) -> None:
        """Make trainable copies of ``base_layer``'s parameters ``param_names`` for adapter ``adapter_name``."""
        store = nn.ParameterDict()
        for name in param_names:
            store[name] = nn.Parameter(getattr(self.base_layer, name).detach().clone())
        self.selected[adapter_name] = store

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        # keyed by the parameter's own name, so files read base_model.model.<module>.<param>
        if adapter_name not in self.selected:
            return {}
        return {name: value.detach() for name, value in self.selected[adapter_name].items()}

    def _values(self, names: list[str], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """theta for every parameter some adapter in ``names`` holds (see the module docstring)."""
        out: dict[str, torch.Tensor] = {}
        for param in {p for n in names for p in self.selected[n]}:
            holders = [self.selected[n][param] for n in names if param in self.selected[n]]
            if len(holders) == 1:
                out[param] = holders[0]
            else:
                out[param] = base[param] + sum(h - base[param] for h in holders)
        return out

    def _run(self, names: list[str], args: tuple, kwargs: dict[str, Any]) -> Any:
        names = [n for n in names if n in self.selected]
        if not names:
            return self.base_layer(*args, **kwargs)
        base = dict(self.base_layer.named_parameters(recurse=False))
        return functional_call(self.base_layer, self._values(names, base), args, kwargs, strict=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.mixed is not None:
            return self._mixed_forward(args, kwargs)
        if self.bypass():
            return self.base_layer(*args, **kwargs)
        return self._run(self.active_adapters, args, kwargs)

    def _mixed_forward(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        # one sub-batch per adapter present: each needs its own parameter values
        x, rest = args[0], args[1:]
        if self.mixed.index.numel() != x.shape[0]:
            raise ValueError(f"adapter_names has {self.mixed.index.numel()} entries but the batch has {x.shape[0]} rows")
        out = None
        for name, rows in zip(self.mixed.order, self.mixed.rows):
            if rows is None:
                continue
            part = self._run([name], (x.index_select(0, rows), *rest), kwargs)
            if out is None:
                out = part.new_empty((x.shape[0],) + part.shape[1:])
            out.index_copy_(0, rows, part)
        return out

    def _merge_one(self, adapter_name: str) -> Undo:
        """Set each parameter this adapter holds to theta over every merged adapter (built from the originals, kept
        in ``_originals`` while a merge is in place); the Undo copies the previous values back, bit for bit."""
        params = dict(self.base_layer.named_parameters(recurse=False))
        touched = list(self.selected[adapter_name])
        before = {name: params[name].detach().clone() for name in touched}
        merged = [n for n in self.merged_adapters + [adapter_name] if n in self.selected]
        with torch.no_grad():
            for name in touched:
                self._originals.setdefault(name, before[name])  # untouched by earlier merges: still the original
            values = self._values(merged, self._originals)
            for name in touched:
                params[name].copy_(values[name])

        def restore() -> None:
            with torch.no_grad():
                for name in touched:
                    params[name].copy_(before[name])
            if not self.merged_adapters:  # unmerge pops the name first: this was the last merge
                self._originals.clear()

        return Undo(restore)


def _shared_parameters(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def candidate_parameters(model: nn.Module, config: PeftConfig) -> list[tuple[str, str, nn.Parameter]]:
    """(module path, parameter name, parameter) for every parameter of the model itself: not adapter state, not
    inside ``modules_to_save`` modules; a :class:`SelectiveLayer` counts as the module it wraps."""
    out = []
    for path, module in module_tree(model, into_adapters=False):
        if isinstance(module, AdapterLayer) and not isinstance(module, SelectiveLayer):
            continue
        if config.modules_to_save and path and _matches(path, config.modules_to_save):
            continue
        owner = module.base_layer if isinstance(module, SelectiveLayer) else module
        for name, param in owner.named_parameters(recurse=False):
            out.append((path, name, param))
    return out


def _full_name(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _SelectiveTunerBase(Tuner, abc.ABC):
    layer_cls = SelectiveLayer

    @abc.abstractmethod
    def choose(self, model: nn.Module, config: PeftConfig) -> dict[str, list[str]]:
        """module path -> names of its parameters this adapter trains."""

    def inject(self, model: nn.Module, config: PeftConfig, adapter_name: str, init: bool = True) -> None:
        for path, params in self.choose(model, config).items():
            module = model.get_submodule(path)
            if not isinstance(module, SelectiveLayer):
                module = SelectiveLayer(module)
                parent, child = get_submodule_parent(model, path)
                setattr(parent, child, module)
            module.add_selection(adapter_name, params)

    @staticmethod
    def group(model: nn.Module, chosen: list[tuple[str, str, nn.Parameter]]) -> dict[str, list[str]]:
        shared = _shared_parameters(model)
        tied = [_full_name(p, n) for p, n, param in chosen if id(param) in shared]
        if tied:
            raise ValueError(
                f"{tied[:3]} are shared with another module (tied weights, e.g. input and output embeddings); training a "
                "copy would untie them. Exclude them from the selection."
            )
        out: dict[str, list[str]] = {}
        for path, name, _ in chosen:
            if not path:
                raise ValueError(f"parameter {name!r} belongs to the model's root module and cannot be selected")
            out.setdefault(path, []).append(name)
        return out


@register
class BitFitTuner(_SelectiveTunerBase):
    peft_type = "BITFIT"
    config_cls = BitFitConfig
    cli_names = {"bitfit": {}}
    default_lr = (1e-3, 1e-3)

    def choose(self, model: nn.Module, config: PeftConfig) -> dict[str, list[str]]:
        candidates = candidate_parameters(model, config)
        biases = [c for c in candidates if c[1] == "bias"]
        if not biases:
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ValueError(
                f"BitFit trains bias parameters, and this model ({kind}) has none (Llama-style models such as SmolLM2 "
                "use no biases). Use LoRA (LoraConfig) or (IA)^3 instead."
            )
        chosen = [
            (path, name, param)
            for path, name, param in biases
            if (config.target_modules is None or _matches(path, config.target_modules))
            and not (config.exclude_modules and _matches(path, config.exclude_modules))
            and (config.layers_to_transform is None or _layer_index(path, config.layers_pattern) in config.layers_to_transform)
        ]
        if not chosen:
            examples = sorted({re.sub(r"\.\d+\.", ".*.", p) for p, _, _ in biases})[:10]
            raise ValueError(
                f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}, "
                f"layers_to_transform={config.layers_to_transform!r}) matched no module with a bias. Modules with "
                f"biases: {examples}"
            )
        return self.group(model, chosen)


@register
class SelectiveTuner(_SelectiveTunerBase):
    peft_type = "SELECTIVE"
    config_cls = SelectiveConfig

    def choose(self, model: nn.Module, config: SelectiveConfig) -> dict[str, list[str]]:
        candidates = candidate_parameters(model, config)
        chosen = candidates
        if config.layers is not None:
            indices = {id(param): _layer_index(_full_name(p, n), config.layers_pattern) for p, n, param in candidates}
            found = [i for i in indices.values() if i is not None]
            if not found:
                raise ValueError(
                    f"SelectiveConfig.layers={config.layers}: no parameter name has a layer index (layers_pattern="
                    f"{config.layers_pattern!r}); parameters look like {[_full_name(p, n) for p, n, _ in candidates[:8]]}"
                )
            count = max(found) + 1
            bad = [i for i in config.layers if not -count <= i < count]
            if bad:
                raise ValueError(f"SelectiveConfig.layers {bad} out of range: the model has {count} layers (0..{count - 1})")
            wanted = {i % count for i in config.layers}
            chosen = [c for c in chosen if indices[id(c[2])] in wanted]
        if config.parameter_pattern is not None:
            pattern = re.compile(config.parameter_pattern)
            chosen = [c for c in chosen if pattern.search(_full_name(c[0], c[1]))]
        if not chosen:
            names = [_full_name(p, n) for p, n, _ in candidates]
            raise ValueError(
                f"SelectiveConfig(layers={config.layers}, parameter_pattern={config.parameter_pattern!r}) matched no "
                f"parameter. The model has {len(names)} parameters, e.g.: {names[:6] + names[-6:]}"
            )
        return self.group(model, chosen)
