"""A merged model (base + adapter folded in) as a full GGUF that llama.cpp and Ollama run without any adapter.

The base's own GGUF is the template: every metadata key (architecture hyper-parameters, tokenizer vocabulary,
merges, special tokens, chat template) is copied as it is, and the file has exactly the base's tensors, in its
order, each replaced by the merged model's value (q/k rows permuted as llama.cpp stores them). Only
``general.file_type`` and ``general.name`` change. Vectors (norms) stay float32, as llama.cpp's converter keeps
them; matrices are written as ``outtype``: f32 (exact), f16, or q8_0 (blocks of 32 weights, one f16 scale each,
``gguf.quants``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import checkpoint
from .gguf_base import ARCHITECTURES, GgufBase, gguf_name

OUTTYPES = ("f32", "f16", "q8_0")


@dataclass
class MergedExport:
    path: Path
    outtype: str
    tensors: int
    bytes: int


def merged_tensors(model: nn.Module, base: GgufBase) -> dict[str, torch.Tensor]:
    """The merged model's weights under the base GGUF's tensor names, in GGUF row order; every base tensor present."""
    found: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        target = gguf_name(module)
        if target is not None and leaf == "weight":
            found[f"{target}.weight"] = value.detach().float()
    if "output.weight" not in base.shapes and "output.weight" in found:
        tied = found.pop("output.weight")
        if not torch.equal(tied, found.get("token_embd.weight", tied)):
            raise ValueError("the merged lm_head differs from the token embeddings, but the base GGUF ties them (it has "
                             "no output.weight): an adapter on lm_head cannot be written into this base")
    missing = sorted(set(base.shapes) - set(found))
    if missing:
        raise ValueError(f"the merged model has no weight for {len(missing)} tensor(s) of the base GGUF, e.g. {missing[:3]}: "
                         "is it the same architecture?")
    out = {}
    for name, want in base.shapes.items():
        value = found[name]
        if tuple(value.shape) != want:
            raise ValueError(f"merged weight {name} is {tuple(value.shape)} but the base GGUF's is {want} ({base.source}): "
                             "the adapter's base is not this GGUF's model")
        out[name] = base.permute_rows(name, value)
    return out


def check_merge_base(base: GgufBase) -> None:
    """A merged GGUF needs the base's own GGUF file (its metadata and tokenizer) of a mapped architecture."""
    if base.path is None:
        raise ValueError(f"a merged GGUF copies the base's GGUF metadata and tokenizer: pass --base-gguf (the base "
                         f"model's GGUF file; {base.source} is not one)")
    if base.architecture not in ARCHITECTURES:
        raise ValueError(f"the base {base.source} is a {base.architecture!r} model; peftkit writes GGUF for the "
                         f"{', '.join(ARCHITECTURES)} family only")


def write_merged_gguf(model: nn.Module, base: GgufBase, out: str | os.PathLike, outtype: str = "f32",
                      name: str | None = None) -> MergedExport:
    """Write ``model`` (a plain merged model) as a GGUF at ``out`` with ``base``'s metadata and tokenizer, atomically."""
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    check_merge_base(base)
    tensors = merged_tensors(model, base)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    reader = gguf.GGUFReader(base.path)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, base.architecture)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.name"):
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub_type=sub)
        writer.add_name(name or f"{base.fields.get('general.name', 'model')} (merged, peftkit)")
        writer.add_file_type(int(file_type))
        for tensor in reader.tensors:  # the base's order
            value = tensors[tensor.name].contiguous().numpy().astype(np.float32)
            if value.ndim == 1 or outtype == "f32":
                writer.add_tensor(tensor.name, value)
            elif outtype == "f16":
                writer.add_tensor(tensor.name, value.astype(np.float16))
            else:
                qtype = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(tensor.name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    checkpoint.atomic_write(out, write)
    return MergedExport(Path(out), outtype, len(tensors), Path(out).stat().st_size)
