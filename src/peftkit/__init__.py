"""peftkit: parameter-efficient fine-tuning of PyTorch models, with Hugging Face PEFT-compatible adapter files.

The public names load on first use (PEP 562): ``import peftkit`` and the ``peftkit`` command start without
importing torch, so a Ctrl-C while torch loads reaches the command's own handler (one line, exit 130) rather than
a traceback from an import at the top of the program.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {  # public name -> the module that defines it
    "load_model": "models", "load_tokenizer": "models",
    "PeftModel": "peft_model", "get_peft_model": "peft_model",
    "make_optimizer": "kbit_training", "prepare_model_for_kbit_training": "kbit_training",
    "memory_footprint": "memory",
    **{name: "tuners" for name in ("BitFitConfig", "BottleneckConfig", "IA3Config", "LoraConfig", "PeftConfig",
                                   "PrefixTuningConfig", "PromptTuningConfig", "SelectiveConfig")},
}

__all__ = [
    "load_model", "load_tokenizer", "PeftModel", "get_peft_model",
    "LoraConfig", "IA3Config", "BottleneckConfig", "PromptTuningConfig", "PrefixTuningConfig",
    "BitFitConfig", "SelectiveConfig", "PeftConfig",
    "prepare_model_for_kbit_training", "memory_footprint", "make_optimizer",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
