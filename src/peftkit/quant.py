"""Quantized base models (QLoRA, Dettmers et al. 2023): 4-bit and 8-bit frozen weights through bitsandbytes.

QLoRA stores each frozen weight matrix in 4-bit NormalFloat (NF4), in blocks of 64 values:

    W[i] ~= absmax[b] * code[q[i]]        q[i]: 4-bit index into the 16 NF4 values, b = i // 64

NF4's 16 values are quantiles of N(0, 1) scaled to [-1, 1] (:data:`NF4_CODE`), so normally distributed weights use
every level equally often. Double quantization also quantizes the block constants, 8-bit in blocks of 256:

    absmax[b] ~= code8[c[b]] * absmax2[b // 256] + offset

so a weight costs 4 + 8/64 + 32/(64*256) ~= 4.127 bits instead of 4 + 32/64 = 4.5 bits. Adapters train in full
precision on top: h = dequant(W) x + (alpha / r) B A x, and only A and B receive gradients. ``"int8"`` is LLM.int8()
(``Linear8bitLt``: one absmax per row, 8 bits per weight).

This module loads models straight into that form, one weight at a time (:func:`load_quantized`), prepares them for
training (:func:`prepare_model_for_kbit_training`), merges adapters into quantized layers and exports merged
full-precision models (:func:`merge_weight`, :func:`merge_report`, :func:`dequantize_model`), reports memory
(:func:`memory_footprint`) and builds optimizers (:func:`make_optimizer`). bitsandbytes is imported only when needed.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .tuners.base import AdapterLayer, get_submodule_parent, output_head_names

QUANTIZATIONS = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # QLoRA's block of weights sharing one absmax
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold, transformers' default

# The 16 NF4 values as printed in the QLoRA paper, Appendix E.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt")
_MERGE_STACK = "peftkit_merge_stack"  # per quantized layer: its weights before each merge, newest last
_MERGE_ERROR = "peftkit_merge_error"  # per quantized layer: (max, mean) abs weight error of its last merge


def _bnb():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "4-bit/8-bit base models need bitsandbytes: pip install 'peftkit[quant]' (bitsandbytes>=0.45)"
        ) from err
    return bitsandbytes


def check_quantization(quantization: str) -> str:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {quantization!r}")
    return quantization


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes' ``Linear4bit`` (and its NF4/FP4 subclasses) and ``Linear8bitLt``."""
    return any(cls.__name__ in _QUANTIZED_CLASSES for cls in type(module).__mro__)


def has_quantized_layers(model: nn.Module) -> bool:
    return any(is_quantized(m) for m in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# Quantizing and dequantizing one layer


def quantize_linear(
    linear: nn.Linear,
    quantization: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized (``Linear4bit`` or ``Linear8bitLt``).

    The bias is shared, not copied. ``linear.weight`` is only read: drop ``linear`` to free it.
    """
    bnb = _bnb()
    check_quantization(quantization)
    weight, bias = linear.weight.detach(), linear.bias
    out_features, in_features = weight.shape
    if quantization == "int8":
        layer = bnb.nn.Linear8bitLt(
            in_features, out_features, bias=False, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(weight.device)
    else:
        layer = bnb.nn.Linear4bit(
            in_features, out_features, bias=False, compute_dtype=compute_dtype, compress_statistics=double_quant,
            quant_type=quantization, device="meta",
        )
        params = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=double_quant,
            quant_type=quantization, module=layer,
        )
        layer.weight = params.to(weight.device)  # quantizes
        _keep_canonical_layout(layer)
    layer.bias = bias
    return layer


def quantize_model(
    model: nn.Module,
    quantization: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Quantize an in-memory model in place, one ``nn.Linear`` at a time (output heads stay as they are), and
    return it. For models on disk :func:`load_quantized` avoids ever holding the full-precision weights."""
    check_quantization(quantization)
    heads = output_head_names(model)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name not in heads:
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, quantize_linear(module, quantization, double_quant, compute_dtype))
    setattr(model, "is_loaded_in_8bit" if quantization == "int8" else "is_loaded_in_4bit", True)
    return model


def _keep_canonical_layout(layer: nn.Module) -> None:
    """Stop bitsandbytes' CPU inference fast path from repacking this layer, and undo a repacking already done.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` at its first no-grad eval forward into a
    bf16 layout whose kernel has no backward: training afterwards silently gets no input gradients (LoRA layers
    below it stop learning). The repacking also rounds the block constants to bf16 and undoes double quantization
    (4.25 bits per weight). Keeping the standard layout makes eval and training compute the same fp32 dequantized
    matmul, and keeps merges, memory reports and saved weights in the documented format.
    """
    if not any(cls.__name__ == "Linear4bit" for cls in type(layer).__mro__):
        return
    layer.support_avx512bf16_for_cpu = False
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        layer.quant_state = weight.quant_state


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The weight a quantized layer computes with, as a float32 (out, in) tensor (the weight itself otherwise)."""
    if not is_quantized(module):
        return module.weight.detach().float()
    weight = module.weight
    if hasattr(weight, "quant_state"):  # 4-bit
        _keep_canonical_layout(module)
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).float()
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB  # row absmax
    return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize ``weight`` into ``module`` in its own format (a new parameter; the old one is left intact)."""
    bnb = _bnb()
    old = module.weight
    if hasattr(old, "quant_state"):
        new = bnb.nn.Params4bit(
            weight.to(old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
            module=module,
        )
        module.weight = new.to(old.device)
    else:
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(old.device)
        module.state.CB = module.state.SCB = None  # the next forward takes them from the new weight


def _snapshot(module: nn.Module) -> tuple:
    state = getattr(module, "state", None)  # Linear8bitLt keeps its row scales here after the first forward
    return (module.weight, getattr(state, "CB", None), getattr(state, "SCB", None))


def _restore(module: nn.Module, snapshot: tuple) -> None:
    weight, cb, scb = snapshot
    module.weight = weight
    if hasattr(weight, "quant_state"):
        module.quant_state = weight.quant_state
    else:
        module.state.CB, module.state.SCB = cb, scb


def merge_weight(module: nn.Module, sign: int, update: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Fold an adapter into a quantized layer, or take the newest fold out again.

    ``sign=+1``: W <- quantize(update(dequantize(W))), e.g. ``lambda w: w + delta`` for LoRA or
    ``lambda w: w * scale`` for (IA)^3, remembering the previous quantized weights (4 or 8 bits each).
    ``sign=-1``: restore the weights from before the newest merge, bit for bit (``update`` is not called), so
    unmerging does not add a second rounding error. Merges must be undone newest first, as
    :meth:`AdapterLayer.unmerge` does. The max and mean abs weight error of the merge are kept for
    :func:`merge_report`.
    """
    stack = module.__dict__.setdefault(_MERGE_STACK, [])
    if sign < 0:
        if not stack:
            raise RuntimeError(f"{type(module).__name__} has no merge to undo (it was not merged through peftkit)")
        _restore(module, stack.pop())
        return
    with torch.no_grad():
        target = update(dequantize_weight(module))
        stack.append(_snapshot(module))
        _set_weight(module, target)
        error = (dequantize_weight(module) - target).abs()
    setattr(module, _MERGE_ERROR, (error.max().item(), error.mean().item()))


def forget_merges(model: nn.Module) -> None:
    """Drop the pre-merge weights kept for exact unmerging (after merge_and_unload nothing will unmerge)."""
    for module in model.modules():
        module.__dict__.pop(_MERGE_STACK, None)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized layer (also those wrapped by adapter layers) by an ``nn.Linear`` holding its
    dequantized weight, in place, and clear transformers' quantization markers so ``save_pretrained`` writes a
    plain full-precision model. The result computes what the quantized model computed, in ``dtype``."""
    for name, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        weight = dequantize_weight(module).to(dtype)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=module.bias.requires_grad)
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, linear)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    return model


# ----------------------------------------------------------------------------------------------------------------
# Merge report


@dataclass
class MergeReport:
    """What merging into quantized layers changed: logits on a fixed probe (when the model takes token ids) and
    the weights of the requantized layers."""

    layers: int = 0
    logit_max_abs: float | None = None
    logit_mean_abs: float | None = None
    weight_max_abs: float = 0.0
    weight_mean_abs: float = 0.0
    probe_tokens: int = 0

    def __str__(self) -> str:
        parts = [f"requantized {self.layers} layers (dequantize, add, requantize)"]
        if self.logit_max_abs is not None:
            parts.append(
                f"logits on a fixed {self.probe_tokens}-token probe differ from the unmerged model by "
                f"max {self.logit_max_abs:.4g}, mean {self.logit_mean_abs:.4g} (abs)"
            )
        parts.append(f"weights: max abs error {self.weight_max_abs:.4g}, mean {self.weight_mean_abs:.4g}")
        return "; ".join(parts)


def _probe_input(model: nn.Module, tokens: int) -> torch.Tensor | None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        return None
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, tokens), generator=generator).to(device)


def _probe_logits(model: nn.Module, adapter_names: list[str], probe: torch.Tensor) -> torch.Tensor:
    """Logits with exactly ``adapter_names`` active (merged or not), in eval mode, without gradients."""
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    saved = [(layer, layer.active_adapters, layer.mixed) for layer in layers]
    training = model.training
    try:
        for layer in layers:
            layer.active_adapters = [n for n in adapter_names if n in layer.adapter_names]
            layer.mixed = None
        model.eval()
        with torch.no_grad():
            out = model(input_ids=probe)
    finally:
        for layer, active, mixed in saved:
            layer.active_adapters, layer.mixed = active, mixed
        if training:
            model.train()
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


@contextmanager
def merge_report(model: nn.Module, adapter_names: list[str], probe_tokens: int = 32) -> Iterator[MergeReport]:
    """Around a merge of ``adapter_names``: compare the model's logits before and after on a fixed token probe
    (seeded random ids) and warn with the max and mean abs difference, plus the weight error of each requantized
    layer. Models that do not take ``input_ids`` (no ``config.vocab_size``) get the weight error only."""
    report = MergeReport(probe_tokens=probe_tokens)
    quantized = [m for m in model.modules() if is_quantized(m)]
    depth = {id(m): len(m.__dict__.get(_MERGE_STACK, ())) for m in quantized}
    probe = _probe_input(model, probe_tokens)
    before = _probe_logits(model, adapter_names, probe) if probe is not None else None
    yield report
    merged = [m for m in quantized if len(m.__dict__.get(_MERGE_STACK, ())) > depth[id(m)]]
    if not merged:
        return
    report.layers = len(merged)
    errors = [getattr(m, _MERGE_ERROR) for m in merged]
    report.weight_max_abs = max(e[0] for e in errors)
    report.weight_mean_abs = sum(e[1] for e in errors) / len(errors)
    if before is not None:
        diff = (_probe_logits(model, adapter_names, probe) - before).abs()
        report.logit_max_abs, report.logit_mean_abs = diff.max().item(), diff.mean().item()
    warnings.warn(
        f"merged {adapter_names} into a quantized base: {report}. Unmerging restores the quantized weights exactly; "
        "for an exact merged model use merge_and_unload(dequantize=True), which merges in full precision.",
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------------------------
# Loading


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
    _bnb()
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


# ----------------------------------------------------------------------------------------------------------------
# Training


def prepare_model_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Make a (quantized) transformers model ready for adapter training, in place, and return it.

    Freezes every base parameter; casts non-quantized fp16/bf16 parameters (norms, embeddings, head) to fp32 for
    stable training; turns off the KV cache (``config.use_cache``), which training never reads; keeps quantized
    layers in bitsandbytes' standard layout (see :func:`_keep_canonical_layout`). With ``gradient_checkpointing``
    it enables transformers' activation checkpointing (``gradient_checkpointing_kwargs`` as transformers takes
    them, default ``{"use_reentrant": False}``) and makes the input embeddings' output require grad: the
    embedding is frozen, so with reentrant checkpointing no segment's input would require grad and the adapters
    inside would get no gradient at all.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ not in ("Params4bit", "Int8Params"):
            param.data = param.data.float()
    for module in model.modules():
        if is_quantized(module):
            _keep_canonical_layout(module)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else dict(gradient_checkpointing_kwargs)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):  # transformers 4
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise TypeError(
                f"{type(model).__name__} has no activation checkpointing (not a transformers model); "
                "call prepare_model_for_kbit_training(model, gradient_checkpointing=False)"
            )
        _enable_input_grads(model)
    return model


def _enable_input_grads(model: nn.Module) -> None:
    if getattr(model, "_peftkit_input_grads", None) is not None:
        return
    embeddings = model.get_input_embeddings()

    def make_output_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model._peftkit_input_grads = embeddings.register_forward_hook(make_output_require_grad)


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")


def make_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW with 32-bit state (``"adamw"``, torch), 8-bit state (``"adamw_8bit"``, bitsandbytes: moments stored
    blockwise-quantized, 4x smaller), or paged state (``"paged_adamw_32bit"`` / ``"paged_adamw_8bit"``: state in
    CUDA unified memory that pages to CPU RAM under GPU memory pressure; CUDA only)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer got no parameters that require grad (is the adapter in inference mode?)")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    bnb = _bnb()
    device = params[0].device
    if name.startswith("paged_"):
        if device.type != "cuda":
            raise RuntimeError(
                f"{name} keeps optimizer state in CUDA unified memory that pages out to CPU RAM when the GPU runs "
                f"short; it needs a CUDA device and parameters on it, but they are on {device.type}"
                f"{'' if torch.cuda.is_available() else ' and no CUDA device is available'}. On CPU the state "
                "already lives in RAM: use 'adamw' (32-bit state) or 'adamw_8bit' (8-bit state, 4x smaller)."
            )
        cls = bnb.optim.PagedAdamW32bit if name == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    _check_8bit_adam(bnb, device)
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _check_8bit_adam(bnb: Any, device: torch.device) -> None:
    """Run one 8-bit AdamW step on a scratch tensor: older bitsandbytes builds have no kernel for some devices."""
    probe = nn.Parameter(torch.zeros(4096, device=device))
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as err:
        raise RuntimeError(
            f"bitsandbytes {bnb.__version__} cannot run 8-bit AdamW on {device.type} ({type(err).__name__}: {err}); "
            "use 'adamw' instead"
        ) from err


# ----------------------------------------------------------------------------------------------------------------
# Memory


@dataclass
class MemoryFootprint:
    """Bytes held by a model's weights.

    ``base_bytes``: base-model weights by storage format: torch dtype names for ordinary tensors ("float32"),
    the quantization for quantized layers ("nf4", "fp4", "int8"), counting their block constants, double-quant
    constants and code tables. Tied tensors count once. ``adapter_bytes``: adapter parameters. ``quantized_params``
    and ``quantized_bytes``: the quantized layers' weight count and storage, so ``bits_per_param`` is what one
    quantized weight really costs (NF4 with double quantization about 4.13-4.15, without about 4.5).
    """

    base_bytes: dict[str, int]
    adapter_bytes: int
    quantized_params: int
    quantized_bytes: int

    @property
    def base_total(self) -> int:
        return sum(self.base_bytes.values())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else math.nan

    def __str__(self) -> str:
        mib = 2**20
        parts = ", ".join(f"{kind} {size / mib:.1f} MiB" for kind, size in sorted(self.base_bytes.items()))
        text = f"base weights {self.base_total / mib:.1f} MiB ({parts}); adapters {self.adapter_bytes / mib:.2f} MiB"
        if self.quantized_params:
            text += f"; quantized layers: {self.quantized_params:,} weights at {self.bits_per_param:.3f} bits each"
        return text


def _quantized_tensors(module: nn.Module) -> tuple[str, int, list[torch.Tensor]]:
    """(format, weight count, every tensor the layer stores for its weight)."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:  # 4-bit: packed codes, block absmax, code table; nested: offset, absmax2, its code table
        tensors = [weight.data, state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        return state.quant_type, math.prod(state.shape), tensors
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return "int8", weight.numel(), [weight.data, scb]


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """Bytes of base weights by storage format, adapter bytes, and bits per weight of the quantized layers.

    ``model``: a plain model or a :class:`peftkit.PeftModel` (whose ``base_model`` holds the base weights; adapter
    parameters are found through the adapter layers' contract, anything else of the PeftModel is adapter state).
    """
    is_peft = isinstance(getattr(model, "base_model", None), nn.Module) and hasattr(model, "peft_config")
    base_root = model.base_model if is_peft else model
    adapter_ids = {
        id(p)
        for layer in base_root.modules()
        if isinstance(layer, AdapterLayer)
        for name in layer.adapter_names
        for p in layer.adapter_parameters(name)
    }
    seen: set[tuple[int, int]] = set()

    def size(t: torch.Tensor) -> int:
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key in seen or t.device.type == "meta":
            return 0
        seen.add(key)
        return key[1]

    base: dict[str, int] = {}
    quantized_params = quantized_bytes = 0
    counted: set[int] = set()
    for module in base_root.modules():
        if is_quantized(module):
            kind, count, tensors = _quantized_tensors(module)
            nbytes = sum(size(t) for t in tensors)
            base[kind] = base.get(kind, 0) + nbytes
            quantized_params += count
            quantized_bytes += nbytes
            counted.add(id(module.weight))
    for p in base_root.parameters():
        if id(p) not in counted and id(p) not in adapter_ids:
            counted.add(id(p))
            kind = str(p.dtype).removeprefix("torch.")
            base[kind] = base.get(kind, 0) + size(p)
    adapter = sum(size(p) for p in model.parameters() if id(p) not in counted)
    return MemoryFootprint(base, adapter, quantized_params, quantized_bytes)
