"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): rescale activations by learned vectors, initialised to 1 so the model starts as the base model.

    attention-side targets (keys, values):   h = l ⊙ (W x + b)       l: out x 1 in files
    feed-forward targets:                     h = W (l ⊙ x) + b       l: 1 x in  in files

Several active adapters multiply: l = l_1 ⊙ l_2 ⊙ ... Merging scales the rows of W (and b) for output vectors,
or the columns of W for input vectors, so a merged model costs exactly what the base model costs; unmerging
divides them out again. A vector with a zero entry cannot be merged (the row would be lost), which is refused.

Mixed-adapter batches gather each row's vector from a stack of all adapters (ones for "no adapter") and apply
it with one elementwise multiply.

Field names, defaults, file keys (``base_model.model.<module>.ia3_l``), shapes and the feed-forward matching rule
follow Hugging Face PEFT, so adapter files move both ways.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..base_layers import KINDS, Undo, kind_of
from ..families import require
from .base import AdapterLayer, PeftConfig, Tuner, find_targets, register
from .layer import StackedAdapterLayer, model_layer

@dataclass
class IA3Config(PeftConfig):
    """(IA)^3 settings, with HF PEFT's field names and defaults.

    ``target_modules``: modules whose output (or, for feed-forward ones, input) is rescaled; ``None`` picks HF
    PEFT's default for the architecture (e.g. Llama: ``k_proj``, ``v_proj``, ``down_proj``; see
    :mod:`peftkit.families`).
    ``feedforward_modules``: the targets whose *input* is rescaled. A list entry matches every module path that
    ends with it (HF PEFT's rule, without a dot boundary: in BERT ``"output.dense"`` therefore also matches
    ``attention.output.dense``); a string is a regex matched against the full path. Must be a subset of
    ``target_modules`` when both are lists. ``None`` picks the architecture's default.
    ``init_ia3_weights``: True starts every vector at 1 (the model equals the base); False draws them from N(0, 1)
    (for tests only). ``fan_in_fan_out``: whether targets store W as in x out; each layer reads its layout from
    its module type (transformers' ``Conv1D`` is in x out, ``nn.Linear`` out x in), and, as HF PEFT does, the field
    is set to True when a ``Conv1D`` target is found, so saved configs say what the file's layout is.
    """

    peft_type: ClassVar[str] = "IA3"
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward_modules, (set, tuple)):
            self.feedforward_modules = sorted(self.feedforward_modules)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(
                    f"IA3Config.feedforward_modules must be a subset of target_modules; {extra} are not targets. "
                    f"Add them to target_modules or drop them from feedforward_modules."
                )
        if self.init_ia3_weights not in (True, False):
            raise ValueError(f"IA3Config.init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")

    def to_dict(self) -> dict[str, Any]:
        # HF PEFT's IA3Config has no layer selection and warns about unknown fields; leave them out when unused
        out = super().to_dict()
        for name in ("layers_to_transform", "layers_pattern"):
            if out[name] is None:
                del out[name]
        return out

    def is_feedforward(self, module_name: str) -> bool:
        """Whether ``module_name`` gets its input (True) or its output (False) rescaled (HF PEFT's rule)."""
        spec = self.feedforward_modules
        if isinstance(spec, str):
            return re.fullmatch(spec, module_name) is not None
        return any(module_name.endswith(key) for key in spec or [])


class IA3Layer(StackedAdapterLayer):
    """(IA)^3 around any linear base-layer kind (``nn.Linear``, ``Conv1D``, 4-bit and 8-bit bitsandbytes layers): one
    learned vector per adapter (``ia3_l``). The vector scales activations, so the forward never touches the base
    weight and works the same over quantized weights; merging scales the weight through the base layer's kind."""

    adapter_attrs = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        self.is_feedforward = is_feedforward
        self.fan_in_fan_out = self.kind.fan_in_fan_out  # Conv1D keeps W as (in, out)
        self.in_features, self.out_features = self.kind.features(self.model_layer)
        self.ia3_l = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: IA3Config, module_name: str, init: bool = True) -> None:
        if config.is_feedforward(module_name) != self.is_feedforward:
            side = "input (feed-forward)" if self.is_feedforward else "output"
            raise ValueError(
                f"{module_name} already rescales its {side} for adapters {self.adapter_names}; adapter "
                f"{adapter_name!r} classifies it the other way. Use the same feedforward_modules for every "
                "(IA)^3 adapter on a model."
            )
        device, dtype = self.kind.device(self.model_layer), self.kind.compute_dtype(self.model_layer)
        shape = (1, self.in_features) if self.is_feedforward else (self.out_features, 1)
        init = torch.ones if config.init_ia3_weights else torch.randn
        self.ia3_l[adapter_name] = nn.Parameter(init(shape, dtype=dtype, device=device))

    def _weight_factor(self, adapter_name: str) -> torch.Tensor:
        """The vector shaped to broadcast over the base weight: rows of W for output vectors, columns for input
        vectors (transposed for Conv1D, whose W is in x out)."""
        vector = self.ia3_l[adapter_name].detach()
        return vector.T if self.fan_in_fan_out else vector

    def _merge_one(self, adapter_name: str) -> Undo:
        vector = self.ia3_l[adapter_name].detach().float()
        if not (torch.isfinite(vector).all() and (vector != 0).all()):
            raise ValueError(
                f"cannot merge (IA)^3 adapter {adapter_name!r}: its vector has zero or non-finite entries, so the "
                "scaled weights could not be restored by unmerging. Run it unmerged instead."
            )
        factor = self._weight_factor(adapter_name).float()
        undo_weight = self.kind.apply_update(self.base_layer, lambda w: w * factor, lambda w: w / factor)
        bias = self.base_layer.bias
        if self.is_feedforward or bias is None:  # W (l ⊙ x) + b leaves b alone
            return undo_weight
        with torch.no_grad():
            bias.mul_(vector.flatten().to(bias.dtype))

        def restore() -> None:
            undo_weight()
            with torch.no_grad():
                bias.div_(vector.flatten().to(bias.dtype))

        return Undo(restore, undo_weight.error)

    def stack_sources(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return (self.ia3_l[adapter_name],)

    def build_stacks(self, order: tuple[str, ...]) -> tuple[torch.Tensor]:
        """The vectors of ``order`` as rows of one (n, features) matrix; ones (no scaling) for names it lacks."""
        ones = next(iter(self.ia3_l.values())).new_ones(self._features)
        return (torch.stack([self.ia3_l[n].flatten() if n in self.ia3_l else ones for n in order]),)

    def active_forward(self, x: torch.Tensor, names: list[str], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        scale = self.ia3_l[names[0]].flatten()
        for name in names[1:]:  # several active adapters compose: their vectors multiply
            scale = scale * self.ia3_l[name].flatten()
        return self._apply(x, scale, args, kwargs)

    def mixed_forward(self, x: torch.Tensor, stacks: tuple, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        rows = self.rows(stacks[0], x.shape[0])  # (batch, features): broadcast over the sequence axes
        return self._apply(x, rows.view(x.shape[0], *([1] * (x.dim() - 2)), self._features), args, kwargs)

    def _apply(self, x: torch.Tensor, scale: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """l ⊙ x into the base layer (feed-forward modules), or l ⊙ base(x)."""
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result.to(scale.dtype) * scale).to(result.dtype)

    @property
    def _features(self) -> int:
        return self.in_features if self.is_feedforward else self.out_features


@register
class IA3Tuner(Tuner):
    peft_type = "IA3"
    config_cls = IA3Config
    layer_cls = IA3Layer
    cli_names = {"ia3": {}}
    default_lr = (3e-3, 5e-3)

    def add_weighted(
        self, model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
        combination_type: str, configs: list[PeftConfig],
    ) -> IA3Config:
        """l_new = sum_i w_i l_i in every layer that holds some of the adapters (HF PEFT's rule for (IA)^3); the new
        adapter's config names those layers by their full paths."""
        if combination_type != "linear":
            raise ValueError(f"(IA)^3 adapters combine linearly: pass combination_type='linear', not {combination_type!r}")
        targets, feedforward = [], []
        for path, layer in self.layers(model):
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.ia3_l]
            if not present:
                continue
            with torch.no_grad():
                combined = sum(w * layer.ia3_l[a].detach() for a, w in present)
            layer.ia3_l[adapter_name] = nn.Parameter(combined, requires_grad=False)
            targets.append(path)
            if layer.is_feedforward:
                feedforward.append(path)
        if not targets:
            raise ValueError(f"none of the adapters {adapters} has (IA)^3 layers")
        first = configs[0]
        return IA3Config(
            target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=first.fan_in_fan_out,
            task_type=first.task_type, base_model_name_or_path=first.base_model_name_or_path,
            modules_to_save=first.modules_to_save,
        )

    def target_names(self, model: nn.Module, config: IA3Config) -> list[str]:
        self._fill_defaults(model, config)
        return find_targets(model, config)

    @staticmethod
    def _fill_defaults(model: nn.Module, config: IA3Config) -> None:
        """Write the family's default targets into ``config`` (as HF PEFT does), so saved files are explicit."""
        if config.target_modules is not None and config.feedforward_modules is not None:
            return
        missing = " and ".join(n for n in ("target_modules", "feedforward_modules") if getattr(config, n) is None)
        family = require(
            model, "(IA)^3 default", f"pass IA3Config {missing} (feedforward_modules=[] if no target is a "
            "feed-forward layer)", "ia3_targets", "ia3_feedforward",
        )
        if config.target_modules is None:
            config.target_modules = list(family.ia3_targets)
        if config.feedforward_modules is None:
            config.feedforward_modules = list(family.ia3_feedforward)

    def make_layer(self, module: nn.Module, config: IA3Config, module_name: str) -> AdapterLayer:
        kind = kind_of(model_layer(module))  # (under another method's layer when they share the module)
        if kind is None or not kind.linear:
            raise TypeError(
                f"(IA)^3 cannot wrap {module_name} ({type(module).__name__}): it supports linear layers "
                f"({', '.join(k.name for k in KINDS if k.linear)}). Remove it from target_modules."
            )
        if kind.fan_in_fan_out:
            config.fan_in_fan_out = True
        return IA3Layer(module, is_feedforward=config.is_feedforward(module_name))
