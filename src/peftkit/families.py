"""Model families: what peftkit knows about each architecture, in one table keyed by transformers' ``model_type``.

Every method's defaults (LoRA and (IA)^3 targets, where bottleneck adapters go), the output heads that
``all-linear`` and quantization leave alone, the classification head trained with ``SEQ_CLS`` adapters, and
whether ``--model`` is an encoder come from here, so supporting a new architecture is one :class:`Family` entry::

    register_family("gpt_neox", Family(
        encoder=False, heads=("embed_out", "score"), classifier="score",
        layers="layers", attention_output="attention.dense", feedforward_output="mlp.dense_4h_to_h",
        lora_targets=("query_key_value",),
        ia3_targets=("query_key_value", "dense_4h_to_h"), ia3_feedforward=("dense_4h_to_h",),
    ))

A field left ``None`` means peftkit has no default for it: that method then needs its targets passed explicitly.
The LoRA and (IA)^3 defaults are Hugging Face PEFT's, so adapters trained with defaults match theirs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """One architecture's module names.

    ``encoder``: a bidirectional encoder (BERT-like: classification, no causal language modelling).
    ``heads``: names of the output heads of the family's task models (``lm_head``, ``score``, ...), which
    ``all-linear`` never targets and quantization keeps in full precision.
    ``classifier``: path of the sequence-classification head's output layer (``score``, ``classifier``, or
    ``classifier.out_proj`` when the head has a hidden layer); its first part is the module ``SEQ_CLS`` adapters
    train in full, its ``.weight`` tells a saved adapter's number of classes.
    ``layers``: the container of the numbered layers (``model.layers.3`` -> ``"layers"``), for
    ``layers_to_transform`` and bottleneck placement. ``attention_output`` / ``feedforward_output``: paths inside
    one layer of the attention and feed-forward output projections, after which bottleneck adapters go.
    ``lora_targets``: LoRA's default ``target_modules``. ``ia3_targets`` / ``ia3_feedforward``: (IA)^3's default
    ``target_modules`` / ``feedforward_modules`` (names matched as suffixes, as HF PEFT does).
    """

    encoder: bool
    heads: tuple[str, ...]
    classifier: str
    layers: str | None = None
    attention_output: str | None = None
    feedforward_output: str | None = None
    lora_targets: tuple[str, ...] | None = None
    ia3_targets: tuple[str, ...] | None = None
    ia3_feedforward: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.ia3_targets is None) != (self.ia3_feedforward is None):
            raise ValueError("Family.ia3_targets and ia3_feedforward are given together or not at all")
        if self.ia3_targets is not None and not set(self.ia3_feedforward or ()) <= set(self.ia3_targets):
            raise ValueError(f"Family.ia3_feedforward {self.ia3_feedforward} must be among ia3_targets {self.ia3_targets}")
        if (self.attention_output or self.feedforward_output) and not self.layers:
            raise ValueError("Family.attention_output / feedforward_output need layers (the layer container's name)")


_DECODER_HEADS = ("lm_head", "score", "qa_outputs")
_ENCODER_HEADS = ("classifier", "qa_outputs")

_LLAMA = Family(
    encoder=False, heads=_DECODER_HEADS, classifier="score",
    layers="layers", attention_output="self_attn.o_proj", feedforward_output="mlp.down_proj",
    lora_targets=("q_proj", "v_proj"), ia3_targets=("k_proj", "v_proj", "down_proj"), ia3_feedforward=("down_proj",),
)
_QWEN = dataclasses.replace(_LLAMA, ia3_targets=("q_proj", "v_proj", "down_proj"))  # also HF PEFT's Gemma choice
_GPT2 = Family(
    encoder=False, heads=_DECODER_HEADS + ("classifier",), classifier="score",
    layers="h", attention_output="attn.c_proj", feedforward_output="mlp.c_proj",
    lora_targets=("c_attn",), ia3_targets=("c_attn", "mlp.c_proj"), ia3_feedforward=("mlp.c_proj",),
)
_BERT = Family(
    encoder=True, heads=_ENCODER_HEADS, classifier="classifier",
    layers="layer", attention_output="attention.output.dense", feedforward_output="output.dense",
    lora_targets=("query", "value"), ia3_targets=("key", "value", "output.dense"), ia3_feedforward=("output.dense",),
)
_ROBERTA = dataclasses.replace(_BERT, classifier="classifier.out_proj")
# HF PEFT has LoRA defaults for these, not (IA)^3 ones: (IA)^3 needs --target-modules here.
_ROBERTA_LORA_ONLY = dataclasses.replace(_ROBERTA, ia3_targets=None, ia3_feedforward=None)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _QWEN,
    "qwen3": _QWEN,
    "gemma": _QWEN,
    "gemma2": _QWEN,
    "gpt2": _GPT2,
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA_LORA_ONLY,
    "electra": _ROBERTA_LORA_ONLY,
    "distilbert": Family(encoder=True, heads=_ENCODER_HEADS, classifier="classifier", layers="layer",
                         lora_targets=("q_lin", "v_lin")),
    "deberta-v2": dataclasses.replace(_BERT, lora_targets=("query_proj", "value_proj"),
                                      ia3_targets=("key_proj", "value_proj", "output.dense")),
}

# Layer containers of models that have no family entry (timm-style vision transformers, hand-written models).
_OTHER_LAYER_CONTAINERS = ("blocks",)


def register_family(model_type: str, family: Family) -> None:
    """Teach peftkit an architecture (or replace what it knows about one): every method, the CLI and evaluation
    read the table, so this one call is all a new family needs."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family needs a peftkit.families.Family, got {type(family).__name__}")
    FAMILIES[model_type] = family


def model_type_of(model: nn.Module) -> str | None:
    """transformers' ``config.model_type`` of ``model`` (None for models without a transformers config)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def require(model: nn.Module, what: str, remedy: str, *fields: str) -> Family:
    """The family of ``model`` when it has every one of ``fields``; otherwise a one-line ValueError saying that
    peftkit has no ``what`` for this model type and what to pass instead (``remedy``)."""
    model_type = model_type_of(model)
    family = FAMILIES.get(model_type or "")
    if family is not None and all(getattr(family, name) is not None for name in fields):
        return family
    known = [t for t, f in FAMILIES.items() if all(getattr(f, name) is not None for name in fields)]
    raise ValueError(
        f"peftkit has no {what} for model type {model_type!r} (known: {', '.join(known)}): {remedy}, "
        f"or describe the architecture once with peftkit.families.register_family({model_type!r}, Family(...))"
    )


def is_encoder(model_type: str | None) -> bool:
    """Whether ``model_type`` is a known encoder family (unknown types count as decoders)."""
    family = FAMILIES.get(model_type or "")
    return family is not None and family.encoder


def head_names() -> set[str]:
    """Module names that are output heads in any family (a model's own output embeddings are found apart)."""
    return {name for family in FAMILIES.values() for name in family.heads}


def classifier_modules() -> list[str]:
    """Module names of classification heads in any family: what ``SEQ_CLS`` adapters train in full."""
    return sorted({family.classifier.split(".")[0] for family in FAMILIES.values()})


def classifier_weight_suffixes() -> tuple[str, ...]:
    """Endings of the classification head's output weight in adapter-file keys (its rows are the classes)."""
    return tuple(sorted({f".{family.classifier}.weight" for family in FAMILIES.values()}))


def layer_containers() -> tuple[str, ...]:
    """Names of layer containers (``layers``, ``h``, ``layer``, ...), where ``layers_to_transform`` looks for layer
    indices when no ``layers_pattern`` is given."""
    names = [family.layers for family in FAMILIES.values() if family.layers] + list(_OTHER_LAYER_CONTAINERS)
    return tuple(dict.fromkeys(names))
