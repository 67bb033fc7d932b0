"""What ``peftkit inspect`` prints: what an adapter folder holds, or which modules a model offers to target."""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import checkpoint
from .families import is_encoder
from .models import load_model, resolve_model_path
from .tuners.base import FILE_PREFIX, describe_targets


def describe_adapter(folder: str | os.PathLike) -> str:
    """Method, base model, task, config options, targeted modules, parameter count, file size and integrity of an
    adapter: whether its recorded checksum holds, and every tensor a load would refuse (not floating point, NaN/Inf)."""
    folder = Path(folder)
    config = checkpoint.read_config(folder)
    path = folder / checkpoint.WEIGHTS_NAME
    tensors = checkpoint.load_tensors(path, verify=False)  # inspect reports a bad checksum instead of stopping
    size = path.stat().st_size
    checksum = {
        "ok": "sha256 ok",
        "mismatch": "MISMATCH: the tensor data changed after saving (damaged); loading it is refused",
        "absent": "none recorded (not saved by peftkit)",
    }[checkpoint.checksum_status(path.read_bytes(), path)]
    problems = checkpoint.weight_problems(tensors)
    params = sum(t.numel() for t in tensors.values())
    modules = sorted({re.sub(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|ia3_l|weight|bias)(\..*)?$", "", k[len(FILE_PREFIX):])
                      for k in tensors if k.startswith(FILE_PREFIX)})
    kinds: dict[str, int] = {}
    for m in modules:
        key = re.sub(r"\.\d+\.", ".*.", m)
        kinds[key] = kinds.get(key, 0) + 1
    options = {k: v for k, v in config.to_dict().items()
               if k not in ("peft_type", "base_model_name_or_path", "task_type", "target_modules", "inference_mode") and v not in (None, [], {}, False)}
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    lines = [
        f"adapter      {folder}",
        f"method       {config.peft_type}",
        f"base model   {config.base_model_name_or_path}",
        f"task type    {config.task_type}",
        f"targets      {config.target_modules}",
        f"options      {', '.join(f'{k}={v}' for k, v in options.items()) or '-'}",
        f"parameters   {params:,} in {len(tensors)} tensors ({', '.join(dtypes)})",
        f"file size    {size / 1024:.1f} KiB ({checkpoint.WEIGHTS_NAME})",
        f"checksum     {checksum}",
        f"modules      {len(modules)}:",
    ]
    lines += [f"  {k} x{n}" for k, n in kinds.items()]
    if problems:
        lines.append(f"UNUSABLE     {len(problems)} tensor(s) a load refuses (re-save or retrain the adapter):")
        lines += [f"  {key} {what}" for key, what in problems]
    return "\n".join(lines)


def describe_model(name: str, task: str | None = None) -> str:
    """A model's class, size, and the module names (with types and counts) adapters can target."""
    from transformers import AutoConfig  # (imported when needed: it takes seconds)

    config = AutoConfig.from_pretrained(resolve_model_path(name))
    if task is None:
        task = "seq-cls" if is_encoder(config.model_type) else "causal-lm"
    model, _ = load_model(name, task=task)
    total = sum(p.numel() for p in model.parameters())
    return "\n".join([
        f"model        {name} ({type(model).__name__}, {config.model_type})",
        f"parameters   {total:,}",
        "targetable modules (name for --target-modules, type, count):",
        describe_targets(model, limit=200),
        "or --target-modules all-linear (every linear layer except the output head)",
    ])
