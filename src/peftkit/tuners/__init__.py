"""PEFT methods: one module each (config, layer, injection rule), registered by ``peft_type``."""

from .base import AdapterLayer, PeftConfig, Tuner, register, tuner_for
from .lora import LoraConfig

__all__ = ["AdapterLayer", "PeftConfig", "Tuner", "register", "tuner_for", "LoraConfig"]
