"""Model shapes for the planner: named presets with real shapes, reading a Hugging Face config.json, GPU sizes.

Two architectures cover the presets and the embedded models: a Llama-style decoder (RMSNorm, rotary positions,
grouped-query attention, gated SiLU MLP: Llama, Mistral, Qwen2, SmolLM2) and a BERT-style encoder (LayerNorm,
learned positions, GELU MLP, dropout, a pooler and a classifier).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model. ``tied``: the output head shares the embedding matrix.
    ``qkv_bias``: the attention projections have biases (Qwen2). Encoders: ``max_positions`` and ``type_vocab``
    (learned position / segment embeddings), ``attention_dropout`` and biases everywhere."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tied: bool = False
    encoder: bool = False
    max_positions: int = 0
    type_vocab: int = 0
    attention_dropout: float = 0.0
    qkv_bias: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    @property
    def biases(self) -> bool:
        return self.encoder or self.qkv_bias

    @property
    def default_lora(self) -> tuple[str, ...]:
        return ("query", "value") if self.encoder else ("q_proj", "v_proj")

    @property
    def default_ia3(self) -> tuple[str, ...]:
        return ("key", "value", "output.dense") if self.encoder else ("k_proj", "v_proj", "down_proj")

    @property
    def feedforward_output(self) -> str:
        return "output.dense" if self.encoder else "down_proj"

    def bias_tensors(self) -> list[tuple[int, int]]:
        """(elements, count) of the bias vectors (what BitFit trains)."""
        L, h = self.layers, self.hidden
        if not self.encoder:
            return [(self.q_dim, L), (self.kv_dim, 2 * L)] if self.qkv_bias else []
        # q, k, v, attention output, intermediate, output; two LayerNorm biases; embedding LayerNorm; pooler
        return [(h, 4 * L), (self.intermediate, L), (h, L), (h, 2 * L), (h, 1), (h, 1)]

    def param_tensors(self, num_labels: int = 2) -> list[int]:
        """Elements of every parameter tensor (tied tensors once; encoders with pooler and classifier)."""
        L, h, v = self.layers, self.hidden, self.vocab
        out = [v * h]
        for d_in, d_out, _ in linear_layers(self).values():
            out += [d_in * d_out] * L
        out += [n for n, c in self.bias_tensors() for _ in range(c)]
        if self.encoder:
            out += [self.max_positions * h, self.type_vocab * h, h] + [h] * 2 * L  # embeddings, LN weights
            out += [h * h, h * num_labels, num_labels]  # pooler weight, classifier
        else:
            out += [h] * (2 * L + 1) + ([] if self.tied else [v * h])  # RMSNorm weights, untied head
        return out

    def total_params(self, num_labels: int = 2) -> int:
        return sum(self.param_tensors(num_labels))

    def matmul_params(self) -> int:
        """Weights that multiply every token: the layers' linear maps and the output head (not the embedding)."""
        per_layer = sum(i * o for i, o, _ in linear_layers(self).values())
        return self.layers * per_layer + (0 if self.encoder else self.vocab * self.hidden)


def linear_layers(shape: ModelShape) -> dict[str, tuple[int, int, str]]:
    """One layer's linear maps: name -> (in, out, which activation is its input)."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    if shape.encoder:
        return {"query": (h, h, "attn_in"), "key": (h, h, "attn_in"), "value": (h, h, "attn_in"),
                "attention.output.dense": (h, h, "attn_out"), "intermediate.dense": (h, i, "mlp_in"),
                "output.dense": (i, h, "mlp_mid")}  # fmt: skip
    return {"q_proj": (h, q, "attn_in"), "k_proj": (h, kv, "attn_in"), "v_proj": (h, kv, "attn_in"),
            "o_proj": (q, h, "attn_out"), "gate_proj": (h, i, "mlp_in"), "up_proj": (h, i, "mlp_in"),
            "down_proj": (i, h, "mlp_mid")}  # fmt: skip


def _llama(name: str, hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, **kw) -> ModelShape:
    return ModelShape(name, hidden, layers, heads, kv, inter, vocab, **kw)


# Shapes from each model's published config.json.
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _llama("llama-7b", 4096, 32, 32, 32, 11008, 32000),
        _llama("llama-13b", 5120, 40, 40, 40, 13824, 32000),
        _llama("llama-33b", 6656, 60, 52, 52, 17920, 32000),
        _llama("llama-65b", 8192, 80, 64, 64, 22016, 32000),
        _llama("llama2-7b", 4096, 32, 32, 32, 11008, 32000),
        _llama("llama2-13b", 5120, 40, 40, 40, 13824, 32000),
        _llama("llama2-70b", 8192, 80, 64, 8, 28672, 32000),
        _llama("llama3-8b", 4096, 32, 32, 8, 14336, 128256),
        _llama("llama3-70b", 8192, 80, 64, 8, 28672, 128256),
        _llama("llama3.1-405b", 16384, 126, 128, 8, 53248, 128256),
        _llama("llama3.2-1b", 2048, 16, 32, 8, 8192, 128256, head_dim=64, tied=True),
        _llama("mistral-7b", 4096, 32, 32, 8, 14336, 32000),
        _llama("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, qkv_bias=True),
        _llama("smollm2-135m", 576, 30, 9, 3, 1536, 49152, head_dim=64, tied=True),
        ModelShape("minilm-l6", 384, 6, 12, 12, 1536, 30522, encoder=True, max_positions=512, type_vocab=2,
                   attention_dropout=0.1),
    )
}

# Memory of each GPU as nvidia-smi reports it (MiB), and its dense bf16 tensor-core peak (TFLOP/s, no sparsity).
GPUS: dict[str, tuple[int, float]] = {
    "t4-16gb": (15360, 65.0),
    "l4-24gb": (23034, 121.0),
    "a10g-24gb": (23028, 70.0),
    "rtx3090-24gb": (24576, 71.0),
    "rtx4090-24gb": (24564, 165.2),
    "a40-48gb": (46068, 149.7),
    "l40s-48gb": (46068, 362.1),
    "rtxa6000-48gb": (49140, 154.8),
    "a100-40gb": (40960, 312.0),
    "a100-80gb": (81920, 312.0),
    "h100-80gb": (81559, 989.4),
    "h200-141gb": (143771, 989.4),
    "b200-180gb": (183359, 2250.0),
}


def shape_from_config(path: str | Path, name: str | None = None) -> ModelShape:
    """A shape from a Hugging Face ``config.json`` (a file or the folder holding it)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no config.json there (give a model folder, its config.json, a preset or an embedded name)")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON ({err})") from None
    cfg = cfg.get("text_config", cfg)
    kind = cfg.get("model_type")
    try:
        if kind in DECODER_TYPES:
            heads = cfg["num_attention_heads"]
            return ModelShape(
                name or str(path), cfg["hidden_size"], cfg["num_hidden_layers"], heads,
                cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"], cfg["vocab_size"],
                head_dim=cfg.get("head_dim") or 0, tied=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(cfg.get("attention_bias", kind == "qwen2")),
            )  # fmt: skip
        if kind in ENCODER_TYPES:
            heads = cfg["num_attention_heads"]
            return ModelShape(
                name or str(path), cfg["hidden_size"], cfg["num_hidden_layers"], heads, heads,
                cfg["intermediate_size"], cfg["vocab_size"], encoder=True,
                max_positions=cfg["max_position_embeddings"], type_vocab=cfg.get("type_vocab_size", 2),
                attention_dropout=float(cfg.get("attention_probs_dropout_prob", 0.1)),
            )  # fmt: skip
    except KeyError as err:
        raise ValueError(f"{file}: a {kind} config needs {err.args[0]!r}") from None
    raise ValueError(
        f"{file}: model_type {kind!r} is not one the planner knows; it knows decoders {', '.join(DECODER_TYPES)} "
        f"and encoders {', '.join(ENCODER_TYPES)}"
    )


def find_shape(model: str) -> ModelShape:
    """A preset or embedded name (see ``PRESETS``), else a local config.json or model folder."""
    if model in PRESETS:
        return PRESETS[model]
    if Path(model).expanduser().exists():
        return shape_from_config(Path(model).expanduser())
    raise ValueError(f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}) or a local config.json / model folder")


def parse_memory(text: str) -> tuple[str, int]:
    """``"48GB"`` (10^9 bytes), ``"44.7GiB"`` (2^30), ``"40960MiB"`` or a GPU preset -> (label, bytes)."""
    key = text.strip().lower()
    if key in GPUS:
        return key, GPUS[key][0] * 2**20
    units = {"gib": 2**30, "mib": 2**20, "gb": 10**9, "mb": 10**6, "tb": 10**12, "tib": 2**40}
    for unit in sorted(units, key=len, reverse=True):
        if key.endswith(unit):
            try:
                value = float(key[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return text.strip(), int(value * units[unit])
    raise ValueError(f"--gpu-memory {text!r}: give a size such as 48GB, 44.7GiB or 40960MiB, or a GPU: {', '.join(GPUS)}")
