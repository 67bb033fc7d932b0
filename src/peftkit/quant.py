"""Quantized base models (QLoRA, Dettmers et al. 2023): 4-bit and 8-bit frozen weights through bitsandbytes.

QLoRA stores each frozen weight matrix in 4-bit NormalFloat (NF4), in blocks of 64 values:

    W[i] ~= absmax[b] * code[q[i]]        q[i]: 4-bit index into the 16 NF4 values, b = i // 64

NF4's 16 values are quantiles of N(0, 1) scaled to [-1, 1] (:data:`NF4_CODE`), so normally distributed weights use
every level equally often. Double quantization also quantizes the block constants, 8-bit in blocks of 256:

    absmax[b] ~= code8[c[b]] * absmax2[b // 256] + offset

so a weight costs 4 + 8/64 + 32/(64*256) ~= 4.127 bits instead of 4 + 32/64 = 4.5 bits. Adapters train in full
precision on top: h = dequant(W) x + (alpha / r) B A x, and only A and B receive gradients. ``"int8"`` is LLM.int8()
(``Linear8bitLt``: one absmax per row, 8 bits per weight).

This module turns ``nn.Linear`` layers into bitsandbytes layers and back (:func:`quantize_linear`,
:func:`quantize_model`, :func:`dequantize_model`). What adapters need of a quantized layer (its dequantized
weight, merging into it) is its base-layer kind's business (:mod:`peftkit.base_layers.bnb`); loading a model
straight into quantized form is :mod:`peftkit.quant_loading`, preparing it for training :mod:`peftkit.kbit_training`.
bitsandbytes is imported only when needed.
"""

from __future__ import annotations

import torch
from torch import nn

from .base_layers import is_quantized, keep_canonical_layout, kind_of
from .tuners.base import get_submodule_parent, output_head_names

QUANTIZATIONS = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # QLoRA's block of weights sharing one absmax
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold, transformers' default

# The 16 NF4 values as printed in the QLoRA paper, Appendix E.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

def require_bitsandbytes():
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
    bnb = require_bitsandbytes()
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
        keep_canonical_layout(layer)
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


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer computes with, as a float32 tensor in its stored layout (dequantized if need be)."""
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is no base layer peftkit knows (see peftkit.base_layers.KINDS)")
    return kind.weight(module)


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


