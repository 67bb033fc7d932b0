"""How many bytes a model's weights take, by storage format, and what one quantized weight really costs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base_layers import kind_of
from .tuners.base import AdapterLayer


@dataclass
class MemoryFootprint:
    """Bytes held by a model's weights.

    ``base_bytes``: base-model weights by storage format: torch dtype names for ordinary tensors ("float32"),
    the quantization for quantized layers ("nf4", "fp4", "int8"), counting their block constants, double-quant
    constants and code tables. Tied tensors count once. ``adapter_bytes``: adapter parameters. ``quantized_params``
    and ``quantized_bytes``: the quantized layers' weight count and storage, so ``bits_per_param`` is what one
    quantized weight really costs (NF4 with double quantization about 4.13-4.15, without about 4.5).
    """

    base_bytes: dict[str, int]
    adapter_bytes: int
    quantized_params: int
    quantized_bytes: int

    @property
    def base_total(self) -> int:
        return sum(self.base_bytes.values())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else math.nan

    def __str__(self) -> str:
        mib = 2**20
        parts = ", ".join(f"{kind} {size / mib:.1f} MiB" for kind, size in sorted(self.base_bytes.items()))
        text = f"base weights {self.base_total / mib:.1f} MiB ({parts}); adapters {self.adapter_bytes / mib:.2f} MiB"
        if self.quantized_params:
            text += f"; quantized layers: {self.quantized_params:,} weights at {self.bits_per_param:.3f} bits each"
        return text


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """Bytes of base weights by storage format, adapter bytes, and bits per weight of the quantized layers.

    ``model``: a plain model or a :class:`peftkit.PeftModel` (whose ``base_model`` holds the base weights; adapter
    parameters are found through the adapter layers' contract, anything else of the PeftModel is adapter state).
    """
    is_peft = isinstance(getattr(model, "base_model", None), nn.Module) and hasattr(model, "peft_config")
    base_root = model.base_model if is_peft else model
    adapter_ids = {
        id(p)
        for layer in base_root.modules()
        if isinstance(layer, AdapterLayer)
        for name in layer.adapter_names
        for p in layer.adapter_parameters(name)
    }
    seen: set[tuple[int, int]] = set()

    def size(t: torch.Tensor) -> int:
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key in seen or t.device.type == "meta":
            return 0
        seen.add(key)
        return key[1]

    base: dict[str, int] = {}
    quantized_params = quantized_bytes = 0
    counted: set[int] = set()
    for module in base_root.modules():
        layer_kind = kind_of(module)
        if layer_kind is not None and layer_kind.quantized:
            kind, count, tensors = layer_kind.storage(module)
            nbytes = sum(size(t) for t in tensors)
            base[kind] = base.get(kind, 0) + nbytes
            quantized_params += count
            quantized_bytes += nbytes
            counted.add(id(module.weight))
    for p in base_root.parameters():
        if id(p) not in counted and id(p) not in adapter_ids:
            counted.add(id(p))
            kind = str(p.dtype).removeprefix("torch.")
            base[kind] = base.get(kind, 0) + size(p)
    adapter = sum(size(p) for p in model.parameters() if id(p) not in counted)
    return MemoryFootprint(base, adapter, quantized_params, quantized_bytes)
