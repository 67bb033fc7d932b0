"""A peftkit / HF PEFT LoRA adapter as a llama.cpp LoRA GGUF (``llama-cli --lora``, Ollama's ``ADAPTER``).

llama.cpp's adapter format (``convert_lora_to_gguf.py`` writes it, ``src/llama-adapter.cpp`` reads it):

- metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32) and
  ``general.architecture`` equal to the base model's (llama.cpp refuses "model arch and LoRA arch mismatch");
- for each adapted weight ``W`` (GGUF name ``blk.N.attn_q.weight``) two tensors ``blk.N.attn_q.weight.lora_a``
  (PyTorch shape (r, in): ``ne = [in, r]``) and ``.lora_b`` ((out, r): ``ne = [r, out]``); llama.cpp checks
  ``W.ne[0] == a.ne[0]``, ``W.ne[1] == b.ne[1]`` and ``a.ne[1] == b.ne[0]``;
- llama.cpp adds ``scale * B (A x)`` with ``scale = adapter.lora.alpha / r``, r read from each B
  (``--lora-scaled F`` multiplies it by F).

So the scale is carried exactly:

- plain LoRA, scale alpha / r: ``adapter.lora.alpha = lora_alpha``;
- rsLoRA (Kalajdzievski 2023), scale alpha / sqrt(r): ``adapter.lora.alpha = lora_alpha * sqrt(r)``, since
  (alpha sqrt(r)) / r = alpha / sqrt(r). llama.cpp's own converter writes lora_alpha unchanged and so gets rsLoRA
  adapters wrong by a factor sqrt(r);
- per-module ``rank_pattern`` / ``alpha_pattern``: one alpha is written, and B of every module whose own scale
  differs from ``alpha / r_module`` is multiplied by the ratio (the product B A is what counts).

B of ``q_proj`` / ``k_proj`` is row-permuted as llama.cpp's converter permutes those weights
(:func:`peftkit.export.gguf_base.permute_rows`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..models import embedded_gguf, portable_name, resolve_model_path
from ..tuners.base import FILE_PREFIX
from .gguf_base import ARCHITECTURES, GgufBase, base_from_hf_config, gguf_name, read_gguf_base
from .rules import LLAMA_CPP_REFUSALS


@dataclass
class LoraExport:
    """What :func:`export_lora_gguf` wrote: file, base, the alpha written, tensor pairs, whether B was rescaled."""

    path: Path
    base: str
    architecture: str
    alpha: float
    pairs: int
    rescaled: int


def resolve_base(base_name: str | None, base_gguf: str | os.PathLike | None) -> GgufBase:
    """The base model's facts: from ``base_gguf``, else the embedded model's own GGUF, else its config.json."""
    if base_gguf is not None:
        return read_gguf_base(base_gguf)
    if base_name and embedded_gguf(base_name) is not None:
        return read_gguf_base(embedded_gguf(base_name))
    if base_name:
        path = resolve_model_path(base_name)
        if isinstance(path, Path):
            return base_from_hf_config(path)
    raise ValueError(f"cannot find the base model {base_name!r} offline to check the adapter against: "
                     "pass --base-gguf (the base model's GGUF file)")


def check_exportable(config, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse, with the reason, what a llama.cpp LoRA adapter cannot hold."""
    if config.peft_type != "LORA":
        raise ValueError(f"cannot export a {config.peft_type} adapter to a llama.cpp adapter: "
                         f"{LLAMA_CPP_REFUSALS.get(config.peft_type, 'llama.cpp loads LoRA adapters only')}")
    if config.modules_to_save:
        raise ValueError(f"cannot export: modules_to_save {config.modules_to_save} are whole trained modules, which a "
                         "llama.cpp adapter cannot hold; merge instead (peftkit merge --to gguf)")
    extra = sorted(k for k in tensors if not re.search(r"\.lora_[AB]\.weight$", k))
    if extra:
        raise ValueError(f"cannot export: {len(extra)} tensor(s) besides LoRA's A and B (e.g. {extra[0]}, "
                         f"bias={config.bias!r}); llama.cpp adapters hold A and B only: merge instead (peftkit merge --to gguf)")


@dataclass
class LoraPlan:
    """The checked content of a LoRA GGUF: the base, the alpha to write, (GGUF weight, A, B) pairs in file layout."""

    config: object
    base: GgufBase
    alpha: float
    pairs: list[tuple[str, np.ndarray, np.ndarray]]
    rescaled: int


def plan_lora_gguf(adapter: str | os.PathLike, base_gguf: str | os.PathLike | None = None) -> LoraPlan:
    """Check the adapter against the base and lay out its tensors as llama.cpp wants; ValueError names what does not fit."""
    folder = Path(adapter)
    config = checkpoint.read_config(folder)
    tensors = checkpoint.load_tensors(folder / checkpoint.WEIGHTS_NAME)
    check_exportable(config, tensors)
    base = resolve_base(config.base_model_name_or_path, base_gguf)
    if base.architecture not in ARCHITECTURES:
        raise ValueError(f"the base {base.source} is a {base.architecture!r} model; peftkit exports GGUF for the "
                         f"{', '.join(ARCHITECTURES)} family only (SmolLM2, Llama, ...)")

    if config.use_rslora:  # llama.cpp: scale = alpha / r; rsLoRA: alpha / sqrt(r)
        alpha = float(config.lora_alpha) * math.sqrt(config.r)
    else:
        alpha = float(config.lora_alpha)
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    rescaled = 0
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module = key[len(FILE_PREFIX):-len(".lora_A.weight")]
        A, B = tensors[key].float(), tensors.get(key.replace(".lora_A.", ".lora_B."))
        if B is None:
            raise ValueError(f"{folder}: {key} has no matching lora_B tensor")
        B = B.float()
        target = gguf_name(module)
        if target == "token_embd":
            raise ValueError(f"cannot export LoRA on {module}: llama.cpp lays token-embedding LoRA out differently and "
                             "it is not proven here; leave embed_tokens out of target_modules, or merge instead")
        if target is None:
            raise ValueError(f"module {module} has no llama.cpp tensor name: peftkit maps the Llama family's modules "
                             "(q/k/v/o_proj, gate/up/down_proj, lm_head); was the adapter trained on another architecture?")
        weight = target + ".weight"
        if weight not in base.shapes:
            hint = (" (this base ties lm_head to the token embeddings, so llama.cpp has no separate output weight)"
                    if target == "output" else "")
            raise ValueError(f"module {module} maps to {weight}, which the base {base.source} does not have{hint}")
        want = base.shapes[weight]
        if (B.shape[0], A.shape[1]) != want:
            raise ValueError(f"module {module}: the adapter's update is {B.shape[0]} x {A.shape[1]} but the base's {weight} "
                             f"is {want[0]} x {want[1]} ({base.source}): the adapter was trained on another base model")
        r, module_alpha = config.rank_and_alpha(module)
        true_scale = module_alpha / math.sqrt(r) if config.use_rslora else module_alpha / r
        if not math.isclose(true_scale, alpha / r, rel_tol=1e-12):
            B = B * (true_scale / (alpha / r))
            rescaled += 1
        B = base.permute_rows(weight, B)
        pairs.append((weight, A.contiguous().numpy(), B.contiguous().numpy()))
    if not pairs:
        raise ValueError(f"{folder} holds no LoRA A/B tensors to export")
    return LoraPlan(config, base, alpha, pairs, rescaled)


def export_lora_gguf(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    base_gguf: str | os.PathLike | None = None,
    base_name: str | None = None,
) -> LoraExport:
    """Write the LoRA adapter folder ``adapter`` as a llama.cpp LoRA GGUF at ``out`` (atomically).

    ``base_gguf``: the base model's GGUF, to check names and shapes against (default: the embedded model's own
    file when the adapter was trained on it, else the facts of the base's config.json). ``base_name``: the name
    recorded as ``general.base_model.0.name`` (default: the adapter's base, as a hub id where known).
    """
    import gguf

    folder = Path(adapter)
    plan = plan_lora_gguf(folder, base_gguf)
    config, base, alpha, pairs = plan.config, plan.base, plan.alpha, plan.pairs
    recorded = portable_name(base_name or config.base_model_name_or_path or "")

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, base.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{folder.resolve().name} (LoRA r={config.r}, peftkit)")
        if recorded:
            writer.add_uint32(gguf.Keys.General.BASE_MODEL_COUNT, 1)
            writer.add_string(gguf.Keys.General.BASE_MODEL_NAME.format(id=0), recorded)
        for weight, a, b in pairs:
            writer.add_tensor(weight + ".lora_a", a)
            writer.add_tensor(weight + ".lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    checkpoint.atomic_write(out, write)
    return LoraExport(Path(out), recorded, base.architecture, alpha, len(pairs), plan.rescaled)
