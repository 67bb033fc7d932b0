"""Adapter folders for the serving benchmark, and the answers each adapter gives alone (the reference).

Folders are real HF PEFT folders written by :func:`peftkit.checkpoint.save_adapters`. LoRA adapters come in four
shapes (ranks 4-16, attention or MLP targets or every linear layer); each adapter draws its own random A and B
(B non-zero, scaled down so the generated text stays readable). The mixed set has one adapter of each method
the server may have to batch together: LoRA, (IA)^3, Houlsby, Pfeiffer, prompt tuning and prefix tuning.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import peftkit as pk
from peftkit import checkpoint

# (r, lora_alpha, target_modules): adapter i takes shape i % 4, so every set of 8 or more holds all four
LORA_SHAPES = [
    (8, 16, ["q_proj", "v_proj"]),
    (16, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (4, 8, ["up_proj", "down_proj"]),
    (8, 8, "all-linear"),
]
B_SCALE = 0.3  # B relative to A's spread: non-zero, small enough that greedy answers stay sentences
MIXED_METHODS = {  # name -> config; each adapter's weights are perturbed away from its (often identity) init
    "m-lora": lambda: pk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "m-ia3": lambda: pk.IA3Config(),
    "m-houlsby": lambda: pk.BottleneckConfig(variant="houlsby", reduction_factor=16),
    "m-pfeiffer": lambda: pk.BottleneckConfig(variant="pfeiffer", reduction_factor=16),
    "m-prompt": lambda: pk.PromptTuningConfig(num_virtual_tokens=8),
    "m-prefix": lambda: pk.PrefixTuningConfig(num_virtual_tokens=8),
}
MIXED_NOISE = {"ia3": 0.05, "adapter": 0.02, "prompt": 0.0, "prefix": 0.0, "lora": 0.0}  # see _perturb


def lora_names(count: int) -> list[str]:
    return [f"lora-{i:03d}" for i in range(count)]


def write_lora_adapters(model: torch.nn.Module, folder: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` LoRA adapter folders in ``folder`` (``lora-000`` ...), each with its own random weights."""
    templates = []
    for r, alpha, targets in LORA_SHAPES:  # config and tensor shapes of each shape, from the library itself
        pm = pk.get_peft_model(model, pk.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
        tensors = pm.adapter_tensors("default")
        spread = {k: float(v.float().std()) * (B_SCALE if ".lora_B." in k else 1.0) for k, v in tensors.items()}
        templates.append((pm.peft_config["default"], {k: v.shape for k, v in tensors.items()}, spread))
        pm.unload()
    g = torch.Generator().manual_seed(seed)
    names = lora_names(count)
    for i, name in enumerate(names):
        config, shapes, spread = templates[i % len(templates)]
        tensors = {k: torch.randn(shape, generator=g) * spread[k] for k, shape in shapes.items()}
        checkpoint.save_adapters(folder / name, {"default": (config, tensors)})
    return names


def link_subset(source: Path, names: list[str], folder: Path) -> None:
    """``folder`` holding exactly ``names`` from ``source``, as hard links (no copy; the server resolves symlinks
    and would refuse ones pointing out of its --adapters-dir)."""
    for name in names:
        (folder / name).mkdir(parents=True)
        for f in (source / name).iterdir():
            os.link(f, folder / name / f.name)


def write_mixed_adapters(model: torch.nn.Module, folder: Path, seed: int = 1) -> list[str]:
    """One adapter folder per method in :data:`MIXED_METHODS`, each changing the model's output; the same folders for
    the same ``seed`` in every run (each method's own initialisation draws from torch's global generator, whose seed
    differs per process: seeded here, inside a fork of it, so that runs are comparable and nothing else moves)."""
    names = []
    for i, (name, make) in enumerate(MIXED_METHODS.items()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            pm = pk.get_peft_model(model, make())
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if not p.requires_grad:
                    continue
                if ".lora_B." in pname:
                    p.mul_(B_SCALE)
                elif "ia3" in pname:  # starts at 1: identity
                    p.add_(torch.randn(p.shape, generator=g) * MIXED_NOISE["ia3"])
                elif "adapter_up" in pname:  # starts at 0: identity
                    p.add_(torch.randn(p.shape, generator=g) * MIXED_NOISE["adapter"])
        pm.save_pretrained(folder / name)
        pm.unload()
        names.append(name)
    return names


def chat_ids(tok, prompt: str) -> list[int]:
    """The prompt as the server's chat endpoint tokenizes it (the model's chat template, generation prompt added)."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def eos_ids(model, tok) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return sorted(set(eos) | ({tok.eos_token_id} if tok.eos_token_id is not None else set()))


def solo_references(model, tok, folders: dict[str, Path], pairs: set[tuple[str, str]], max_tokens: int,
                    base_name: str, precision) -> dict[tuple[str, str], str]:
    """What each (adapter, prompt) pair generates alone: batch 1, greedy, ``PeftModel.generate`` under
    ``precision`` (a :class:`peftkit.device.Precision`, as the server's), each adapter loaded by itself. Only the
    pairs the load uses are computed, adapter by adapter (one load each)."""
    by_adapter: dict[str, list[str]] = {}
    for name, prompt in sorted(pairs):
        by_adapter.setdefault(name, []).append(prompt)
    eos = eos_ids(model, tok)
    out = {}
    for done, (name, prompts) in enumerate(by_adapter.items()):
        pm = None if name == base_name else pk.PeftModel.from_pretrained(model, folders[name], name).eval()
        with torch.inference_mode(), precision.autocast(torch.device("cpu")):
            for prompt in prompts:
                ids = torch.tensor([chat_ids(tok, prompt)])
                gen = (pm or model).generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                             do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
                out[(name, prompt)] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        if pm is not None:
            pm.unload()
        if (done + 1) % 50 == 0:
            print(f"  solo references: {done + 1}/{len(by_adapter)} adapters", file=sys.stderr, flush=True)
    return out
