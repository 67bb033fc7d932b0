"""``peftkit inspect --portable``: will this adapter load in HF PEFT, vLLM, llama.cpp / Ollama, or as a merged GGUF;
if not, exactly why and what to do. The rules are in :mod:`.rules`; llama.cpp's verdict runs the export's own
checks (:func:`.gguf_lora.plan_lora_gguf`) without writing anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint
from ..models import HUB_IDS, portable_name
from .gguf_lora import plan_lora_gguf, resolve_base
from .gguf_merged import check_merge_base
from .rules import (LLAMA_CPP_REFUSALS, MERGEABLE, VLLM_DEFAULT_MAX_RANK, VLLM_LLAMA_MODULES, VLLM_MAX_RANK,
                    VLLM_REFUSALS)

HF_PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING")  # the peftkit methods HF PEFT also has


@dataclass
class Verdict:
    runtime: str
    loads: bool
    why: str


def base_name_verdict(base: str | None) -> Verdict:
    """Whether the recorded base model means something on another machine."""
    if not base:
        return Verdict("base model", False, "no base model recorded: set it with peftkit export --to peft --base-name HUB_ID")
    if portable_name(base) in HUB_IDS.values() and portable_name(base) != base:
        return Verdict("base model", False, f"{base} is this machine's copy of {portable_name(base)}: "
                                            f"set --base-name {portable_name(base)}")
    if os.path.isabs(base) or base.startswith(("./", "../", "~")) or Path(base).exists():
        return Verdict("base model", False, f"absolute or local base path {base}: other machines cannot find it; "
                                            "set --base-name HUB_ID (peftkit export --to peft --base-name ...)")
    return Verdict("base model", True, base)


def _vllm(config, modules: list[str]) -> Verdict:
    if config.peft_type != "LORA":
        return Verdict("vLLM", False, VLLM_REFUSALS.get(config.peft_type, "vLLM serves LoRA adapters only"))
    if config.modules_to_save:
        return Verdict("vLLM", False, f"modules_to_save {config.modules_to_save}: vLLM refuses it ('vLLM only supports "
                                      "modules_to_save being None'); merge the adapter and serve the merged model")
    if config.bias != "none":
        return Verdict("vLLM", False, f"bias={config.bias!r}: vLLM refuses adapter biases; retrain with bias='none' or merge")
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    unknown = [m for m in leaves if m not in VLLM_LLAMA_MODULES]
    if unknown:
        return Verdict("vLLM", False, f"targets {unknown} are not layers vLLM's LoRA wraps (it takes {', '.join(VLLM_LLAMA_MODULES)} "
                                      "in Llama-family models); merge the adapter instead")
    ranks = [config.rank_and_alpha(m)[0] for m in modules] or [config.r]
    if max(ranks) > VLLM_MAX_RANK:
        return Verdict("vLLM", False, f"rank {max(ranks)} is above vLLM's largest --max-lora-rank ({VLLM_MAX_RANK}); merge instead")
    notes = []
    if max(ranks) > VLLM_DEFAULT_MAX_RANK:
        notes.append(f"rank {max(ranks)} > vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}: start vLLM with "
                     f"--max-lora-rank {max(ranks)} (or more)")
    if any(m in ("lm_head", "embed_tokens") for m in leaves):
        notes.append("LoRA on lm_head / embed_tokens loads only in vLLM versions whose model declares them; check yours")
    return Verdict("vLLM", True, "; ".join(notes) or "vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER_DIR")


def _llama_cpp(folder: Path, config, base_gguf) -> Verdict:
    if config.peft_type != "LORA":
        return Verdict("llama.cpp / Ollama", False, LLAMA_CPP_REFUSALS.get(config.peft_type, "llama.cpp loads LoRA adapters only"))
    try:
        plan = plan_lora_gguf(folder, base_gguf)
    except ValueError as err:
        return Verdict("llama.cpp / Ollama", False, str(err))
    return Verdict("llama.cpp / Ollama", True, f"peftkit export {folder} --to gguf -o adapter.gguf "
                                               f"({len(plan.pairs)} weight pairs; then llama-cli --lora / Ollama ADAPTER)")


def _merged(folder: Path, config, base_gguf) -> Verdict:
    if config.peft_type not in MERGEABLE:
        return Verdict("merged GGUF", False, f"{config.peft_type} adds layers or tokens (or is not merged to GGUF here), so it "
                                             "cannot be folded into the weights; serve it with peftkit")
    try:
        check_merge_base(resolve_base(config.base_model_name_or_path, base_gguf))
    except (ValueError, FileNotFoundError) as err:
        return Verdict("merged GGUF", False, str(err))
    return Verdict("merged GGUF", True, f"peftkit merge --adapter {folder} --to gguf --out merged.gguf")


def portability(adapter: str | os.PathLike, base_gguf: str | os.PathLike | None = None) -> list[Verdict]:
    """One verdict per runtime (and one on the recorded base model name) for an adapter folder."""
    folder = Path(adapter)
    config = checkpoint.read_config(folder)
    tensors = checkpoint.load_tensors(folder / checkpoint.WEIGHTS_NAME)
    modules = sorted({re.sub(r"\.lora_[AB]\.weight$", "", k[len("base_model.model."):])
                      for k in tensors if re.search(r"\.lora_[AB]\.weight$", k)})
    if config.peft_type in HF_PEFT_TYPES:
        hf = Verdict("HF PEFT", True, "PeftModel.from_pretrained(base, ADAPTER_DIR)")
    else:
        hf = Verdict("HF PEFT", False, f"HF PEFT has no {config.peft_type} method: load it with peftkit "
                                       "(peftkit.PeftModel.from_pretrained), or merge it and ship the merged model")
    return [base_name_verdict(config.base_model_name_or_path), hf, _vllm(config, modules),
            _llama_cpp(folder, config, base_gguf), _merged(folder, config, base_gguf)]


def format_portability(folder: str | os.PathLike, verdicts: list[Verdict]) -> str:
    lines = [f"portability of {folder}:"]
    for v in verdicts:
        mark = "ok " if v.loads else "NO "
        lines.append(f"  {v.runtime:<20} {mark} {v.why}")
    return "\n".join(lines)


def write_portable_peft(adapter: str | os.PathLike, out: str | os.PathLike, base_name: str | None = None) -> str:
    """Copy an adapter folder to ``out`` (a new folder, written whole or not at all) with a portable base name:
    ``base_name``, else the hub id of an embedded model; the name recorded is returned."""
    folder, out = Path(adapter), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; pick a new folder")
    config = checkpoint.read_config(folder)
    tensors = checkpoint.load_tensors(folder / checkpoint.WEIGHTS_NAME)
    name = base_name or portable_name(config.base_model_name_or_path or "")
    verdict = base_name_verdict(name)
    if not verdict.loads:
        raise ValueError(f"the base name would not be portable: {verdict.why}")
    config.base_model_name_or_path = name
    checkpoint.check_weights(tensors, folder)
    checkpoint.save_adapters(out, {"default": (config, tensors)})  # the whole folder or nothing (peftkit.atomic)
    return name
