"""peftkit: parameter-efficient fine-tuning of PyTorch models, with Hugging Face PEFT-compatible adapter files."""

from .models import load_model, load_tokenizer
from .peft_model import PeftModel, get_peft_model
from .kbit_training import make_optimizer, prepare_model_for_kbit_training
from .memory import memory_footprint
from .tuners import (
    BitFitConfig,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SelectiveConfig,
)

__version__ = "0.1.0"

__all__ = [
    "load_model", "load_tokenizer", "PeftModel", "get_peft_model",
    "LoraConfig", "IA3Config", "BottleneckConfig", "PromptTuningConfig", "PrefixTuningConfig",
    "BitFitConfig", "SelectiveConfig", "PeftConfig",
    "prepare_model_for_kbit_training", "memory_footprint", "make_optimizer",
]
