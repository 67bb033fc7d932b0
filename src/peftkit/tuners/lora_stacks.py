"""The stacks of LoRA factors that a mixed batch reads (one slot per adapter), and adding a delta to some rows.

Shared by LoRA's linear and embedding layers (:mod:`peftkit.tuners.lora`); the CPU kernel
(:mod:`peftkit.kernels`) reads the same stacks in place.
"""

from __future__ import annotations

from typing import Any

import torch


def stack_factors(layer: Any, order: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """The factors of every adapter in ``order`` of a LoRA layer stacked for one batched matmul: A (n, r_max, in), B
    transposed (n, r_max, out), each one's scale alpha / r (n,) and rank (n,), ranks zero-padded to r_max, all zeros
    for an adapter this layer lacks (``layer.factor_tensors`` gives the per-adapter A: r x in, B: out x r). B is kept
    transposed for the CPU kernel, whose update then runs along the outputs, and the ranks let it skip each slot's
    padding (kernels/lora_rows.cpp). The scale stays apart from B so that a server's adapters can live in their
    slots (``hold_in_slot``)."""
    names = [n for n in order if n in layer.r]
    r_max = max([layer.r[n] for n in names], default=1)
    first_A, first_B = layer.factor_tensors(next(iter(layer.r)))
    A = first_A.new_zeros(len(order), r_max, first_A.shape[1])
    B = first_A.new_zeros(len(order), r_max, first_B.shape[0])
    scale, ranks = first_A.new_zeros(len(order)), torch.zeros(len(order), dtype=torch.long, device=first_A.device)
    for i, name in enumerate(order):
        if name in layer.r:
            r = layer.r[name]
            A_name, B_name = layer.factor_tensors(name)
            A[i, :r] = A_name
            B[i, :r] = B_name.T
            scale[i], ranks[i] = layer.scaling[name], r
    return A, B, scale, ranks


def added(result: torch.Tensor, delta: torch.Tensor, start: int, rows: torch.Tensor | None) -> torch.Tensor:
    """``result`` with ``delta`` added to its rows from ``start`` on (to those ``rows`` after ``start`` when given):
    in place when autograd is off (``result`` is the base layer's fresh output), else out of place."""
    delta = delta.to(result.dtype)
    if torch.is_grad_enabled():
        if rows is None and start == 0 and delta.shape[0] == result.shape[0]:
            return result + delta
        rows = torch.arange(start, start + delta.shape[0], device=result.device) if rows is None else rows + start
        return result.index_add(0, rows, delta)
    if rows is None:
        result[start : start + delta.shape[0]] += delta
    else:
        result[start:].index_add_(0, rows, delta)
    return result
