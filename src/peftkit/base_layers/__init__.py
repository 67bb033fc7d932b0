"""Base-layer kinds: what adapters wrap, behind one contract (:mod:`.kind`), found by a first-match list.

To support a new kind of layer (a quantization backend such as torchao or HQQ, say), write one
:class:`BaseLayerKind` subclass in a file of this package and put an instance in :data:`KINDS`, before any kind
its class subclasses (bitsandbytes' layers subclass ``nn.Linear``, so they come before :class:`LinearKind`).
"""

from __future__ import annotations

from torch import nn

from .bnb import Linear4bitKind, Linear8bitKind, keep_canonical_layout
from .kind import BaseLayerKind, FullPrecisionKind, Undo, Update
from .torch_layers import Conv1DKind, EmbeddingKind, LinearKind

KINDS: list[BaseLayerKind] = [Linear4bitKind(), Linear8bitKind(), Conv1DKind(), LinearKind(), EmbeddingKind()]


def kind_of(module: nn.Module) -> BaseLayerKind | None:
    """The first kind in :data:`KINDS` that matches ``module``, or None for layers no adapter can wrap."""
    return next((kind for kind in KINDS if kind.matches(module)), None)


def is_linear(module: nn.Module) -> bool:
    """A projection that linear adapter methods can wrap: nn.Linear, Conv1D, quantized linear layers."""
    kind = kind_of(module)
    return kind is not None and kind.linear


def is_quantized(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.quantized


def has_quantized_layers(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


__all__ = [
    "KINDS", "BaseLayerKind", "FullPrecisionKind", "Undo", "Update", "kind_of", "is_linear", "is_quantized",
    "has_quantized_layers", "keep_canonical_layout", "LinearKind", "Conv1DKind", "EmbeddingKind",
    "Linear4bitKind", "Linear8bitKind",
]
