"""Full-precision base layers: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2: y = x W + b with W (in, out)) and
``nn.Embedding`` (a lookup table, not a projection)."""

from __future__ import annotations

from torch import nn

from .kind import FullPrecisionKind


class LinearKind(FullPrecisionKind):
    name = "Linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)  # quantized subclasses are matched first (base_layers.KINDS)


class Conv1DKind(FullPrecisionKind):
    name = "Conv1D"
    fan_in_fan_out = True

    def matches(self, module: nn.Module) -> bool:
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, Conv1D)

    def features(self, module: nn.Module) -> tuple[int, int]:
        in_features, out_features = module.weight.shape
        return in_features, out_features


class EmbeddingKind(FullPrecisionKind):
    name = "Embedding"
    linear = False

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim
