"""bitsandbytes' quantized linear layers as base layers: ``Linear4bit`` (NF4/FP4, blocks of 64 with an absmax each,
optionally double-quantized) and ``Linear8bitLt`` (LLM.int8(): int8 weights with one absmax per row).

Nothing here imports bitsandbytes: a module can only be one of its layers if bitsandbytes is already imported, so
``matches`` looks it up in ``sys.modules``. Updates dequantize, apply the change in float32 and requantize into a
new parameter; the Undo puts the old quantized tensors back bit for bit.
"""

from __future__ import annotations

import abc
import math
import sys
from typing import Any

import torch
from torch import nn

from .kind import BaseLayerKind, Undo, Update


def _bnb_class(name: str) -> type | None:
    bnb = sys.modules.get("bitsandbytes")
    return getattr(bnb.nn, name, None) if bnb is not None else None


def keep_canonical_layout(layer: nn.Module) -> None:
    """Stop bitsandbytes' CPU inference fast path from repacking a ``Linear4bit``, and undo a repacking already done.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` at its first no-grad eval forward into a
    bf16 layout whose kernel has no backward: training afterwards silently gets no input gradients (LoRA layers
    below it stop learning). The repacking also rounds the block constants to bf16 and undoes double quantization
    (4.25 bits per weight). Keeping the standard layout makes eval and training compute the same fp32 dequantized
    matmul, and keeps merges, memory reports and saved weights in the documented format.
    """
    cls = _bnb_class("Linear4bit")
    if cls is None or not isinstance(layer, cls):
        return
    layer.support_avx512bf16_for_cpu = False
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        layer.quant_state = weight.quant_state


class _QuantizedKind(BaseLayerKind):
    quantized = True
    class_name = ""

    def matches(self, module: nn.Module) -> bool:
        cls = _bnb_class(self.class_name)
        return cls is not None and isinstance(module, cls)

    def apply_update(self, module: nn.Module, update: Update, inverse: Update) -> Undo:
        """W <- quantize(update(dequantize(W))); ``inverse`` is not needed: the Undo restores the stored bits."""
        with torch.no_grad():
            target = update(self.weight(module))
            before = self._snapshot(module)
            self._set_weight(module, target)
            error = (self.weight(module) - target).abs()
        return Undo(lambda: self._restore(module, before), (error.max().item(), error.mean().item()))

    @abc.abstractmethod
    def storage(self, module: nn.Module) -> tuple[str, int, list[torch.Tensor]]:
        """(format name, weight count, every tensor the layer stores for its weight): for memory reports."""

    def _snapshot(self, module: nn.Module) -> Any:
        return module.weight

    def _restore(self, module: nn.Module, snapshot: Any) -> None:
        module.weight = snapshot

    @abc.abstractmethod
    def _set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Quantize ``weight`` into ``module`` as a new parameter (the old one is left intact for the Undo)."""


class Linear4bitKind(_QuantizedKind):
    name = "Linear4bit"
    class_name = "Linear4bit"

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return getattr(module, "compute_dtype", None) or torch.float32

    def weight(self, module: nn.Module) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        keep_canonical_layout(module)
        return dequantize_4bit(module.weight.data, module.weight.quant_state).float()

    def _set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = module.weight
        new = bnb.nn.Params4bit(
            weight.to(old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
            module=module,
        )
        module.weight = new.to(old.device)

    def _restore(self, module: nn.Module, snapshot: Any) -> None:
        module.weight = snapshot
        module.quant_state = snapshot.quant_state

    def storage(self, module: nn.Module) -> tuple[str, int, list[torch.Tensor]]:
        # packed codes, block absmax, code table; nested: offset, absmax2 and its code table
        state = module.weight.quant_state
        tensors = [module.weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        return state.quant_type, math.prod(state.shape), tensors


class Linear8bitKind(_QuantizedKind):
    name = "Linear8bitLt"
    class_name = "Linear8bitLt"

    @staticmethod
    def _row_scales(module: nn.Module) -> torch.Tensor:
        weight = module.weight
        return weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.data.float() * (self._row_scales(module).float().unsqueeze(1) / 127.0)

    def _set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(module.weight.device)
        module.state.CB = module.state.SCB = None  # the next forward takes them from the new weight

    def _snapshot(self, module: nn.Module) -> Any:
        # after its first forward the layer also keeps the int8 weight and row scales in ``state``
        return module.weight, module.state.CB, module.state.SCB

    def _restore(self, module: nn.Module, snapshot: Any) -> None:
        module.weight, module.state.CB, module.state.SCB = snapshot

    def storage(self, module: nn.Module) -> tuple[str, int, list[torch.Tensor]]:
        return "int8", module.weight.numel(), [module.weight.data, self._row_scales(module)]
