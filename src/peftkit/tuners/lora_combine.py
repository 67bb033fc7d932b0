"""Combining LoRA adapters into a new one (``PeftModel.add_weighted_adapter``), as HF PEFT does."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import torch

from .layer import AdapterLayer

if TYPE_CHECKING:  # (tuners.lora imports this module)
    from .lora import LoraConfig


def add_weighted_lora(
    layers: list[tuple[str, AdapterLayer]],
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str,
    base_config: LoraConfig,
) -> LoraConfig:
    """Combine LoRA adapters into a new one, as HF PEFT's ``add_weighted_adapter`` does; returns its config.

    With s_i = alpha_i / r_i and weights w_i:
    ``"linear"`` (equal ranks): A = sum_i sign_i sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i;
    ``"cat"``: A = [w_i s_i A_i] stacked on the rank axis, B = [B_i], so B A = sum_i w_i s_i B_i A_i exactly;
    ``"svd"``: the rank-r truncated SVD of sum_i w_i s_i B_i A_i (r = the largest input rank).
    The new adapter has scale 1 (alpha = r); modules whose rank differs go into ``rank_pattern``.
    """
    new_rank = None
    ranks: dict[str, int] = {}
    for module_name, layer in layers:
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
        if not present:
            continue
        if combination_type == "linear" and len({layer.r[a] for a, _ in present}) > 1:
            raise ValueError("combination_type='linear' needs adapters of equal rank; use 'cat' or 'svd'")
        svd_rank = max(layer.r[a] for a, _ in present)
        new_A, new_B = _combine(layer, present, combination_type, svd_rank)
        rank = new_A.shape[0]
        ranks[module_name] = rank
        layer.update_layer(adapter_name, type(base_config)(r=rank, lora_alpha=rank), module_name, init=False)
        target_A, target_B = layer.factor_tensors(adapter_name)
        with torch.no_grad():
            target_A.copy_(new_A)
            target_B.copy_(new_B)
    if not ranks:
        raise ValueError(f"none of the adapters {adapters} has LoRA layers")
    new_rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    pattern = {re.escape(name): r for name, r in ranks.items() if r != new_rank}
    return type(base_config)(
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=sorted(ranks),  # exact paths: the inputs may cover different modules
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        task_type=base_config.task_type,
        base_model_name_or_path=base_config.base_model_name_or_path,
        modules_to_save=base_config.modules_to_save,
    )


def _combine(layer, present, combination_type: str, new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    factors = [(layer.factor_tensors(a), w * layer.scaling[a]) for a, w in present]
    if combination_type == "linear":
        A = sum(math.copysign(math.sqrt(abs(ws)), ws) * a for (a, _), ws in factors)
        B = sum(math.sqrt(abs(ws)) * b for (_, b), ws in factors)
        return A, B
    if combination_type == "cat":
        return torch.cat([a * ws for (a, _), ws in factors], 0), torch.cat([b for (_, b), _ in factors], 1)
    if combination_type == "svd":
        delta = sum(ws * (b @ a) for (a, b), ws in factors)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return Vh[:new_rank], U[:, :new_rank] * S[:new_rank]
    raise ValueError(f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}")
