"""What a GGUF base model looks like to llama.cpp, and how Hugging Face module names map onto its tensors.

llama.cpp names a Llama-family model's weights ``token_embd``, ``blk.N.attn_q``, ... (``gguf``'s
``tensor_mapping.py`` and llama.cpp's ``convert_hf_to_gguf.py`` hold the full list for every architecture). peftkit
maps the Llama family only, through the table below; any other module is refused by name.

Two conventions matter for numbers to agree:

- **Layout.** A GGUF tensor's ``ne`` lists dimensions fastest first, so a weight stored ``ne = [in, out]`` is the
  same (out, in) row-major matrix as PyTorch's ``nn.Linear.weight``; numpy arrays keep PyTorch's order.
- **Rotary permutation.** ``convert_hf_to_gguf.py`` reorders the rows of ``q_proj`` and ``k_proj`` (within each
  head, Hugging Face's "rotate half" layout becomes llama.cpp's interleaved pairs): rows of head h,
  ``[h, 2, d/2]`` become ``[h, d/2, 2]``. transformers undoes it when it reads a GGUF. So any row-space quantity
  written for ``attn_q`` / ``attn_k`` (LoRA's B, a merged weight) must be permuted the same way: :func:`permute_rows`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ARCHITECTURES = ("llama",)  # GGUF general.architecture values peftkit maps
HF_MODEL_TYPES = {"llama": "llama"}  # Hugging Face config.model_type -> GGUF architecture

# Hugging Face module path (after "model.") -> GGUF tensor name, for the Llama family; "{n}" is the layer index.
LLAMA_NAMES = {
    "embed_tokens": "token_embd",
    "norm": "output_norm",
    "layers.{n}.self_attn.q_proj": "blk.{n}.attn_q",
    "layers.{n}.self_attn.k_proj": "blk.{n}.attn_k",
    "layers.{n}.self_attn.v_proj": "blk.{n}.attn_v",
    "layers.{n}.self_attn.o_proj": "blk.{n}.attn_output",
    "layers.{n}.mlp.gate_proj": "blk.{n}.ffn_gate",
    "layers.{n}.mlp.up_proj": "blk.{n}.ffn_up",
    "layers.{n}.mlp.down_proj": "blk.{n}.ffn_down",
    "layers.{n}.input_layernorm": "blk.{n}.attn_norm",
    "layers.{n}.post_attention_layernorm": "blk.{n}.ffn_norm",
}
_PATTERNS = [(re.compile("^model\\." + re.escape(hf).replace(r"\{n\}", r"(\d+)") + "$"), gg) for hf, gg in LLAMA_NAMES.items()]


def gguf_name(module: str) -> str | None:
    """The GGUF tensor (without ``.weight``) for a Hugging Face module path of a Llama model, or None."""
    if module == "lm_head":
        return "output"
    for pattern, target in _PATTERNS:
        match = pattern.match(module)
        if match:
            return target.format(n=match.group(1)) if match.groups() else target
    return None


@dataclass
class GgufBase:
    """The facts about a base model that an export checks against: architecture, heads, tensor shapes.

    ``shapes`` maps GGUF tensor names (``blk.0.attn_q.weight``) to PyTorch-order shapes ((out, in) for matrices).
    ``path`` is the GGUF file when the facts came from one (a merged export copies its metadata and tokenizer).
    """

    architecture: str
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, ...]]
    source: str
    path: Path | None = None
    fields: dict[str, object] = field(default_factory=dict)

    def permute_rows(self, gguf_tensor: str, rows: torch.Tensor) -> torch.Tensor:
        """Reorder the rows of a row-space quantity of ``gguf_tensor`` as llama.cpp stores it (see module doc)."""
        if re.search(r"\.attn_q\.weight$", gguf_tensor):
            return permute_rows(rows, self.n_head)
        if re.search(r"\.attn_k\.weight$", gguf_tensor):
            return permute_rows(rows, self.n_head_kv)
        return rows

    def unpermute_rows(self, gguf_tensor: str, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`permute_rows` (GGUF row order back to Hugging Face's)."""
        if re.search(r"\.attn_q\.weight$", gguf_tensor):
            return permute_rows(rows, self.n_head, inverse=True)
        if re.search(r"\.attn_k\.weight$", gguf_tensor):
            return permute_rows(rows, self.n_head_kv, inverse=True)
        return rows


def permute_rows(rows: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """Rows of each head ``[2, d/2]`` -> ``[d/2, 2]`` (convert_hf_to_gguf's ``permute``); ``inverse`` undoes it."""
    out = rows.shape[0]
    half = out // n_head // 2
    split = (n_head, half, 2) if inverse else (n_head, 2, half)
    return rows.reshape(*split, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def read_gguf_base(path: str | os.PathLike) -> GgufBase:
    """Facts of a base model GGUF file (metadata only: tensors are not read)."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from None
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = str(fields.get("general.architecture", "?"))
    if fields.get("general.type", "model") != "model":
        raise ValueError(f"{path} is a GGUF {fields.get('general.type')!r}, not a base model")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    return GgufBase(arch, int(fields.get(f"{arch}.attention.head_count", 0)),
                    int(fields.get(f"{arch}.attention.head_count_kv", fields.get(f"{arch}.attention.head_count", 0))),
                    shapes, source=str(path), path=path, fields=fields)


def base_from_hf_config(folder: str | os.PathLike) -> GgufBase:
    """The same facts from a Hugging Face ``config.json`` (for adapters whose base has no GGUF at hand)."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    model_type = config.get("model_type", "?")
    arch = HF_MODEL_TYPES.get(model_type, model_type)
    if arch not in ARCHITECTURES:
        return GgufBase(arch, 0, 0, {}, source=str(path))
    d, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or d // n_head
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not config.get("tie_word_embeddings", False):
        shapes["output.weight"] = (v, d)
    for n in range(config["num_hidden_layers"]):
        shapes.update({
            f"blk.{n}.attn_q.weight": (n_head * head_dim, d), f"blk.{n}.attn_k.weight": (n_kv * head_dim, d),
            f"blk.{n}.attn_v.weight": (n_kv * head_dim, d), f"blk.{n}.attn_output.weight": (d, n_head * head_dim),
            f"blk.{n}.ffn_gate.weight": (ff, d), f"blk.{n}.ffn_up.weight": (ff, d), f"blk.{n}.ffn_down.weight": (d, ff),
            f"blk.{n}.attn_norm.weight": (d,), f"blk.{n}.ffn_norm.weight": (d,),
        })
    return GgufBase(arch, n_head, n_kv, shapes, source=str(path))


def dequantized_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 in PyTorch order (for tests and checks; the file's own row order)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    return out
