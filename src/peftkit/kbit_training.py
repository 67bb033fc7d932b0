"""Training on a quantized (or any frozen) base: preparing the model and building the optimizer."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .base_layers import is_quantized, keep_canonical_layout
from .quant import require_bitsandbytes


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
    quantized = [m for m in model.modules() if is_quantized(m)]
    packed = {id(m.weight) for m in quantized}  # stored as integers: never cast
    for param in model.parameters():
        param.requires_grad_(False)
        if param.dtype in (torch.float16, torch.bfloat16) and id(param) not in packed:
            param.data = param.data.float()
    for module in quantized:
        keep_canonical_layout(module)
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
        # transformers' own hook (what HF PEFT uses): the embedding output requires grad
        model.enable_input_require_grads()
    return model


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
    CUDA unified memory that pages to CPU RAM under GPU memory pressure; CUDA only). The one optimizer path of
    peftkit: the trainer (``--optim``) builds its optimizer here. Choices the machine cannot run raise
    ``ValueError`` with the alternative."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer got no parameters that require grad (is the adapter in inference mode?)")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer (--optim) must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    bnb = require_bitsandbytes()
    device = params[0].device
    if name.startswith("paged_"):
        if device.type != "cuda":
            raise ValueError(
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
        raise ValueError(
            f"bitsandbytes {bnb.__version__} cannot run 8-bit AdamW on {device.type} ({type(err).__name__}: {err}); "
            "use 'adamw' instead"
        ) from err

