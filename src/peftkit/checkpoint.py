"""Adapter files in Hugging Face PEFT's format, written crash-safely and read with validation.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys such as
``base_model.model.<module path>.lora_A.weight``; adapter names are not part of the keys. Only safetensors is
ever read: a pickled ``adapter_model.bin`` is refused rather than unpickled.

Writing: a save builds the whole folder (every adapter, subfolders included) in a staging sibling and swaps it in
as one unit (:func:`peftkit.atomic.replace_folder`), so a reader sees the old adapter or the new one, never a config
from one and weights from the other.

Integrity: every safetensors file peftkit writes records the SHA-256 of its tensor data (the bytes after the
header) in the header's metadata under ``peftkit.sha256``, which HF PEFT and transformers ignore; reading verifies
it when present, so bytes damaged after saving (header intact) are refused with the file named. It lives in the
file rather than the config so that editing ``adapter_config.json`` by hand stays possible and a weights file
keeps its check when copied alone.

Values: :func:`check_weights` refuses tensors that are not floating point or hold NaN/Inf, naming the key; every
load of adapter weights goes through it (:func:`copy_checked`), and ``peftkit inspect`` reports the same problems
(:func:`weight_problems`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import get_total_norm
from safetensors.torch import save as save_bytes

from . import safetensors_views
from .atomic import atomic_write, recover, replace_folder, write_file  # noqa: F401 (atomic_write: for run folders)
from .tuners.base import PeftConfig, config_from_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SHA256_KEY = "peftkit.sha256"  # safetensors metadata: SHA-256 (hex) of the tensor data after the header

Adapters = dict[str, tuple[PeftConfig, dict[str, torch.Tensor]]]  # adapter name -> (config, file tensors)


# ----------------------------------------------------------------------------------------------------------------
# safetensors bytes with a checksum


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes, with the SHA-256 of its tensor data in the metadata.

    Tensors are cloned contiguous on the CPU, so views and shared storage are fine. The data section does not depend
    on the metadata, so it is serialized once to hash it and once more with the hash."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}
    digest = hashlib.sha256(_data(save_bytes(clean, metadata=meta))).hexdigest()
    raw = save_bytes(clean, metadata={**meta, SHA256_KEY: digest})
    assert hashlib.sha256(_data(raw)).hexdigest() == digest
    return raw


def _data(raw: bytes) -> memoryview:
    """The tensor data of safetensors bytes (what the checksum covers)."""
    return memoryview(raw)[safetensors_views.split(raw, "tensors")[1] :]


def checksum_status(raw: bytes, source: str | os.PathLike) -> str:
    """"ok", "mismatch" or "absent" (a file not written by peftkit): the recorded SHA-256 against the data."""
    header, start = safetensors_views.split(raw, source)
    return _checksum(header.get(safetensors_views.METADATA) or {}, memoryview(raw)[start:])


def _checksum(metadata: dict[str, Any], data: memoryview) -> str:
    expected = metadata.get(SHA256_KEY) if isinstance(metadata, dict) else None
    if expected is None:
        return "absent"
    return "ok" if hashlib.sha256(data).hexdigest() == expected else "mismatch"


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file atomically (with its checksum)."""
    raw = tensor_bytes(tensors, metadata)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(raw))


def load_tensors(path: str | os.PathLike, verify: bool = True, views: bool = False) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a missing, damaged or (``verify``) checksum-failing file into an error that
    names it. Values are not judged here: see :func:`check_weights`.

    ``views``: the tensors are views into one buffer holding the whole file (no copy each), for a caller that only
    copies them elsewhere (an adapter load: :func:`copy_checked`); otherwise each owns its memory, as storage-level
    APIs need (``torch.set_rng_state`` crashed on such a view)."""
    path = Path(path)
    if not path.exists():
        if path.with_name("adapter_model.bin").exists():
            raise ValueError(
                f"{path.parent} holds adapter_model.bin (a pickle) and no {path.name}: peftkit reads safetensors only, "
                "because unpickling can run arbitrary code. Re-save the adapter with safe_serialization=True."
            )
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:  # (views into one buffer, in key order: see safetensors_views for why not safetensors' own load)
        tensors, metadata, data = safetensors_views.load(path)
    except OSError as err:
        raise ValueError(f"{path} cannot be read: {err.strerror or err}") from None
    if verify and _checksum(metadata, data) == "mismatch":
        raise ValueError(
            f"{path}: its tensor data does not match the SHA-256 recorded when it was saved, so its bytes changed "
            "afterwards (a damaged disk, an interrupted copy or an edit). Copy or save the adapter again."
        )
    return tensors if views else {key: value.clone() for key, value in tensors.items()}


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a safetensors file's header alone (no tensor data read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = head + f.read(size) if 0 < size < 100_000_000 else head
    except FileNotFoundError:
        raise FileNotFoundError(f"no adapter weights at {path}") from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read: {err.strerror}") from None
    header, _ = safetensors_views.split(raw, path)
    try:
        return {k: tuple(int(d) for d in v["shape"]) for k, v in sorted(header.items()) if k != safetensors_views.METADATA}
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{path} is not a readable safetensors file (its header is damaged)") from None


def save_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----------------------------------------------------------------------------------------------------------------
# Adapter folders


def adapter_dir(directory: str | os.PathLike, adapter_name: str) -> Path:
    """HF PEFT's layout: the "default" adapter at the top, every other one in a subfolder named after it."""
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


def read_adapter_folder(
    directory: str | os.PathLike, is_trainable: bool = False
) -> tuple[PeftConfig, dict[str, torch.Tensor], str]:
    """An adapter folder's config (set up for inference unless ``is_trainable``), tensors and weights file path.
    The tensors view one buffer (``load_tensors(views=True)``): every adapter load copies them into its parameters."""
    config = read_config(directory)
    config.inference_mode = not is_trainable
    source = os.path.join(directory, WEIGHTS_NAME)
    return config, load_tensors(source, views=True), source


def read_config(directory: str | os.PathLike) -> PeftConfig:
    path = Path(directory) / CONFIG_NAME
    for folder in (Path(directory), Path(directory).parent):  # a subfolder adapter is saved with its parent
        if not path.exists():
            recover(folder)  # a save killed between its two renames left the folder under a staging name
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is this an adapter folder?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config_from_dict(data, source=str(path))


def write_adapters(root: str | os.PathLike, adapters: Adapters) -> None:
    """Write adapter files under ``root`` (a private staging folder: plain fsynced writes, no renames)."""
    for name, (config, tensors) in adapters.items():
        folder = adapter_dir(root, name)
        write_file(folder / WEIGHTS_NAME, tensor_bytes(tensors))
        data = config.to_dict()
        data["inference_mode"] = True  # as HF PEFT writes it
        write_file(folder / CONFIG_NAME, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def save_adapters(directory: str | os.PathLike, adapters: Adapters) -> None:
    """Write adapters into ``directory`` ("default" at the top, others in subfolders) as one atomic unit."""
    replace_folder(directory, lambda staging: write_adapters(staging, adapters))


# ----------------------------------------------------------------------------------------------------------------
# Validation


def weight_problems(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(key, what is wrong) for every tensor that cannot be adapter weights: not floating point, or not finite."""
    floats = [v.float() if v.element_size() < 2 else v for v in tensors.values() if v.is_floating_point()]
    if len(floats) == len(tensors) and bool(torch.isfinite(get_total_norm(floats)).all()):
        # one pass over every tensor (an adapter has hundreds; a check and a host sync each cost a server ~10 ms
        # per load): the norm of finite values is finite unless they are near float's limit, checked one by one below
        return []
    problems = []
    for key, value in tensors.items():
        if not value.is_floating_point():
            problems.append((key, f"is {str(value.dtype).replace('torch.', '')}, not floating point"))
            continue
        finite = torch.isfinite(value.float() if value.element_size() < 2 else value)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            problems.append((key, f"holds {bad} NaN/Inf value(s) of {value.numel()}"))
    return problems


def check_weights(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse tensors that are not usable weights, naming the first bad key and what to do."""
    problems = weight_problems(tensors)
    if not problems:
        return
    key, what = problems[0]
    more = f" (and {len(problems) - 1} more tensor(s))" if len(problems) > 1 else ""
    if "floating point" in what:
        advice = ("adapter weights are float32, float16 or bfloat16; re-save the adapter from its model, or convert "
                  "the file's tensors to a float type")
    else:
        advice = ("the adapter is numerically broken (a diverged training run, or damaged bytes); use an earlier "
                  "checkpoint, or retrain with a lower learning rate")
    raise ValueError(f"{source}: tensor {key} {what}{more}: {advice}")


def copy_checked(
    targets: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    source: str | os.PathLike,
    optional: dict[str, torch.Tensor] | None = None,
) -> None:
    """Copy file tensors into live ones after checking the key sets, every shape and every value (floating point,
    finite, and still finite in the live tensor's dtype); name the file and key if not. Nothing is copied unless
    everything passes.

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
    check_weights(tensors, source)
    converted = {key: value.to(targets[key].dtype) for key, value in tensors.items()}
    for key, value in converted.items():
        if value.dtype != tensors[key].dtype and not bool(torch.isfinite(value).all()):  # (same dtype: checked above)
            raise ValueError(
                f"{source}: tensor {key} overflows the model's {str(value.dtype).replace('torch.', '')} (values beyond "
                "its range); load the model in float32"
            )
    with torch.no_grad():
        for key, value in converted.items():
            targets[key].copy_(value)
