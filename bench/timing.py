"""Timing helpers shared by the latency benchmarks: interleaved rounds and a KV-cached decode step."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from peftkit.hf_compat import cache_arg, find_cache


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds (A B C A B C ...).

    Interleaving makes slow drifts of the machine (other jobs, turbo, thermal) hit every variant alike, so the ratios
    between them stay meaningful when the absolute times do not.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def forward_fn(model: torch.nn.Module, x: torch.Tensor, **kw) -> Callable[[], object]:
    """One full forward pass over ``x`` without a cache (prefill / encoder latency)."""
    return lambda: model(input_ids=x, use_cache=False, **kw)


def decode_fn(model: torch.nn.Module, prompt: torch.Tensor, **kw) -> Callable[[], None]:
    """One decode step of one token per row with a KV cache of the prompt's length (cropped back after each call)."""
    with torch.inference_mode():
        cache = find_cache(model(input_ids=prompt, use_cache=True, **kw))
    step = torch.randint(0, 1000, (prompt.shape[0], 1))

    def run() -> None:
        model(input_ids=step, use_cache=True, **{cache_arg(model): cache}, **kw)
        cache.crop(-1)  # drop the token just added (transformers 5 crops by a negative count)

    return run
