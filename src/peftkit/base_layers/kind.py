"""The contract between adapter methods and the layers they wrap.

A tuner never looks at a base layer's class. It asks the layer's :class:`BaseLayerKind` (found by
:func:`peftkit.base_layers.kind_of`, the first kind in a list whose ``matches`` accepts the module) for:

- ``features(module)``: (in_features, out_features); ``fan_in_fan_out``: True when the weight is stored as
  (in, out), as transformers' ``Conv1D`` does, so an update must be shaped that way;
- ``device(module)`` and ``compute_dtype(module)``: where and in which float type adapter parameters should live;
- ``weight(module)``: the weight the layer computes with, dequantized, float32, in its stored layout;
- ``apply_update(module, update, inverse)``: W <- update(W), returning an :class:`Undo` that restores W.

Full-precision kinds change the weight in place and undo with ``inverse`` (W + d - d: exact up to float rounding,
with no copy of W kept). Quantized kinds dequantize, update and requantize, keep the previous quantized tensors in
the Undo and restore those bits exactly, since a requantized weight cannot be un-rounded; the Undo also carries
the weight error that the requantization made, for the merge report.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

Update = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Undo:
    """Restores a base layer's weight (and whatever else the update changed) to what it was before one update.

    ``error``: (max, mean) absolute weight error introduced by requantizing, or None for full-precision layers.
    """

    restore: Callable[[], None]
    error: tuple[float, float] | None = None

    def __call__(self) -> None:
        self.restore()


class BaseLayerKind(abc.ABC):
    """One kind of base layer. Subclasses are stateless: everything they report is read from the module."""

    name: ClassVar[str] = ""
    linear: ClassVar[bool] = True  # a projection y = x W^T (+ b): what "all-linear" and the linear methods target
    quantized: ClassVar[bool] = False
    fan_in_fan_out: ClassVar[bool] = False  # the weight is stored (in, out) instead of (out, in)

    @abc.abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is of this kind."""

    def features(self, module: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of the map the layer computes."""
        return module.in_features, module.out_features

    def device(self, module: nn.Module) -> torch.device:
        return module.weight.device

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The float type adapter parameters take: the weight's own, or float32 for integer (quantized) storage."""
        dtype = module.weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    @abc.abstractmethod
    def weight(self, module: nn.Module) -> torch.Tensor:
        """The weight the layer computes with, as float32 in the stored layout (a detached tensor)."""

    @abc.abstractmethod
    def apply_update(self, module: nn.Module, update: Update, inverse: Update) -> Undo:
        """Set the weight W to ``update(W)`` (W as :meth:`weight` gives it); the returned Undo restores it."""


class FullPrecisionKind(BaseLayerKind):
    """Layers whose ``weight`` parameter is the weight itself (nn.Linear, Conv1D, nn.Embedding)."""

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().float()

    def apply_update(self, module: nn.Module, update: Update, inverse: Update) -> Undo:
        weight = module.weight

        def change(fn: Update) -> None:
            with torch.no_grad():
                weight.copy_(fn(weight.detach()).to(weight.dtype))

        change(update)
        return Undo(lambda: change(inverse))
