"""peftkit: parameter-efficient fine-tuning of PyTorch models, with Hugging Face PEFT-compatible adapter files."""

from .models import load_model, load_tokenizer
from .peft_model import PeftModel, get_peft_model
from .tuners import LoraConfig, PeftConfig

__version__ = "0.1.0"

__all__ = ["load_model", "load_tokenizer", "PeftModel", "get_peft_model", "LoraConfig", "PeftConfig"]
