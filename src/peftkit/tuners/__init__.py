"""PEFT methods: one module each (config, layer, injection rule), registered by ``peft_type`` on import."""

from .base import AdapterLayer, PeftConfig, Tuner, register, tuner_for

# Registered in this order, which is the order ``peftkit train --method`` lists them in.
from .lora import LoraConfig
from .ia3 import IA3Config
from .bottleneck import BottleneckConfig
from .prompt import PromptTuningConfig
from .prefix import PrefixTuningConfig
from .selective import BitFitConfig, SelectiveConfig

__all__ = [
    "AdapterLayer", "PeftConfig", "Tuner", "register", "tuner_for",
    "LoraConfig", "IA3Config", "BottleneckConfig", "PromptTuningConfig", "PrefixTuningConfig",
    "BitFitConfig", "SelectiveConfig",
]
