"""What merging adapters into a quantized base changed, measured around the merge.

Folding an update into 4-bit or 8-bit weights requantizes them, which rounds: the merged model is close to, not
equal to, the adapter run unmerged. :func:`merge_report` measures by how much (logits on a fixed probe, and the
weight error each requantized layer's Undo recorded) and warns with the figures, so nobody ships a merged
quantized model without knowing.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .tuners.base import AdapterLayer


@dataclass
class MergeReport:
    """What merging into quantized layers changed: logits on a fixed probe (when the model takes token ids) and
    the weights of the requantized layers."""

    layers: int = 0
    logit_max_abs: float | None = None
    logit_mean_abs: float | None = None
    weight_max_abs: float = 0.0
    weight_mean_abs: float = 0.0
    probe_tokens: int = 0

    def __str__(self) -> str:
        parts = [f"requantized {self.layers} layers (dequantize, add, requantize)"]
        if self.logit_max_abs is not None:
            parts.append(
                f"logits on a fixed {self.probe_tokens}-token probe differ from the unmerged model by "
                f"max {self.logit_max_abs:.4g}, mean {self.logit_mean_abs:.4g} (abs)"
            )
        parts.append(f"weights: max abs error {self.weight_max_abs:.4g}, mean {self.weight_mean_abs:.4g}")
        return "; ".join(parts)


def _probe_input(model: nn.Module, tokens: int) -> torch.Tensor | None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return None
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, tokens), generator=generator).to(device)


def _probe_logits(model: nn.Module, adapter_names: list[str], probe: torch.Tensor) -> torch.Tensor:
    """Logits with exactly ``adapter_names`` active (merged or not), in eval mode, without gradients."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    saved = [(layer, layer.active_adapters, layer.mixed) for layer in layers]
    training = model.training
    try:
        for layer in layers:
            layer.active_adapters = [n for n in adapter_names if n in layer.adapter_names]
            layer.mixed = None
        model.eval()
        with torch.no_grad():
            out = model(input_ids=probe)
    finally:
        for layer, active, mixed in saved:
            layer.active_adapters, layer.mixed = active, mixed
        if training:
            model.train()
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


@contextmanager
def merge_report(model: nn.Module, adapter_names: list[str], probe_tokens: int = 32) -> Iterator[MergeReport]:
    """Around a merge of ``adapter_names``: compare the model's logits before and after on a fixed token probe
    (seeded random ids) and warn with the max and mean abs difference, plus the weight error of each requantized
    layer. Models that do not take ``input_ids`` (no ``config.vocab_size``) get the weight error only."""
    report = MergeReport(probe_tokens=probe_tokens)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    depth = {id(layer): len(layer.merge_undos) for layer in layers}
    probe = _probe_input(model, probe_tokens)
    before = _probe_logits(model, adapter_names, probe) if probe is not None else None
    yield report
    errors = [u.error for layer in layers for u in layer.merge_undos[depth[id(layer)]:] if u.error is not None]
    if not errors:
        return
    report.layers = len(errors)
    report.weight_max_abs = max(e[0] for e in errors)
    report.weight_mean_abs = sum(e[1] for e in errors) / len(errors)
    if before is not None:
        diff = (_probe_logits(model, adapter_names, probe) - before).abs()
        report.logit_max_abs, report.logit_mean_abs = diff.max().item(), diff.mean().item()
    warnings.warn(
        f"merged {adapter_names} into a quantized base: {report}. Unmerging restores the quantized weights exactly; "
        "for an exact merged model use merge_and_unload(dequantize=True), which merges in full precision.",
        stacklevel=3,
    )

