"""Shared fixtures: tiny random models for mechanics, paths to the real data and models for results."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_llama(vocab_size: int = 128, layers: int = 2, seed: int = 0):
    """A randomly initialised Llama-architecture model: same module names as SmolLM2, seconds to build."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    """GPT-2 (Conv1D layers with W stored as in x out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128)).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=128, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M (converted once into the peftkit cache)."""
    import peftkit

    return peftkit.load_model("smollm2-135m")
