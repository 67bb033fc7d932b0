"""What differs between the transformers versions peftkit supports, kept in one place.

The key/value cache argument: transformers 5.24 renamed it from ``past_key_values`` to ``cache`` in every model's
``forward`` and in model outputs. 5.24 still accepts the old name with a warning (until 5.40, its deprecation says),
raises when both names are given, and earlier versions know only ``past_key_values``. peftkit therefore reads a cache
the caller passed under either name and hands one to the model under the name its ``forward`` declares.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

CACHE_ARGS = ("cache", "past_key_values")  # the new name first


@functools.lru_cache(maxsize=None)
def _declared_cache_arg(model_cls: type) -> str | None:
    params = inspect.signature(model_cls.forward).parameters
    return next((name for name in CACHE_ARGS if name in params), None)


def cache_arg(model: nn.Module) -> str:
    """The keyword under which ``model`` (a transformers model, or a wrapper such as a PeftModel) takes its key/value
    cache: ``"cache"`` or ``"past_key_values"``, as the outermost transformers model that names one declares it.
    (A classifier such as ``BertForSequenceClassification`` names neither and hands ``**kwargs`` to its encoder.)"""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and (name := _declared_cache_arg(type(module))):
            return name
    return "past_key_values"


def find_cache(mapping: Any) -> Any:
    """The cache in a forward's keyword arguments, or in a model output, under either name; None if absent."""
    for name in CACHE_ARGS:
        if mapping.get(name) is not None:
            return mapping[name]
    return None


def with_cache(kwargs: dict[str, Any], model: nn.Module, cache: Any) -> dict[str, Any]:
    """A copy of ``kwargs`` holding ``cache`` under ``model``'s own keyword, and under no other."""
    out = {k: v for k, v in kwargs.items() if k not in CACHE_ARGS}
    out[cache_arg(model)] = cache
    return out

