"""Loading a model straight into 4-bit or 8-bit form, one weight at a time, so that peak memory is the quantized
model plus one full-precision tensor (:func:`load_quantized`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .quant import check_quantization, quantize_linear, require_bitsandbytes
from .tuners.base import get_submodule_parent, output_head_names


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    return no_init_weights()


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if not path.is_dir():  # a hub id: its snapshot in the local Hugging Face cache (never downloaded here)
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(path), local_files_only=True))
        except Exception as err:
            raise FileNotFoundError(f"{path} is neither a local folder nor in the Hugging Face cache ({err})") from None
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(
        f"{path} has no model.safetensors (or sharded index): quantized loading streams safetensors weights. "
        "Convert the checkpoint once with transformers (from_pretrained, then save_pretrained)."
    )


def iter_safetensors(file: Path) -> Iterator[tuple[str, Callable[[torch.Tensor | None], torch.Tensor]]]:
    """Yield ``(key, read)`` for each tensor of a safetensors file, in file order; ``read(out)`` reads the tensor
    into ``out`` when it has the same dtype and shape (no second copy), else into fresh memory, and returns it.

    Tensors are read with plain file reads rather than memory-mapped: pages of a mapped file count in the
    process's resident set until it is unmapped, so mapping would put the whole full-precision file into peak
    memory even though every linear weight is quantized and dropped right after it is read.
    """
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        start = 8 + header_len
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{file}: tensor {key} has dtype {info['dtype']}, which peftkit cannot read")
            begin, end = info["data_offsets"]
            shape = torch.Size(info["shape"])

            def read(out: torch.Tensor | None, key=key, dtype=dtype, shape=shape, begin=begin, end=end) -> torch.Tensor:
                fits = out is not None and out.dtype == dtype and out.shape == shape and out.is_contiguous()
                tensor = out if fits else torch.empty(shape, dtype=dtype)
                f.seek(start + begin)
                if end > begin and f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != end - begin:
                    raise ValueError(f"{file} is truncated: tensor {key} ends past the end of the file")
                return tensor

            yield key, read


def load_quantized(
    model_cls: Any,
    path: str | Path,
    config: Any,
    quantization: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build ``model_cls`` (a transformers auto class) from ``config`` and load the safetensors weights in ``path``,
    quantizing every ``nn.Linear`` except output heads as its weight is read.

    The model is first built without initialising its weights: the full-precision tensors are allocated but never
    written, so the operating system does not back them with memory, and each is replaced by its quantized layer
    as soon as its weight arrives. Peak memory is therefore the quantized model plus one full-precision tensor,
    not the full-precision model. Embeddings, norms and heads stay in ``dtype``; weights missing from the
    checkpoint (a new classification head) get the model's own initialisation.
    """
    check_quantization(quantization)
    require_bitsandbytes()
    with _no_init_weights():
        model = model_cls.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips tying (lm_head shares the embedding in SmolLM2)
    heads = output_head_names(model)
    to_quantize = {n for n, m in model.named_modules() if type(m) is nn.Linear and n not in heads}
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers()))
    persistent = set(model.state_dict())  # what a checkpoint is expected to hold (no rotary caches etc.)
    tied = _tied_names(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    loaded: set[str] = set()
    for file in _checkpoint_files(path):
        for key, read in iter_safetensors(file):
            name = _model_key(key, params, prefix)
            if name is None:
                continue  # not part of this architecture (e.g. a pretraining head), as transformers ignores it
            module_name, _, attr = name.rpartition(".")
            if module_name in to_quantize and attr == "weight":
                linear = model.get_submodule(module_name)
                linear.weight = nn.Parameter(read(None).to(dtype), requires_grad=False)
                parent, child = get_submodule_parent(model, module_name)
                setattr(parent, child, quantize_linear(linear, quantization, double_quant, compute_dtype))
            else:
                target = params[name]
                tensor = read(target.data)  # straight into the parameter when dtype and shape agree
                if tensor is not target.data:
                    with torch.no_grad():
                        target.copy_(tensor)
            loaded.add(name)
    _check_loaded(model, path, [n for n in persistent if n not in loaded], tied, loaded, to_quantize)
    setattr(model, "is_loaded_in_8bit" if quantization == "int8" else "is_loaded_in_4bit", True)
    return model.eval()


def _model_key(key: str, params: dict[str, Any], prefix: str) -> str | None:
    """The model's name for a checkpoint key, allowing for a missing or extra base-model prefix ("bert.")."""
    if key in params:
        return key
    if prefix and f"{prefix}.{key}" in params:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in params:
        return key[len(prefix) + 1 :]
    return None


def _check_loaded(
    model: nn.Module, path: Any, missing: list[str], tied: dict[str, list[str]], loaded: set[str], to_quantize: set[str]
) -> None:
    missing = [n for n in missing if not any(t in loaded for t in tied.get(n, ()))]
    unquantized = sorted(n for n in to_quantize if f"{n}.weight" in missing)
    if unquantized:
        raise ValueError(
            f"{path}: the checkpoint has no weights for {len(unquantized)} linear layers, e.g. {unquantized[:3]}; "
            "is this the model the config describes?"
        )
    for module_name in sorted({n.rpartition(".")[0] for n in missing}):
        model._init_weights(model.get_submodule(module_name))  # e.g. a new classification head


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """For each parameter name, the other names of the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: [m for m in names if m != n] for names in by_id.values() for n in names}

