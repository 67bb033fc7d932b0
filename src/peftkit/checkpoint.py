"""Adapter files in Hugging Face PEFT's format, written atomically and read with validation.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys such as
``base_model.model.<module path>.lora_A.weight``; adapter names are not part of the keys. Only safetensors is
ever read: a pickled ``adapter_model.bin`` is refused rather than unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .tuners.base import PeftConfig, config_from_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (tensors are cloned contiguous so views and shared storage are fine)."""
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, tmp, metadata={"format": "pt", **(metadata or {})}))


def save_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a missing or damaged file into an error that names it."""
    path = Path(path)
    if not path.exists():
        if path.with_name("adapter_model.bin").exists():
            raise ValueError(
                f"{path.parent} holds adapter_model.bin (a pickle) and no {path.name}: peftkit reads safetensors only, "
                "because unpickling can run arbitrary code. Re-save the adapter with safe_serialization=True."
            )
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {err}") from None


def adapter_dir(directory: str | os.PathLike, adapter_name: str) -> Path:
    """HF PEFT's layout: the "default" adapter at the top, every other one in a subfolder named after it."""
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


def read_config(directory: str | os.PathLike) -> PeftConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is this an adapter folder?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config_from_dict(data, source=str(path))


def write_adapter(directory: str | os.PathLike, config: PeftConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Weights first, then the config: a folder with a config always has matching weights."""
    directory = Path(directory)
    save_tensors(directory / WEIGHTS_NAME, tensors)
    data = config.to_dict()
    data["inference_mode"] = True  # as HF PEFT writes it
    save_json(directory / CONFIG_NAME, data)


def copy_checked(
    targets: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    source: str | os.PathLike,
    optional: dict[str, torch.Tensor] | None = None,
) -> None:
    """Copy file tensors into live ones after checking the key sets and every shape; name the file and key if not.

    Every key of ``targets`` must be in the file; keys of ``optional`` may be.
    """
    missing = sorted(set(targets) - set(tensors))
    targets = {**(optional or {}), **targets}
    unexpected = sorted(set(tensors) - set(targets))
    if unexpected:
        raise ValueError(
            f"{source}: {len(unexpected)} key(s) do not fit this model, e.g. {unexpected[:3]}. "
            f"The model expects keys like {sorted(targets)[:3]}. Was the adapter trained on another model?"
        )
    if missing:
        raise ValueError(f"{source}: {len(missing)} key(s) missing, e.g. {missing[:3]}")
    for key, value in tensors.items():
        if value.shape != targets[key].shape:
            raise ValueError(
                f"{source}: key {key} has shape {tuple(value.shape)} but the model needs {tuple(targets[key].shape)} "
                "(different rank in adapter_config.json, or another base model?)"
            )
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value.to(targets[key].dtype))
