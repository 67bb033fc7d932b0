"""LoRA (Hu et al. 2021): a frozen weight W0 plus a trainable low-rank update.

    h = W0 x + (alpha / r) * B A x          A: r x k (random init), B: d x r (zero init, so h = W0 x at start)

With ``use_rslora`` the scale is alpha / sqrt(r) (Kalajdzievski 2023). Merging folds the update into the weight,
W = W0 + (alpha / r) B A, so a merged model costs exactly what the base model costs.

Mixed-adapter batches gather each row's A and B from stacks of all adapters (zeros for "no adapter") and apply
them with two batched matmuls, instead of one sub-batch per adapter; on the CPU, rows of one token (decode steps,
every token of a fused serving step) go through a compiled kernel that reads each row's factors in their slot
instead (:mod:`peftkit.kernels`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..base_layers import KINDS, Undo, kind_of
from ..families import require
from .base import (FILE_PREFIX, AdapterLayer, CliOption, PeftConfig, Tuner, check_fraction, check_positive_int,
                   check_positive_number, find_targets, register)
from .layer import LayerTree, StackedAdapterLayer, Uninitialised, model_layer, module_tree
from .mixed_batch import gather_rows, slot_address
from .lora_combine import add_weighted_lora
from .lora_stacks import added, stack_factors


# why lora_alpha must be positive: the update is (alpha / r) B A, so alpha = 0 zeroes every LoRA gradient
ALPHA_WHY = " (the update is scaled by lora_alpha / r: 0 makes it, and every LoRA gradient, zero)"


@dataclass
class LoraConfig(PeftConfig):
    """LoRA settings, with HF PEFT's field names and defaults.

    ``target_modules``: ``None`` picks HF PEFT's default for the architecture (the attention query and value
    projections, e.g. Llama: ``q_proj``, ``v_proj``; see :mod:`peftkit.families`).
    ``r``: rank; ``lora_alpha``: scale numerator (scale = alpha / r, or alpha / sqrt(r) with ``use_rslora``);
    ``bias``: also train ``"all"`` biases or the biases of LoRA-wrapped layers (``"lora_only"``);
    ``init_lora_weights``: True (A Kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or False
    (both random: the adapter is not a no-op, for tests); ``fan_in_fan_out``: the base stores W as (in, out), as
    GPT-2's Conv1D does (set automatically for Conv1D); ``rank_pattern`` / ``alpha_pattern``: per-module
    overrides, keyed by a module-name suffix or regex.
    """

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "r", self.r)
        check_positive_number(self, "lora_alpha", self.lora_alpha, ALPHA_WHY)
        for pattern, field_name, check in (("rank_pattern", "r", check_positive_int), ("alpha_pattern", "lora_alpha", check_positive_number)):
            values = getattr(self, pattern)
            if not isinstance(values, dict):
                raise ValueError(f"LoraConfig.{pattern} must be a dict of module name -> {field_name}, got {values!r}")
            for key, value in values.items():
                check(self, f"{pattern}[{key!r}]", value)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}")
        check_fraction(self, "lora_dropout", self.lora_dropout)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """Rank and alpha for one module, after ``rank_pattern`` / ``alpha_pattern`` (HF PEFT's matching rule)."""

        def lookup(patterns: dict, default):
            for key, value in patterns.items():
                if re.match(rf"(.*\.)?({key})$", module_name):
                    return value
            return default

        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.lora_alpha)


def _scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class _LoraLayerBase:
    """What LoRA's two layer classes share: each adapter's rank and scale, and the mixed-batch template's stacks
    (the scaled factors)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}

    def _add_rank(
        self, adapter_name: str, config: LoraConfig, module_name: str
    ) -> tuple[int, torch.device, torch.dtype]:
        """Record the adapter's rank and scale for ``module_name``; return the rank and the device and dtype of the
        base layer's computation, which the new factors take."""
        r = self.record_rank(adapter_name, config, module_name)
        return r, self.kind.device(self.model_layer), self.kind.compute_dtype(self.model_layer)

    def record_rank(self, adapter_name: str, config: LoraConfig, module_name: str) -> int:
        """Record the adapter's rank and scale (alpha / r, or alpha / sqrt(r) with rsLoRA) for ``module_name``."""
        r, alpha = config.rank_and_alpha(module_name)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = _scaling(r, alpha, config.use_rslora)
        return r

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.r.pop(adapter_name, None)
        self.scaling.pop(adapter_name, None)

    def rename_adapter(self, old: str, new: str) -> None:
        super().rename_adapter(old, new)
        self.r.pop(old, None)
        self.scaling.pop(old, None)

    def stack_sources(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return self.factor_tensors(adapter_name)

    def stack_signature(self) -> tuple:
        return tuple(self.r.items()), tuple(self.scaling.items())

    def build_stacks(self, order: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        stacks = stack_factors(self, order)
        if self.mixed is not None and self.mixed.hold_in_slots:
            for slot, name in enumerate(order):
                self.hold_in_slot(stacks, slot, name)
        return stacks

    def slot_signature(self, adapter_name: str) -> tuple[int, float]:
        return self.r[adapter_name], self.scaling[adapter_name]

    def fill_slot(self, stacks: tuple, slot: int, adapter_name: str) -> bool:
        """Slot ``slot`` of (A, B transposed, scale, rank) := this adapter's factors zero-padded to the stacks' rank,
        its scale and its rank (zeros if absent); nothing to copy when its factors already live there."""
        A, B, scale, ranks = stacks
        r = self.r.get(adapter_name, 0)
        if r > A.shape[1]:
            return False
        if not (r and self._held_at(stacks, slot, adapter_name)):
            if r < A.shape[1]:  # the padding past its rank: trailing rows of both (B is held transposed)
                A[slot, r:].zero_()
                B[slot, r:].zero_()
            if r:
                A_name, B_name = self.factor_tensors(adapter_name)
                A[slot, :r] = A_name
                B[slot, :r] = B_name.T
        scale[slot], ranks[slot] = self.scaling.get(adapter_name, 0.0), r
        if self.mixed is not None and self.mixed.hold_in_slots:
            self.hold_in_slot(stacks, slot, adapter_name)
        return True

    def hold_in_slot(self, stacks: tuple, slot: int, adapter_name: str) -> None:
        """Make the adapter's factors views of its slot, which already holds their values, so that its weights exist
        once (vLLM keeps a server's adapters only in such stacked slots): a server's loaded adapters took as much
        memory again as their padded slots. Loading into the factors (a reused adapter's layers,
        :meth:`PeftModel.replace_adapter`) then writes its slot directly. Frozen adapters only: a trained one's
        parameters stay its own."""
        if adapter_name not in self.r:
            return
        r = self.r[adapter_name]
        A_name, B_name = self.factor_tensors(adapter_name)
        if A_name.requires_grad or B_name.requires_grad or self._held_at(stacks, slot, adapter_name):
            return
        A_name.data = stacks[0][slot, :r]
        B_name.data = stacks[1][slot, :r].T  # (out, r), strided: the slot holds it transposed

    def _held_at(self, stacks: tuple, slot: int, adapter_name: str) -> bool:
        A_name, B_name = self.factor_tensors(adapter_name)
        return A_name.data_ptr() == slot_address(stacks[0], slot) and B_name.data_ptr() == slot_address(stacks[1], slot)


def _merge_delta(layer: LoraLayer | LoraEmbedding, adapter_name: str) -> Undo:
    """W <- W + (alpha / r) B A through the base layer's kind (a quantized kind requantizes, and its Undo restores
    the old bits; a full-precision one subtracts the same delta again)."""
    with torch.no_grad():
        delta = layer.delta_weight(adapter_name).float()
    return layer.kind.apply_update(layer.base_layer, lambda w: w + delta.to(w.dtype), lambda w: w - delta.to(w.dtype))


class LoraLayer(_LoraLayerBase, StackedAdapterLayer):
    """LoRA around ``nn.Linear``, transformers' ``Conv1D`` or a bitsandbytes quantized linear layer."""

    adapter_attrs = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out or self.kind.fan_in_fan_out
        self.in_features, self.out_features = self.kind.features(self.model_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str, init: bool = True) -> None:
        r, device, dtype = self._add_rank(adapter_name, config, module_name)
        make = nn.Linear if init else Uninitialised  # (initialised: the same random draws as before this option)
        self.lora_A[adapter_name] = make(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[adapter_name] = make(r, self.out_features, bias=False, device=device, dtype=dtype)
        # p = 0 skips dropout entirely instead of running an identity that still copies
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        if init:
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)

    def reset_lora_parameters(self, adapter_name: str, init: bool | str) -> None:
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init is False:
                return  # nn.Linear's default (Kaiming-uniform) for both: a non-zero update
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[adapter_name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    def factor_tensors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A: r x in, B: out x r)."""
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """(alpha / r) B A, shaped like the base weight (transposed for fan-in-fan-out bases)."""
        delta = self.lora_B[adapter_name].weight @ self.lora_A[adapter_name].weight * self.scaling[adapter_name]
        return delta.T if self.fan_in_fan_out else delta

    def _merge_one(self, adapter_name: str) -> Undo:
        return _merge_delta(self, adapter_name)

    def active_forward(self, x: torch.Tensor, names: list[str], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            h = F.linear(self.lora_dropout[name](x.to(A.dtype)), A)
            result = result + (F.linear(h, B) * self.scaling[name]).to(result.dtype)
        return result

    def mixed_forward(self, x: torch.Tensor, stacks: tuple, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        single = self.mixed.single
        if single is not None and x.shape[0] == self.mixed.index.numel():  # one slot for every row: no gather
            name = self.mixed.order[single]
            if name not in self.r:  # the base, or an adapter that does not target this layer
                return result
            h = F.linear(x.to(stacks[0].dtype), stacks[0][single]) * self.scaling[name]  # (rank-padded)
            return result + (h @ stacks[1][single]).to(result.dtype)
        if self.mixed.segments and x.shape[0] == self.mixed.index.numel():  # a fused step: prompts are runs
            # the CPU kernel takes every token in one call, prompts too: 1.1-2.3x faster per layer than the runs'
            # matmuls (a run of 38 tokens, 14 decode rows; SmolLM2-135M's shapes), whose small rank makes them slow
            if not self._rows_kernel(result, x, stacks, 0, x.shape[0]):
                for start, stop, slot in self.mixed.segments:
                    result = self._add_delta(result, x, stacks, start, stop, slot)
            return result
        return self._add_delta(result, x, stacks, 0, x.shape[0], None)

    def _rows_kernel(self, result: torch.Tensor, x: torch.Tensor, stacks: tuple, start: int, stop: int) -> bool:
        """Rows start:stop of ``result`` plus their update, each row through its own slot, in place by the CPU
        kernel (only the rows whose adapter this layer holds); False, with nothing done, where it does not apply."""
        members = self.mixed.members(self._stacks.present, start, stop)
        if members is None:
            return True
        A, B, scale, ranks = stacks
        if members is True and start == 0 and stop == x.shape[0]:  # every row: no slicing (as dear as the checks)
            return kernels.add_lora_rows(result, x, A, B, scale, None, self.mixed.index, ranks)
        rows, index = (None, self.mixed.index[start:stop]) if members is True else members
        return kernels.add_lora_rows(result[start:stop], x[start:stop], A, B, scale, rows, index, ranks)

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, stacks: tuple, start: int, stop: int,
                   slot: int | None) -> torch.Tensor:
        """``result`` plus the update of rows start:stop of ``x``: through ``slot``'s factors at once, or (slot None)
        each row through its own slot's gathered factors, only the rows whose adapter this layer holds."""
        if slot is not None:
            name, (A, B) = self.mixed.order[slot], stacks[:2]
            if name not in self.r:
                return result
            delta = (F.linear(x[start:stop].to(A.dtype), A[slot]) * self.scaling[name]) @ B[slot]
            return added(result, delta, start, None)
        if self._rows_kernel(result, x, stacks, start, stop):
            return result
        members = self.mixed.members(self._stacks.present, start, stop)  # (the kernel cannot run here: gather)
        rows, index = (None, self.mixed.index[start:stop]) if members is True else members
        part = x[start:stop] if rows is None else x[start:stop].index_select(0, rows)
        A, B, scale = (gather_rows(stack, index, part.shape[0], self.mixed.scratch, f"lora{k}") for k, stack in enumerate(stacks[:3]))
        x3 = part.reshape(part.shape[0], -1, part.shape[-1]).to(A.dtype)
        delta = torch.bmm(torch.bmm(x3, A.transpose(1, 2)) * scale[:, None, None], B)
        return added(result, delta.reshape(*part.shape[:-1], self.out_features), start, rows)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]

    def rename_adapter(self, old: str, new: str) -> None:
        super().rename_adapter(old, new)
        if old in self.lora_dropout:
            self.lora_dropout[new] = self.lora_dropout.pop(old)


class LoraEmbedding(_LoraLayerBase, StackedAdapterLayer):
    """LoRA on ``nn.Embedding``: h = E[x] + (alpha / r) (A^T[x]) B^T, with A: r x vocab (zeros), B: dim x r (normal).

    The initialisation is the other way round from linear layers (A = 0, B random), as in HF PEFT, so that the
    rows the model never sees stay untouched.
    """

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str, init: bool = True) -> None:
        r, device, dtype = self._add_rank(adapter_name, config, module_name)
        vocab, dim = self.kind.features(self.model_layer)
        A = torch.empty(r, vocab, dtype=dtype, device=device)
        B = torch.empty(dim, r, dtype=dtype, device=device)
        if init:
            nn.init.normal_(B)
            if config.init_lora_weights is False:
                nn.init.normal_(A)
            else:
                nn.init.zeros_(A)
        self.lora_embedding_A[adapter_name] = nn.Parameter(A)
        self.lora_embedding_B[adapter_name] = nn.Parameter(B)

    def _lookup(self, x: torch.Tensor, table_T: torch.Tensor) -> torch.Tensor:
        base = self.model_layer
        return F.embedding(x, table_T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)

    def factor_tensors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A: r x vocab, B: dim x r)."""
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        return (B @ A).T * self.scaling[adapter_name]

    def _merge_one(self, adapter_name: str) -> Undo:
        return _merge_delta(self, adapter_name)

    def active_forward(self, x: torch.Tensor, names: list[str], args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            h = self._lookup(x, self.lora_embedding_A[name].T)
            result = result + (h @ self.lora_embedding_B[name].T) * self.scaling[name]
        return result

    def mixed_forward(self, x: torch.Tensor, stacks: tuple, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        A_T = stacks[0].transpose(1, 2)  # (n, vocab, r_max): a lookup table per adapter
        rows = self.rows(torch.arange(A_T.shape[0], device=x.device), x.shape[0])
        h = A_T[rows.view(-1, *([1] * (x.dim() - 1))), x]  # (batch, ..., r_max): each row's own table
        b = stacks[1].index_select(0, rows)
        h = h.reshape(x.shape[0], -1, h.shape[-1]) * stacks[2].index_select(0, rows)[:, None, None]
        delta = torch.bmm(h, b)
        return result + delta.reshape(result.shape)


@register
class LoraTuner(Tuner):
    peft_type = "LORA"
    config_cls = LoraConfig
    layer_cls = (LoraLayer, LoraEmbedding)  # type: ignore[assignment]
    cli_names = {"lora": {}}
    cli_options = {
        "r": CliOption("r", 8), "alpha": CliOption("lora_alpha", 16), "dropout": CliOption("lora_dropout", 0.05),
    }
    default_lr = (2e-4, 5e-4)

    def target_names(self, model: nn.Module, config: LoraConfig) -> list[str]:
        if config.target_modules is None:  # the family's default, written into the config as HF PEFT does
            family = require(
                model, "default LoRA targets", "pass target_modules (--target-modules): module names, a regex or "
                "all-linear (`peftkit inspect MODEL` lists the names)", "lora_targets",
            )
            config.target_modules = list(family.lora_targets)
        return find_targets(model, config)

    def make_layer(self, module: nn.Module, config: LoraConfig, module_name: str) -> AdapterLayer:
        kind = kind_of(model_layer(module))  # (under another method's layer when they share the module)
        if kind is not None and kind.linear:
            return LoraLayer(module, fan_in_fan_out=config.fan_in_fan_out)
        if kind is not None:  # a lookup table (nn.Embedding)
            return LoraEmbedding(module)
        raise TypeError(
            f"LoRA cannot wrap {module_name} ({type(module).__name__}): it supports "
            f"{', '.join(k.name for k in KINDS)} layers"
        )

    def _bias_params(self, model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
        """File key -> bias parameter trained under ``bias='all'`` or ``'lora_only'``."""
        if bias == "none":
            return {}
        out = {}
        for name, module in module_tree(model):
            if bias == "lora_only" and not isinstance(module, (LoraLayer, LoraEmbedding)):
                continue
            owner = model_layer(module)  # (under other methods' layers when they share the module)
            if isinstance(module, AdapterLayer) and bias == "all":
                continue  # reached through its base_layer below
            b = getattr(owner, "bias", None)
            if isinstance(b, nn.Parameter):
                # HF PEFT keys a wrapped layer's bias by its original name, without "base_layer"
                out[f"{FILE_PREFIX}{name.replace('.base_layer', '')}.bias"] = b
        return out

    def mark_trainable(self, model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
        for p in self._bias_params(model, config.bias).values():
            p.requires_grad_(True)

    def adapter_tensors(self, model: nn.Module, adapter_name: str, config: LoraConfig,
                        tree: LayerTree | None = None) -> dict[str, torch.Tensor]:
        out = super().adapter_tensors(model, adapter_name, config, tree)
        out.update({k: p.detach() for k, p in self._bias_params(model, config.bias).items()})
        return out


    def add_weighted(
        self, model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
        combination_type: str, configs: list[PeftConfig],
    ) -> LoraConfig:
        return add_weighted_lora(list(self.layers(model)), adapters, weights, adapter_name, combination_type, configs[0])

    def reuse(self, model: nn.Module, old: str, new: str, config: LoraConfig, tree: LayerTree | None = None) -> bool:
        """Every layer of ``old`` keeps its factors under the name ``new``, with ``config``'s scale (and dropout), when
        ``config`` gives each of them the rank it has now."""
        layers = [(name, layer) for name, layer in self.layers(model, tree) if old in layer.r]
        if any(config.rank_and_alpha(name)[0] != layer.r[old] for name, layer in layers):
            return False
        for name, layer in layers:
            if new != old:  # (a rename moves the entries to the end of each dict: the layer's stacks re-assemble)
                layer.rename_adapter(old, new)
            layer.record_rank(new, config, name)  # (not _add_rank: its device lookups cost a server's loads)
            if isinstance(layer, LoraLayer) and getattr(layer.lora_dropout[new], "p", 0.0) != config.lora_dropout:
                dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
                layer.lora_dropout[new] = dropout.train(layer.training)
        return True

    def optional_tensors(self, model: nn.Module, adapter_name: str, config: LoraConfig,
                         tree: LayerTree | None = None) -> dict[str, torch.Tensor]:
        # HF PEFT saves the full embedding matrix of LoRA-wrapped embeddings (in case the vocabulary was resized)
        return {
            f"{FILE_PREFIX}{name}.base_layer.weight": layer.model_layer.weight.detach()
            for name, layer in self.layers(model, tree)
            if isinstance(layer, LoraEmbedding)
        }

