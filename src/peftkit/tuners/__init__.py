"""PEFT methods: one module each (config, layer, injection rule), registered by ``peft_type`` on import."""

from .base import AdapterLayer, PeftConfig, Tuner, register, tuner_for
from .bottleneck import BottleneckConfig
from .ia3 import IA3Config
from .lora import LoraConfig
from .prefix import PrefixTuningConfig
from .prompt import PromptTuningConfig
from .selective import BitFitConfig, SelectiveConfig

__all__ = [
    "AdapterLayer", "PeftConfig", "Tuner", "register", "tuner_for",
    "LoraConfig", "IA3Config", "BottleneckConfig", "PromptTuningConfig", "PrefixTuningConfig",
    "BitFitConfig", "SelectiveConfig",
]
