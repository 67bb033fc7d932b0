"""Will it fit, and how fast: peak memory and training speed of a fine-tuning recipe, from the model's shapes alone.

Memory of one training step (bytes; ``T`` = batch x sequence tokens, ``e`` = bytes of one activation element):

- **base weights**: frozen parameters at their storage size. NF4/FP4 (bitsandbytes, blocks of 64): 4 bits a weight
  plus one fp32 absmax per block (32/64 = 0.5 bits; 4.5 in all), or with double quantization one uint8 absmax per
  block and one fp32 constant per 256 blocks (8/64 + 32/(64*256) = 0.127 bits; 4.127 in all). int8 (LLM.int8):
  8 bits plus one fp32 scale per output row. Embeddings, norms and the output head stay in ``dtype``.
- **adapter**: trainable parameters, their gradients (same dtype) and the optimizer's state: AdamW keeps two
  moments (fp32 for the 32-bit and paged variants, the parameter's dtype for torch's AdamW), 8-bit AdamW one byte
  per moment plus an fp32 absmax per 256 (tensors under 4,096 elements stay 32-bit, as bitsandbytes does).
  Paged optimizers keep the moments in CUDA unified memory that pages out to CPU RAM under pressure: reported as
  pageable. On a GPU, torch's AdamW runs ``foreach`` and holds one temporary the size of the moments during
  ``step()``.
- **activations**: what autograd saves, counted per layer and token from what transformers' Llama and BERT layers
  and PyTorch's kernels keep (checked tensor by tensor with ``saved_tensors_hooks`` in tests/test_plan.py): the
  inputs of the norms; attention's q, k, v, output and log-sum-exp (fused attention: flash / memory-efficient
  SDPA) or its probabilities (math attention, with dropout mask and dropped copy when attention dropout is on); the
  MLP's gate, up and activation outputs (Llama) or GELU input (BERT); dropout masks; and the input of every layer
  whose weight or adapter trains (a frozen weight needs no saved input: its input gradient needs only the weight).
  Gradient checkpointing keeps each layer's input and recomputes one layer at a time. The causal-LM head adds
  logits (``T x vocab``), their fp32 log-softmax and its gradient during backward.
- **KV cache** (serving): 2 x layers x kv_heads x head_dim x context x batch x ``e``.

Peak = base weights + parameters + optimizer state + the larger of (activations + head) and (gradients + the
optimizer's temporaries); under FSDP the weights, gradients and state are divided by the world size.

Speed: a matmul with ``N`` weights costs ``2N`` FLOPs per token forward; backward computes activation gradients
(another ``2N``) and, only for trainable weights, weight gradients (another ``2N``); checkpointing adds a forward.
Attention adds ``2 x 2 x s x q_dim`` per token and layer (QK^T and AV, half of it masked away under causal
masking, which fused kernels skip). So a frozen-base PEFT step costs about 4N FLOPs per token (6N with
checkpointing), full fine-tuning 6N (8N with checkpointing); tokens/s = FLOP rate x utilisation / FLOPs per token
(:func:`train_flops_per_token`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .plan_shapes import ModelShape, linear_layers

METHODS = ("lora", "ia3", "houlsby", "pfeiffer", "prompt", "prefix", "bitfit", "full")
QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
STRATEGIES = ("ddp", "fsdp")
GiB = 2**30


@dataclass(frozen=True)
class Recipe:
    """How the model is trained: method and targets, quantization, batch, precision, optimizer, processes.

    ``targets``: module names of one layer (``q_proj``, ``v_proj``, ... / ``query``, ``value``, ...) or
    ``("all-linear",)``; empty = the family's defaults. ``dtype``: the base model's non-quantized weights and the
    compute (activation) precision; ``adapter_dtype``: trainable parameters, their gradients. ``device``: "cuda"
    (fused attention, foreach AdamW, 1-byte dropout masks) or "cpu" (what torch does there: math attention when
    attention dropout is on, for-loop AdamW, dropout masks at activation width).
    """

    method: str = "lora"
    targets: tuple[str, ...] = ()
    r: int = 8
    lora_dropout: float = 0.0
    num_virtual_tokens: int = 20
    reduction_factor: int = 16
    quantization: str = "none"
    double_quant: bool = True
    batch: int = 1
    seq: int = 512
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    dtype: str = "bfloat16"
    adapter_dtype: str = "float32"
    world_size: int = 1
    strategy: str = "ddp"
    device: str = "cuda"
    num_labels: int = 2

    def check(self, shape: ModelShape) -> None:
        for name, value, allowed in (("method", self.method, METHODS), ("quantization", self.quantization, QUANTIZATIONS),
                                     ("optimizer", self.optimizer, OPTIMIZERS), ("dtype", self.dtype, DTYPES),
                                     ("adapter dtype", self.adapter_dtype, DTYPES), ("strategy", self.strategy, STRATEGIES),
                                     ("device", self.device, ("cuda", "cpu"))):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("r", "batch", "seq", "world_size", "num_virtual_tokens", "reduction_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.method == "full" and self.quantization != "none":
            raise ValueError("full fine-tuning trains every weight: it cannot keep them quantized (use --quantization none)")
        if self.method == "bitfit" and not shape.biases:
            raise ValueError(f"{shape.name} has no bias terms: BitFit would train nothing (pick another --method)")
        if self.optimizer.startswith("paged") and self.device != "cuda":
            raise ValueError(f"{self.optimizer} pages CUDA memory: it needs --device cuda")


@dataclass
class Plan:
    """The estimate: bytes by part, peak, FLOPs per token; see the module docstring for each formula."""

    model: str
    recipe: dict[str, Any]
    params_total: int
    params_trainable: int
    base_weight_bytes: int
    quantized_bits_per_param: float | None
    trainable_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    optimizer_pageable: bool
    optimizer_temp_bytes: int
    activation_bytes: int
    head_bytes: int
    peak_bytes: int
    kv_cache_bytes: int
    kv_cache_context: int
    kv_cache_batch: int
    flops_per_token: float
    flops_formula: str
    notes: list[str] = field(default_factory=list)

    def tokens_per_second(self, tflops: float, utilisation: float) -> float:
        """Training tokens/s of all processes at ``tflops`` peak per device and the given utilisation (MFU)."""
        return tflops * 1e12 * utilisation * self.recipe["world_size"] / self.flops_per_token

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ trainable tensors


def _targets(shape: ModelShape, recipe: Recipe) -> list[str]:
    names = linear_layers(shape)
    if recipe.method == "full":
        return list(names)
    chosen = recipe.targets or (shape.default_ia3 if recipe.method == "ia3" else shape.default_lora)
    if tuple(chosen) == ("all-linear",):
        return list(names)
    unknown = [t for t in chosen if t not in names]
    if unknown:
        raise ValueError(f"unknown target module(s) {unknown} for {shape.name}; one layer has: {', '.join(names)} (or all-linear)")
    return list(dict.fromkeys(chosen))


def trainable_tensors(shape: ModelShape, recipe: Recipe) -> list[tuple[int, int]]:
    """(elements per tensor, how many such tensors) for everything the recipe trains."""
    method, L, h = recipe.method, shape.layers, shape.hidden
    linears = linear_layers(shape)
    head = [(h * recipe.num_labels, 1), (recipe.num_labels, 1)] if shape.encoder else []  # classifier trains in full
    if method == "full":
        return [(n, 1) for n in shape.param_tensors(recipe.num_labels)]
    if method == "lora":
        out = []
        for t in _targets(shape, recipe):
            d_in, d_out, _ = linears[t]
            out += [(recipe.r * d_in, L), (recipe.r * d_out, L)]
        return out + head
    if method == "ia3":
        ff = shape.feedforward_output
        return [((linears[t][0] if t == ff else linears[t][1]), L) for t in _targets(shape, recipe)] + head
    if method in ("houlsby", "pfeiffer"):
        m = h // recipe.reduction_factor
        per_layer = 2 if method == "houlsby" else 1
        return [(m * h, 2 * L * per_layer), (m, L * per_layer), (h, L * per_layer)] + head
    if method == "prompt":
        return [(recipe.num_virtual_tokens * h, 1)] + head
    if method == "prefix":
        return [(recipe.num_virtual_tokens * L * 2 * shape.kv_dim, 1)] + head
    return [(n, c) for n, c in shape.bias_tensors()] + head  # bitfit


# --------------------------------------------------------------------------------------------------- the parts


def base_weight_bytes(shape: ModelShape, recipe: Recipe) -> tuple[int, float | None]:
    """Bytes of the frozen weights (all weights for full fine-tuning) and the quantized layers' bits per weight."""
    e = DTYPES[recipe.dtype]
    quantized = shape.layers * sum(i * o for i, o, _ in linear_layers(shape).values())
    other = shape.total_params(recipe.num_labels) - quantized
    if recipe.quantization == "none":
        return (quantized + other) * e, None
    if recipe.quantization == "int8":
        rows = shape.layers * sum(o for _, o, _ in linear_layers(shape).values())
        qbytes = quantized + 4 * rows
    else:
        qbytes = 0
        for d_in, d_out, _ in linear_layers(shape).values():
            n = d_in * d_out
            blocks = math.ceil(n / 64)
            consts = blocks + 4 * math.ceil(blocks / 256) + 4 if recipe.double_quant else 4 * blocks
            qbytes += shape.layers * (math.ceil(n / 2) + consts)
    return qbytes + other * e, 8 * qbytes / quantized


def optimizer_bytes(tensors: list[tuple[int, int]], recipe: Recipe) -> int:
    """Two AdamW moments per trainable element, by the optimizer's storage rule (module docstring)."""
    total = 0
    for n, count in tensors:
        if recipe.optimizer.endswith("8bit") and n >= 4096:
            total += count * (2 * n + 2 * 4 * math.ceil(n / 256))
        elif recipe.optimizer == "adamw":
            total += count * 2 * n * DTYPES[recipe.adapter_dtype]
        else:
            total += count * 2 * n * 4
    return total


def layer_activation_elements(shape: ModelShape, recipe: Recipe, targets: list[str], kv_len: int) -> tuple[float, float]:
    """(elements at activation width, elements of 1-byte masks on CUDA) that one layer saves per token.

    Counted from transformers' layer code and PyTorch's autograd formulas (see the module docstring). For LoRA
    (default targets and all-linear) and full fine-tuning of Llama and BERT layers the count equals what
    ``saved_tensors_hooks`` sees (tests/test_plan.py); the (IA)^3, bottleneck and prompt/prefix terms follow the
    same rules but are not checked against autograd.
    """
    h, inter, q, kv, heads = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.heads
    linears = linear_layers(shape)
    trains_all = recipe.method == "full"
    wide = 2.0 * h + 2  # the two norms' inputs and their per-token statistics (RMSNorm: rsqrt; LayerNorm: mean, rstd)
    masks = 0.0
    if shape.encoder:
        wide += 2  # LayerNorm keeps mean and rstd: one more scalar per norm than RMSNorm
        masks += 2 * h  # hidden dropout after attention and after the feed-forward block
        wide += inter  # GELU's input
    else:
        wide += 3 * inter  # SiLU's input, its output and up_proj's output (the product's two factors)
    # PyTorch's fused CPU attention has no dropout: with attention dropout on, SDPA falls back to the math path
    math_attention = recipe.device == "cpu" and shape.attention_dropout > 0
    if math_attention:  # q, k, v (the matmuls' operands), the softmax probabilities, the dropped ones, the mask
        wide += q + 2 * kv + 2 * heads * kv_len
        masks += heads * kv_len
    else:  # fused SDPA: q, k, v, output, log-sum-exp per head
        wide += 2 * q + 2 * kv + heads
        # (attention dropout inside fused kernels regenerates its mask from a saved RNG state)
    # inputs of layers whose weight or adapter trains, once per distinct input tensor
    inputs = {linears[t][2] for t in targets}
    sizes = {"attn_in": h, "attn_out": q, "mlp_in": h, "mlp_mid": inter}
    if trains_all and not shape.encoder:
        wide += 2 * h  # RMSNorm's normalized input, which its weight gradient needs (LayerNorm reuses its input)
    if not math_attention:
        inputs.discard("attn_out")  # fused SDPA's output is the output projection's input (a view): counted above
    wide += sum(sizes[i] for i in inputs)
    if recipe.method == "lora":
        wide += recipe.r * len(targets)  # A x, which B's weight gradient needs
        if recipe.lora_dropout > 0:
            wide += sum(sizes[i] for i in inputs)  # the dropped copy of each distinct input
            masks += sum(sizes[i] for i in inputs)
    elif recipe.method == "ia3":
        wide += sum(linears[t][1] for t in targets if t != shape.feedforward_output)  # outputs scaled by l
    elif recipe.method in ("houlsby", "pfeiffer"):
        m = h // recipe.reduction_factor
        wide += (2 if recipe.method == "houlsby" else 1) * (h + 2 * m)
    return wide, masks


def activation_bytes(shape: ModelShape, recipe: Recipe) -> tuple[int, int]:
    """(bytes autograd holds at the end of the forward pass, bytes the output head adds at the start of backward)."""
    e = DTYPES[recipe.dtype]
    mask_bytes = 1 if recipe.device == "cuda" else e
    virtual = recipe.num_virtual_tokens if recipe.method == "prompt" else 0
    tokens = recipe.batch * (recipe.seq + virtual)
    kv_len = recipe.seq + (recipe.num_virtual_tokens if recipe.method in ("prompt", "prefix") else 0)
    wide, masks = layer_activation_elements(shape, recipe, _targets(shape, recipe) if recipe.method in ("lora", "ia3", "full") else [], kv_len)
    layer = tokens * (wide * e + masks * mask_bytes)
    h = shape.hidden
    if recipe.gradient_checkpointing:  # each layer's input, plus one layer recomputed at a time during backward
        layers = shape.layers * tokens * h * e + layer
    else:
        layers = shape.layers * layer
    if shape.encoder:  # the embeddings' LayerNorm input and statistics, and its dropout mask
        outside = tokens * ((h + 2) * e + h * mask_bytes)
        head = 0
    else:  # the final norm's input (and, training the head, its normalized input and the head's input)
        outside = tokens * (h + 1 + (2 * h if recipe.method == "full" else 0)) * e
        # logits in the compute dtype, their fp32 copy (when not fp32 already), the fp32 log-softmax and its gradient
        head = tokens * shape.vocab * (e + (4 if e != 4 else 0) + 8)
    return int(layers + outside), int(head)


def train_flops_per_token(shape: ModelShape, recipe: Recipe, trainable_matmul: int) -> tuple[float, str]:
    """FLOPs of one training token (module docstring): forward 2N, input gradients 2N, weight gradients 2x the
    trainable matmul weights, a second forward under checkpointing; attention 2*s*q_dim per layer forward
    (causal: half of the 4*s*q_dim), twice that backward."""
    n = shape.matmul_params()
    s = recipe.seq + (recipe.num_virtual_tokens if recipe.method in ("prompt", "prefix") else 0)
    attention = shape.layers * s * shape.q_dim * (4 if shape.encoder else 2)
    forwards = 2 if recipe.gradient_checkpointing else 1
    flops = (forwards * 2 + 2) * (n + attention) + 2 * attention + 2 * trainable_matmul
    formula = (f"({2 * forwards}+2)*N + 2*N_trained + {3 + forwards}*A, N = {n:,} matmul weights, "
               f"N_trained = {trainable_matmul:,}, A = {attention:,} attention FLOPs/token forward")
    return float(flops), formula


def make_plan(shape: ModelShape, recipe: Recipe, kv_context: int | None = None, kv_batch: int | None = None) -> Plan:
    """The estimate for training ``shape`` with ``recipe``; the KV cache for serving ``kv_batch`` sequences of
    ``kv_context`` tokens (default: the training batch and sequence length)."""
    recipe.check(shape)
    tensors = trainable_tensors(shape, recipe)
    n_train = sum(n * c for n, c in tensors)
    t_bytes = DTYPES[recipe.dtype if recipe.method == "full" else recipe.adapter_dtype]
    base, bits = base_weight_bytes(shape, recipe)
    if recipe.method == "full":
        base = 0  # every weight is trainable: counted below
    trainable = n_train * t_bytes
    grads = trainable
    optim = optimizer_bytes(tensors, recipe)
    temp = 0
    if recipe.optimizer == "adamw" and recipe.device == "cuda":
        temp = optim // 2  # foreach AdamW: sqrt(v) for every tensor at once
    acts, head = activation_bytes(shape, recipe)
    shard = recipe.world_size if recipe.strategy == "fsdp" else 1
    notes = []
    if shard > 1:
        notes.append(f"FSDP: weights, gradients and optimizer state divided by {shard}; one layer gathered at a time")
    gathered = 0 if shard == 1 else sum(i * o for i, o, _ in linear_layers(shape).values()) * DTYPES[recipe.dtype]
    fixed = (base + trainable + optim) // shard + gathered
    # Adapter gradients are alive while the head's backward runs; full fine-tuning's gradients grow as backward
    # frees the activations, so there the two branches peak apart.
    during_backward = acts + head + (0 if recipe.method == "full" else grads // shard)
    peak = fixed + max(during_backward, (grads + temp) // shard)
    if recipe.quantization != "none":
        notes.append("quantized layers dequantize one weight at a time in the compute dtype (a transient not in the peak)")
    if recipe.optimizer.startswith("paged"):
        notes.append("paged optimizer: its state can page out to CPU RAM when the GPU runs short")
    trainable_matmul = shape.matmul_params() if recipe.method == "full" else (n_train if recipe.method == "lora" else 0)
    flops, formula = train_flops_per_token(shape, recipe, trainable_matmul)
    ctx, kvb = kv_context or recipe.seq, kv_batch or recipe.batch
    kv = 0 if shape.encoder else 2 * shape.layers * shape.kv_dim * ctx * kvb * DTYPES[recipe.dtype]
    return Plan(
        model=shape.name, recipe=asdict(recipe), params_total=shape.total_params(recipe.num_labels),
        params_trainable=n_train, base_weight_bytes=base // shard, quantized_bits_per_param=bits,
        trainable_bytes=trainable // shard, gradient_bytes=grads // shard, optimizer_bytes=optim // shard,
        optimizer_pageable=recipe.optimizer.startswith("paged"), optimizer_temp_bytes=temp // shard,
        activation_bytes=acts, head_bytes=head, peak_bytes=peak, kv_cache_bytes=kv, kv_cache_context=ctx,
        kv_cache_batch=kvb, flops_per_token=flops, flops_formula=formula, notes=notes,
    )  # fmt: skip


def format_plan(plan: Plan, memory: tuple[str, int] | None, tflops: float | None, utilisation: float, overhead: int) -> str:
    """The human-readable report: the split, the peak, the fit, the speed."""
    r = plan.recipe

    def gib(n: float) -> str:
        return f"{n / GiB:8.2f} GiB"

    quant = r["quantization"] + (" + double quant" if r["quantization"] in ("nf4", "fp4") and r["double_quant"] else "")
    bits = f" ({plan.quantized_bits_per_param:.3f} bits per quantized weight)" if plan.quantized_bits_per_param else ""
    lines = [
        f"{plan.model}: {plan.params_total:,} parameters; {r['method']}"
        + (f" r={r['r']}" if r["method"] == "lora" else "") + f", {plan.params_trainable:,} trainable; base {quant}, "
        f"compute {r['dtype']}; batch {r['batch']} x {r['seq']} tokens"
        + (", gradient checkpointing" if r["gradient_checkpointing"] else "")
        + f"; {r['optimizer']}; {r['world_size']} x {r['device']} ({r['strategy']})",
        f"  base weights            {gib(plan.base_weight_bytes)}{bits}",
        f"  trainable parameters    {gib(plan.trainable_bytes)}  ({r['adapter_dtype'] if r['method'] != 'full' else r['dtype']})",
        f"  gradients               {gib(plan.gradient_bytes)}",
        f"  optimizer state         {gib(plan.optimizer_bytes)}" + ("  (pageable to CPU RAM)" if plan.optimizer_pageable else ""),
        f"  activations             {gib(plan.activation_bytes)}" + (f"  + output head {gib(plan.head_bytes).strip()} at backward" if plan.head_bytes else ""),
    ]  # fmt: skip
    if plan.optimizer_temp_bytes:
        lines.append(f"  optimizer temporaries   {gib(plan.optimizer_temp_bytes)}  (foreach AdamW, during step)")
    lines.append(f"  peak (training)         {gib(plan.peak_bytes)}  ({plan.peak_bytes / 1e9:.2f} GB)")
    if plan.kv_cache_bytes:
        lines.append(f"  serving KV cache        {gib(plan.kv_cache_bytes)}  ({plan.kv_cache_batch} x {plan.kv_cache_context} tokens, {r['dtype']})")
    if memory:
        label, size = memory
        usable = size - overhead
        verdict = "fits" if plan.peak_bytes <= usable else "does NOT fit"
        lines.append(f"  {verdict} in {label} ({size / GiB:.2f} GiB, {usable / GiB:.2f} GiB usable after {overhead / GiB:.2f} GiB "
                     f"for the CUDA context): {100 * plan.peak_bytes / usable:.0f}% used")  # fmt: skip
        if plan.optimizer_pageable and plan.peak_bytes > usable >= plan.peak_bytes - plan.optimizer_bytes:
            lines.append("  ... fits if the paged optimizer state moves to CPU RAM")
    lines.append(f"  FLOPs per training token {plan.flops_per_token:.4g} = {plan.flops_formula}")
    if tflops:
        rate = plan.tokens_per_second(tflops, utilisation)
        lines.append(f"  at {tflops:g} TFLOP/s x {utilisation:.0%} utilisation x {r['world_size']} device(s): {rate:,.0f} tokens/s")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_json(plan: Plan, memory: tuple[str, int] | None, tflops: float | None, utilisation: float, overhead: int) -> str:
    out = plan.to_dict()
    if memory:
        out["memory"] = {"label": memory[0], "bytes": memory[1], "overhead_bytes": overhead,
                         "fits": plan.peak_bytes <= memory[1] - overhead}  # fmt: skip
    if tflops:
        out["throughput"] = {"tflops": tflops, "utilisation": utilisation,
                             "tokens_per_s": plan.tokens_per_second(tflops, utilisation)}  # fmt: skip
    return json.dumps(out, indent=2)
