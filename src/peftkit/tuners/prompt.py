"""Prompt tuning (Lester et al. 2021): learned virtual-token embeddings prepended to the input.

    inputs_embeds' = [P ; E(x)]          P: num_virtual_tokens x token_dim (trained), E: the frozen embedding

The attention mask gains ``num_virtual_tokens`` ones in front, per-token labels as many ``-100`` (no loss on virtual
positions; sequence-classification labels stay as they are) and ``token_type_ids`` as many zeros. ``generate`` returns the prompt tokens plus the new ones, as the base
model's ``generate`` does; the virtual tokens never appear in the output.

The embeddings live in an ``nn.ModuleDict`` registered on the base model as ``prompt_encoder`` (one entry per adapter
name). Files hold them as the single tensor ``prompt_embeddings`` and use HF PEFT's ``PROMPT_TUNING`` config, so
adapters move both ways. Several prompt-tuning adapters active together prepend their tokens in ``set_adapter`` order.

This module also holds what prompt and prefix tuning share: :class:`PromptLearningConfig` (HF PEFT's
``num_virtual_tokens``, ``token_dim``, ``num_layers``, ``num_attention_heads``, ``num_transformer_submodules``,
filled in from the model when left unset) and :class:`PromptLearningTuner` (encoder storage, file key, freezing).
Neither method can be merged into the weights. Both mix per row with every other method in one batch
(``adapter_names=``): :mod:`peftkit.tuners.mixed_prompts` gives each row its own virtual front.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..hf_compat import find_cache
from .base import CliOption, PeftConfig, Tuner, check_positive_int, register
from .layer import LayerTree

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"  # HF PEFT's one key for every prompt-learning method
_LAYER_TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by prompt-learning methods, named as in HF PEFT.

    ``num_virtual_tokens``: how many virtual tokens to learn (required). ``token_dim``, ``num_layers``,
    ``num_attention_heads``: read from the model config when None. ``num_transformer_submodules``: 1 (decoder-only
    and encoder models; HF PEFT's 2 for encoder-decoder models is not supported here).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_positive_int(self, "num_virtual_tokens", self.num_virtual_tokens)
        for size in ("token_dim", "num_attention_heads", "num_layers"):
            check_positive_int(self, size, getattr(self, size), optional=True)
        set_fields = [f for f in _LAYER_TARGETING if getattr(self, f) is not None]
        if set_fields:
            raise ValueError(f"{name} acts on the inputs, not on modules: remove {', '.join(set_fields)}")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(
                f"{name}.num_transformer_submodules={self.num_transformer_submodules}: only 1 (decoder-only or encoder "
                "models) is supported; encoder-decoder models are not"
            )

    def to_dict(self) -> dict[str, Any]:
        # HF PEFT's prompt-learning configs have no module-targeting fields
        out = super().to_dict()
        for name in _LAYER_TARGETING:
            out.pop(name)
        return out

    def fill_from_model(self, model: nn.Module) -> None:
        """Set the unset size fields from the model config, as HF PEFT's ``_prepare_prompt_learning_config`` does."""
        cfg = _text_config(model)
        if getattr(cfg, "is_encoder_decoder", False):
            raise ValueError(
                f"{type(self).__name__}: encoder-decoder models ({cfg.model_type}) are not supported; use a decoder-only "
                "or encoder model"
            )
        self.num_transformer_submodules = 1
        if self.num_layers is None:
            self.num_layers = _first_attr(cfg, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers", self)
        if self.token_dim is None:
            self.token_dim = _first_attr(cfg, ("hidden_size", "n_embd", "d_model"), "token_dim", self)
        if self.num_attention_heads is None:
            self.num_attention_heads = _first_attr(
                cfg, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"), "num_attention_heads", self
            )


def _text_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("prompt-learning methods need a transformers model (one with a .config)")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _first_attr(cfg: Any, names: tuple[str, ...], field_name: str, config: PeftConfig) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    raise ValueError(f"cannot read {field_name} from the model config; set {type(config).__name__}.{field_name}")


class PromptLearningTuner(Tuner, abc.ABC):
    """Shared by prompt and prefix tuning: one encoder per adapter in ``model.<encoder_attr>`` (an ``nn.ModuleDict``)."""

    mergeable = False
    file_prefix = "base_model."
    encoder_attr: ClassVar[str] = ""
    cli_options = {"num_virtual_tokens": CliOption("num_virtual_tokens", 20)}

    @abc.abstractmethod
    def make_encoder(self, model: nn.Module, config: PromptLearningConfig) -> nn.Module:
        """The module that produces this adapter's virtual tokens (or per-layer keys and values)."""

    def inject(self, model: nn.Module, config: PromptLearningConfig, adapter_name: str, init: bool = True) -> None:
        config.fill_from_model(model)
        encoder = self.make_encoder(model, config)
        device = next(model.parameters()).device
        encoder.to(device).requires_grad_(False)  # PeftModel marks the active, trainable adapters
        store = getattr(model, self.encoder_attr, None)
        if store is None:
            store = nn.ModuleDict()
            model.add_module(self.encoder_attr, store)
        store[adapter_name] = encoder

    def encoder(self, model: nn.Module, adapter_name: str) -> nn.Module:
        return getattr(model, self.encoder_attr)[adapter_name]

    def adapter_tensors(self, model: nn.Module, adapter_name: str, config: PeftConfig,
                        tree: LayerTree | None = None) -> dict[str, torch.Tensor]:
        return {PROMPT_EMBEDDINGS_KEY: self.encoder(model, adapter_name).saved_embeddings()}

    def mark_trainable(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        self.encoder(model, adapter_name).requires_grad_(True)

    def mark_frozen(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        self.encoder(model, adapter_name).requires_grad_(False)

    def delete_adapter(self, model: nn.Module, adapter_name: str) -> None:
        store = getattr(model, self.encoder_attr, None)
        if store is not None and adapter_name in store:
            del store[adapter_name]
            if not len(store):
                delattr(model, self.encoder_attr)

    def unload(self, model: nn.Module) -> None:
        if hasattr(model, self.encoder_attr):
            delattr(model, self.encoder_attr)


def input_batch(kwargs: dict[str, Any], method: str) -> tuple[int, int]:
    """(batch, length) of ``input_ids`` or ``inputs_embeds``; prompt-learning methods need one of them by keyword."""
    ref = kwargs.get("input_ids")
    if ref is None:
        ref = kwargs.get("inputs_embeds")
    if ref is None:
        raise TypeError(
            f"{method} rewrites the inputs: pass input_ids=... (or inputs_embeds=...) by keyword, "
            "e.g. model(input_ids=ids, attention_mask=mask)"
        )
    return ref.shape[0], ref.shape[1]


def extend_front(tensor: torch.Tensor, count: int, fill: float) -> torch.Tensor:
    """``tensor`` (batch x length) with ``count`` columns of ``fill`` in front, in its own dtype."""
    front = torch.full((tensor.shape[0], count), fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat((front, tensor), dim=1)


def cache_is_filled(kwargs: dict[str, Any]) -> bool:
    """Whether the forward's keyword arguments carry a key/value cache that already holds positions."""
    cache = find_cache(kwargs)
    return cache is not None and cache.get_seq_length() > 0


# ----------------------------------------------------------------------------------------------------------------
# Prompt tuning

_INIT_ALIASES = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB", "sample_vocab": "SAMPLE_VOCAB"}


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning, with HF PEFT's fields.

    ``prompt_tuning_init``: ``"RANDOM"`` (N(0, 1), as ``nn.Embedding`` and HF PEFT do), ``"TEXT"`` (the embeddings of
    ``prompt_tuning_init_text``, repeated or cut to ``num_virtual_tokens`` tokens) or ``"SAMPLE_VOCAB"`` (embeddings of
    random vocabulary tokens); the lowercase aliases ``"random"``, ``"text"``, ``"vocab"`` are accepted. TEXT needs a
    tokenizer: the ``tokenizer`` object, or ``tokenizer_name_or_path`` (loaded with :func:`peftkit.load_tokenizer`).
    ``tokenizer`` is never written to files; its ``name_or_path`` fills ``tokenizer_name_or_path`` so HF PEFT can read
    the config.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        init = _INIT_ALIASES.get(init.lower(), init.upper())
        if init not in ("RANDOM", "TEXT", "SAMPLE_VOCAB"):
            raise ValueError(
                f"PromptTuningConfig.prompt_tuning_init must be RANDOM, TEXT or SAMPLE_VOCAB (or random, text, vocab), "
                f"got {self.prompt_tuning_init!r}"
            )
        self.prompt_tuning_init = init
        if init == "TEXT":
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer: pass tokenizer=... or tokenizer_name_or_path")
        if self.tokenizer is not None and self.tokenizer_name_or_path is None:
            self.tokenizer_name_or_path = getattr(self.tokenizer, "name_or_path", None) or None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("tokenizer")
        return out


class PromptEmbedding(nn.Module):
    """The virtual-token embeddings P (``embedding.weight``, num_virtual_tokens x token_dim), fp32 as in HF PEFT."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

    def saved_embeddings(self) -> torch.Tensor:
        return self.embedding.weight.detach()


def _init_token_ids(config: PromptTuningConfig, vocab_size: int) -> torch.Tensor | None:
    """Token ids whose embeddings start the prompt (None: random init), as HF PEFT chooses them."""
    count = config.num_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (count,), dtype=torch.long)
    if config.prompt_tuning_init == "TEXT":
        from ..models import load_tokenizer

        tokenizer = config.tokenizer or load_tokenizer(config.tokenizer_name_or_path)
        ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
        if not ids:
            raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens")
        ids = (ids * math.ceil(count / len(ids)))[:count]
        return torch.tensor(ids, dtype=torch.long)
    return None


@register
class PromptTuningTuner(PromptLearningTuner):
    peft_type = "PROMPT_TUNING"
    config_cls = PromptTuningConfig
    encoder_attr = "prompt_encoder"
    cli_names = {"prompt": {}}
    default_lr = (3e-2, 3e-2)

    def make_encoder(self, model: nn.Module, config: PromptTuningConfig) -> nn.Module:
        embed = model.get_input_embeddings()
        if config.token_dim != embed.weight.shape[1]:
            raise ValueError(
                f"PromptTuningConfig.token_dim={config.token_dim} but the model's input embeddings have width "
                f"{embed.weight.shape[1]}; leave token_dim unset to read it from the model"
            )
        init = None
        if not config.inference_mode:  # a loaded adapter gets its values from the file
            ids = _init_token_ids(config, embed.weight.shape[0])
            if ids is not None:
                with torch.no_grad():
                    init = embed(ids.to(embed.weight.device)).float()
        return PromptEmbedding(config.num_virtual_tokens, config.token_dim, init)

    def prepare_inputs(
        self, peft_model: nn.Module, adapter_name: str, kwargs: dict[str, Any], generate: bool
    ) -> dict[str, Any]:
        """Prepend the virtual tokens to ``inputs_embeds``; extend mask, labels, token types and positions to match.

        In ``generate`` the ``input_ids`` stay beside ``inputs_embeds``: transformers feeds the embeddings in the first
        step and returns ``input_ids`` plus the new tokens.
        """
        batch, length = input_batch(kwargs, "prompt tuning")
        if generate and cache_is_filled(kwargs):
            raise ValueError(
                "prompt tuning adds input positions, which generate cannot combine with an already filled "
                "key/value cache; with prefix-tuning adapters active too, put the prompt-tuning adapter first in "
                "set_adapter([...])"
            )
        model = peft_model.base_model
        config = peft_model.peft_config[adapter_name]
        count = config.num_virtual_tokens
        kwargs = dict(kwargs)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            ids = kwargs["input_ids"] if generate else kwargs.pop("input_ids")
            embeds = model.get_input_embeddings()(ids)
        elif not generate:
            kwargs.pop("input_ids", None)
        prompts = self.encoder(model, adapter_name)().to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat((prompts.unsqueeze(0).expand(batch, -1, -1), embeds), dim=1)
        if generate and kwargs.get("attention_mask") is None:
            # transformers would build a mask as long as input_ids, shorter than the embeddings
            kwargs["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        for key, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            if kwargs.get(key) is not None:
                kwargs[key] = extend_front(kwargs[key], count, fill)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and config.task_type != "SEQ_CLS":  # per-token labels only
            kwargs["labels"] = extend_front(labels, count, -100)
        positions = kwargs.get("position_ids")
        if positions is not None:
            # virtual tokens take positions 0..n-1, the real tokens shift by n (the default numbering)
            front = torch.arange(count, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], -1)
            kwargs["position_ids"] = torch.cat((front, positions + count), dim=1)
        return kwargs
