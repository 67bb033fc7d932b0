"""Prefix tuning (Li & Liang 2021): learned key/value prefixes in every attention layer.

For layer l, attention runs over [P_k^l ; K] and [P_v^l ; V] instead of K and V, with P^l of num_virtual_tokens
positions per key/value head. The prefixes are one matrix

    P = E                          (num_virtual_tokens x num_layers*2*token_dim), or with ``prefix_projection``
    P = W2 tanh(W1 E + b1) + b2    E: num_virtual_tokens x token_dim, W1: encoder_hidden_size x token_dim

handed to the model as a pre-filled transformers ``DynamicCache`` (its ``cache`` or, before transformers 5.24,
``past_key_values`` argument), as HF PEFT does:
decoder models (Llama, GPT-2, ...) and, in transformers 5.x, BERT-style encoders (their self-attention still updates
a passed cache) take it through their normal forward. The attention mask gains ``num_virtual_tokens`` ones in front
and explicit ``position_ids`` shift by as many, as after a cached prefix; as in HF PEFT, models that count positions
from the cache length (BERT, Llama) number the real tokens from ``num_virtual_tokens``. For grouped-query attention
``token_dim`` is head_dim x num_key_value_heads (HF PEFT's rule), so a prefix holds what the cache holds.

``generate`` starts from that cache, so the KV cache grows after the prefix and the output is the prompt plus new
tokens. Files hold ``prompt_embeddings`` = P (num_virtual_tokens x num_layers*2*token_dim). With ``prefix_projection``
that is the projected P, as HF PEFT saves it: the MLP itself is not in the file, so such an adapter loads for inference
only (the file's P is used directly, as HF PEFT does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..hf_compat import find_cache, with_cache
from .base import PeftConfig, check_positive_int, register
from .prompt import PromptLearningConfig, PromptLearningTuner, _text_config, cache_is_filled, extend_front, input_batch


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning, with HF PEFT's fields.

    ``prefix_projection``: reparameterise the prefix through the two-layer MLP above (hidden width
    ``encoder_hidden_size``, default ``token_dim``); ``init_weights``: None (random, N(0, 1)) or ``"zero"`` (the last
    layer, or the prefix itself, starts at zero).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}")
        check_positive_int(self, "encoder_hidden_size", self.encoder_hidden_size, optional=True)

    def fill_from_model(self, model: nn.Module) -> None:
        super().fill_from_model(model)
        cfg = _text_config(model)
        kv_heads = getattr(cfg, "num_key_value_heads", None)
        if kv_heads is not None:
            # grouped-query attention caches num_key_value_heads heads: the prefix must have that shape
            head_dim = getattr(cfg, "head_dim", None) or self.token_dim // self.num_attention_heads
            self.token_dim = head_dim * kv_heads
            self.num_attention_heads = kv_heads
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim


class PrefixEncoder(nn.Module):
    """P as above: ``embedding.weight`` directly, or ``transform(embedding.weight)`` with the projection."""

    def __init__(self, config: PrefixTuningConfig, projection: bool) -> None:
        super().__init__()
        self.projection = projection
        width = config.num_layers * 2 * config.token_dim
        if projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight) if self.projection else self.embedding.weight

    def saved_embeddings(self) -> torch.Tensor:
        """P as HF PEFT saves it: the parameter itself, or the MLP's output with the projection."""
        if not self.projection:
            return self.embedding.weight.detach()
        with torch.no_grad():
            return self()


def prefix_keys_values(prefix: torch.Tensor, config: PrefixTuningConfig, dtype: torch.dtype) -> torch.Tensor:
    """P as per-layer keys and values, (2 * num_layers, heads, num_virtual_tokens, head_dim): layer l's keys are
    P's slice 2l, its values slice 2l+1 (HF PEFT's layout)."""
    count, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    return prefix.to(dtype).view(count, 2 * layers, heads, config.token_dim // heads).permute(1, 2, 0, 3)


def cache_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's attention caches keys and values in: the autocast dtype inside ``torch.autocast`` on
    the model's device, else the model's own (a prefix in another dtype would promote every cached column)."""
    device = next(model.parameters()).device
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return getattr(model, "dtype", torch.float32)


def prefix_cache(prefix: torch.Tensor, config: PrefixTuningConfig, batch: int, dtype: torch.dtype) -> Any:
    """A ``DynamicCache`` holding P for ``batch`` rows, each layer's keys and values (batch, heads,
    num_virtual_tokens, head_dim) as :func:`prefix_keys_values` lays them out."""
    from transformers import DynamicCache

    kv = prefix_keys_values(prefix, config, dtype).unsqueeze(1).expand(-1, batch, -1, -1, -1)
    return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(config.num_layers)])


def _generate_rows(model: nn.Module, kwargs: dict[str, Any], batch: int) -> int:
    """Rows generate will run: transformers repeats each input max(num_beams, num_return_sequences) times but not a
    passed cache, so the prefix cache is built that large."""
    gen = kwargs.get("generation_config") or model.generation_config
    beams = kwargs.get("num_beams", gen.num_beams) or 1
    returned = kwargs.get("num_return_sequences", gen.num_return_sequences) or 1
    return batch * max(beams, returned)


@register
class PrefixTuningTuner(PromptLearningTuner):
    peft_type = "PREFIX_TUNING"
    config_cls = PrefixTuningConfig
    encoder_attr = "prefix_encoder"
    cli_names = {"prefix": {}}
    default_lr = (1e-2, 1e-2)

    def make_encoder(self, model: nn.Module, config: PrefixTuningConfig) -> nn.Module:
        layers = _text_config(model).num_hidden_layers
        if config.num_layers != layers:
            raise ValueError(f"PrefixTuningConfig.num_layers={config.num_layers} but the model has {layers} layers")
        if config.token_dim % config.num_attention_heads:
            raise ValueError(
                f"PrefixTuningConfig.token_dim={config.token_dim} is not divisible by num_attention_heads="
                f"{config.num_attention_heads}; leave both unset to read them from the model"
            )
        # HF PEFT builds the MLP only for training; a loaded adapter holds the projected prefix directly
        return PrefixEncoder(config, projection=config.prefix_projection and not config.inference_mode)

    def check_loadable(self, config: PeftConfig) -> None:
        if config.prefix_projection and not config.inference_mode:
            raise ValueError(
                "this prefix-tuning adapter uses prefix_projection=True; its file (HF PEFT's format) holds the projected "
                "prefix but not the MLP, so it loads for inference only (is_trainable=False). To train it further, set "
                '"prefix_projection": false in adapter_config.json: the stored prefix is then trained directly.'
            )

    def prepare_inputs(
        self, peft_model: nn.Module, adapter_name: str, kwargs: dict[str, Any], generate: bool
    ) -> dict[str, Any]:
        """Pass the prefix as the model's key/value cache and extend the attention mask (and explicit positions) by it.

        A filled cache passed to forward (``cache`` or ``past_key_values``) already holds the prefix (it came from an
        earlier call with ``use_cache=True``) and is kept. In ``generate``, ``inputs_embeds`` get placeholder rows in front because
        transformers skips as many leading positions as the cache holds.
        """
        batch, length = input_batch(kwargs, "prefix tuning")
        config = peft_model.peft_config[adapter_name]
        model = peft_model.base_model
        count = config.num_virtual_tokens
        kwargs = dict(kwargs)
        filled = cache_is_filled(kwargs)
        rows = batch
        if generate:
            if filled:
                raise ValueError(
                    "generate with prefix tuning starts its own cache holding the prefix; pass the whole prompt as "
                    "input_ids rather than a filled key/value cache"
                )
            rows = _generate_rows(model, kwargs, batch)
            embeds = kwargs.get("inputs_embeds")
            device = embeds.device if embeds is not None else kwargs["input_ids"].device
            if kwargs.get("attention_mask") is None:
                # transformers would build a mask as long as the input, without the prefix
                kwargs["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=device)
            if embeds is not None:
                kwargs["inputs_embeds"] = torch.cat((embeds.new_zeros(batch, count, embeds.shape[-1]), embeds), dim=1)
        if filled:  # under the name this transformers version reads (a cache passed as ``cache=`` to 5.23 is ignored)
            kwargs = with_cache(kwargs, model, find_cache(kwargs))
        else:
            prefix = self.encoder(model, adapter_name)()
            kwargs = with_cache(kwargs, model, prefix_cache(prefix, config, rows, cache_dtype(model)))
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = extend_front(kwargs["attention_mask"], count, 1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + count
        return kwargs
