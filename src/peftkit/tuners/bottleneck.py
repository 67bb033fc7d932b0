"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): small residual MLPs inserted in each layer.

    h <- h + up(dropout(f(down(h))))        down: d -> m, up: m -> d, both with biases; m = d // reduction_factor

Each placement trains 2 m d + d + m parameters. ``up`` starts at zero, so the model starts as the base model;
``down`` starts from a normal distribution with std ``init_scale`` truncated at two std (Houlsby's near-identity
initialisation, with the up-projection zeroed instead of small).

Placement: the adapter wraps the *output projection* of a sub-block and is applied to that projection's output,
i.e. before the sub-block's residual add (and, in post-norm models like BERT, before its LayerNorm), which is
where Houlsby et al. put it. ``"houlsby"`` places one after the attention output projection and one after the
feed-forward output projection of every layer; ``"pfeiffer"`` only the feed-forward one. The module paths per
architecture come from :mod:`peftkit.families`; ``target_modules`` overrides them.

Several active adapters on one module run in parallel on the same input and their outputs add up. These adapters
add layers, so they cannot be merged into the base weights. Mixed-adapter batches stack every adapter's weights
(zeros for "no adapter", zero-padded to the widest bottleneck) and run each row's own adapter with batched
matmuls.

HF PEFT has no bottleneck adapters; files use its layout with ``peft_type`` "BOTTLENECK" and keys
``base_model.model.<module>.adapter_down.weight`` / ``.bias`` and ``.adapter_up.weight`` / ``.bias``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..families import require
from .base import (
    AdapterLayer,
    CliOption,
    PeftConfig,
    Tuner,
    check_fraction,
    check_positive_int,
    check_positive_number,
    find_targets,
    is_linear,
    register,
)
from .layer import StackedAdapterLayer, Uninitialised, model_layer

NON_LINEARITIES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}
VARIANTS = ("houlsby", "pfeiffer")


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck-adapter settings.

    ``variant``: ``"houlsby"`` (after attention and after the feed-forward block) or ``"pfeiffer"`` (after the
    feed-forward block only); ignored when ``target_modules`` names the modules explicitly.
    ``reduction_factor``: m = d // reduction_factor, unless ``bottleneck_size`` gives m directly.
    ``non_linearity``: ``"relu"``, ``"gelu"`` or ``"swish"``. ``dropout``: on the adapter's output while training.
    ``init_scale``: std of the down-projection's truncated-normal initialisation (the up-projection starts at 0).
    """

    peft_type: ClassVar[str] = "BOTTLENECK"
    variant: str = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    dropout: float = 0.0
    init_scale: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"BottleneckConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"BottleneckConfig.non_linearity must be one of {sorted(NON_LINEARITIES)}, got {self.non_linearity!r}"
            )
        check_positive_int(self, "bottleneck_size", self.bottleneck_size, optional=True)
        check_positive_number(self, "reduction_factor", self.reduction_factor, " (the bottleneck is d / reduction_factor)")
        check_fraction(self, "dropout", self.dropout)
        scale = self.init_scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"BottleneckConfig.init_scale must be a finite number >= 0, got {scale!r}")

    def bottleneck_for(self, features: int, module_name: str) -> int:
        """The bottleneck width m for a module with ``features`` outputs."""
        m = self.bottleneck_size or int(features // self.reduction_factor)
        if m < 1:
            raise ValueError(
                f"{module_name} has {features} outputs; reduction_factor={self.reduction_factor} leaves no bottleneck. "
                "Use a smaller reduction_factor or set bottleneck_size."
            )
        return m


class BottleneckLayer(StackedAdapterLayer):
    """Adds ``up(dropout(f(down(y))))`` to the output y of the wrapped module (any linear base-layer kind)."""

    adapter_attrs = ("adapter_down", "adapter_up")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.features = self.kind.features(self.model_layer)[1]  # the adapter acts on the output
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}

    def update_layer(self, adapter_name: str, config: BottleneckConfig, module_name: str, init: bool = True) -> None:
        m = config.bottleneck_for(self.features, module_name)
        device, dtype = self.kind.device(self.model_layer), self.kind.compute_dtype(self.model_layer)
        make = nn.Linear if init else Uninitialised
        down = make(self.features, m, device=device, dtype=dtype)
        up = make(m, self.features, device=device, dtype=dtype)
        if init:
            with torch.no_grad():
                std = config.init_scale
                nn.init.trunc_normal_(down.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        # p = 0 skips dropout entirely instead of running an identity that still copies
        self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.non_linearity[adapter_name] = config.non_linearity

    def active_forward(self, x: torch.Tensor, names: list[str], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        out = result
        for name in names:  # several active adapters each add their output (in parallel, on the same y)
            down, up = self.adapter_down[name], self.adapter_up[name]
            h = NON_LINEARITIES[self.non_linearity[name]](down(result.to(down.weight.dtype)))
            out = out + self.adapter_dropout[name](up(h)).to(result.dtype)
        return out

    def mixed_forward(self, x: torch.Tensor, stacks: tuple, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """Each row's adapter on its own row: gather stacked weights per row, then two batched matmuls.

        Base rows and absent adapters have all-zero weights and biases, and the padding of narrower bottlenecks
        is zero too; f(0) = 0 for every supported f, so those contribute exactly nothing."""
        y = self.base_layer(x, *args, **kwargs)
        batch = y.shape[0]
        W_down, b_down, W_up, b_up, kinds, kind_index = stacks
        y3 = y.reshape(batch, -1, self.features).to(W_down.dtype)
        z = torch.baddbmm(self.rows(b_down, batch).unsqueeze(1), y3, self.rows(W_down, batch, "W_down").transpose(1, 2))
        if len(kinds) == 1:
            h = NON_LINEARITIES[kinds[0]](z)
        else:  # adapters with different non-linearities: apply each (m is small), keep each row's own
            rows_kind = self.rows(kind_index.to(y.device), batch)
            h = torch.stack([NON_LINEARITIES[k](z) for k in kinds])[rows_kind, torch.arange(batch, device=y.device)]
        delta = torch.baddbmm(self.rows(b_up, batch).unsqueeze(1), h, self.rows(W_up, batch, "W_up").transpose(1, 2))
        return y + delta.reshape(y.shape).to(y.dtype)

    def stack_sources(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        down, up = self.adapter_down[adapter_name], self.adapter_up[adapter_name]
        return down.weight, down.bias, up.weight, up.bias

    def stack_signature(self) -> tuple:
        return tuple(self.non_linearity.items())

    def slot_signature(self, adapter_name: str) -> str:
        return self.non_linearity[adapter_name]

    def build_stacks(
        self, order: tuple[str, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        """Weights of every adapter in ``order`` stacked on a leading axis (zeros where a name has none here),
        the distinct non-linearities, and each name's index into them."""
        present = [n for n in order if n in self.adapter_down]
        m_max = max(self.adapter_down[n].out_features for n in present)
        ref = self.adapter_down[present[0]].weight
        W_down = ref.new_zeros(len(order), m_max, self.features)
        b_down = ref.new_zeros(len(order), m_max)
        W_up = ref.new_zeros(len(order), self.features, m_max)
        b_up = ref.new_zeros(len(order), self.features)
        kinds = sorted({self.non_linearity[n] for n in present})
        kind_index = torch.zeros(len(order), dtype=torch.long)
        for i, name in enumerate(order):
            if name in self.adapter_down:
                down, up = self.adapter_down[name], self.adapter_up[name]
                m = down.out_features
                W_down[i, :m], b_down[i, :m] = down.weight, down.bias
                W_up[i, :, :m], b_up[i] = up.weight, up.bias
                kind_index[i] = kinds.index(self.non_linearity[name])
        return W_down, b_down, W_up, b_up, kinds, kind_index

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.adapter_dropout:
            del self.adapter_dropout[adapter_name]
        self.non_linearity.pop(adapter_name, None)


@register
class BottleneckTuner(Tuner):
    peft_type = "BOTTLENECK"
    config_cls = BottleneckConfig
    layer_cls = BottleneckLayer
    mergeable = False
    cli_names = {variant: {"variant": variant} for variant in VARIANTS}
    cli_options = {"reduction_factor": CliOption("reduction_factor", 16), "dropout": CliOption("dropout")}
    default_lr = (1e-3, 1e-3)

    def target_names(self, model: nn.Module, config: BottleneckConfig) -> list[str]:
        if config.target_modules is not None:
            return find_targets(model, config)
        family = require(
            model, "bottleneck-adapter placement", "pass target_modules (--target-modules): the attention and "
            "feed-forward output projections", "attention_output", "feedforward_output",
        )
        # anchored right after the layer index: in BERT `output.dense` also ends `attention.output.dense`
        attention, feedforward = (
            rf"(.*\.)?{re.escape(family.layers)}\.\d+\.{re.escape(path)}"
            for path in (family.attention_output, family.feedforward_output)
        )
        pattern = f"(?:{attention})|(?:{feedforward})" if config.variant == "houlsby" else feedforward
        return find_targets(model, dataclasses.replace(config, target_modules=pattern))

    def make_layer(self, module: nn.Module, config: BottleneckConfig, module_name: str) -> AdapterLayer:
        if not is_linear(model_layer(module)):  # (under another method's layer when they share the module)
            raise TypeError(
                f"a bottleneck adapter cannot wrap {module_name} ({type(module).__name__}): it goes on the output "
                "of a linear projection (nn.Linear, transformers' Conv1D or a bitsandbytes linear layer)"
            )
        return BottleneckLayer(module)
