"""``peftkit plan``: will a fine-tuning recipe fit a GPU, and how fast will it train (from shapes alone)."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  # the QLoRA paper's claim: LLaMA-65B fine-tunes on one 48 GB GPU (NF4 + double quant, LoRA r=64 on every
  # linear layer, batch 1 x 512, gradient checkpointing, paged AdamW, bf16 adapters)
  peftkit plan llama-65b --quantization nf4 --r 64 --target-modules all-linear --batch-size 1 --seq-len 512 \\
      --gradient-checkpointing --optim paged_adamw_32bit --adapter-dtype bfloat16 --gpu-memory 48GB
  peftkit plan llama3-8b --method full --batch-size 4 --seq-len 2048 --gpu-memory h100-80gb --world-size 8 --strategy fsdp
  peftkit plan smollm2-135m --dtype float32 --device cpu --batch-size 4 --seq-len 128 --json
  peftkit plan path/to/model/config.json --method ia3 --gpu-memory rtx4090-24gb

Memory: base weights + trainable parameters + gradients + optimizer state + the larger of (activations + the
output head's logits at backward) and (gradients + optimizer temporaries). Speed: FLOPs per token = 2N forward +
2N input gradients + 2N_trained weight gradients (+2N with checkpointing) + attention; tokens/s = TFLOP/s x
utilisation / that. The formulas are in peftkit/plan.py; BENCHMARKS.md has the planner against measured peaks.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..plan import DTYPES, METHODS, OPTIMIZERS, QUANTIZATIONS, STRATEGIES
    from ..plan_shapes import GPUS, PRESETS
    from .common import target_modules

    p = subparsers.add_parser("plan", help="estimate peak memory and training speed; does it fit a GPU?",
                              description="Estimate a fine-tuning run's peak memory (split by part), its training "
                                          "tokens/s at a FLOP rate, and whether it fits a memory size. MODEL: a preset "
                                          f"({', '.join(PRESETS)}), or a local config.json / model folder.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("model", help="a preset or embedded name, or a local config.json / Hugging Face model folder")
    p.add_argument("--method", choices=METHODS, default="lora", help="what trains (default lora; full = every weight)")
    p.add_argument("--target-modules", type=target_modules, metavar="NAMES",
                   help="comma-separated module names of one layer (q_proj,v_proj), or all-linear (default: the family's)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (keeps a mask and a copy of each input)")
    p.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt / prefix tuning (default 20)")
    p.add_argument("--reduction-factor", type=int, default=16, help="bottleneck adapters: hidden / m (default 16)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="base linear layers (default none)")
    p.add_argument("--no-double-quant", action="store_true", help="NF4/FP4 without quantizing the block constants (4.5 bits)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step per device (default 1)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="keep each layer's input only, recompute")
    p.add_argument("--optim", choices=OPTIMIZERS, default="adamw", help="default adamw (torch, moments in the parameters' dtype)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="base weights and compute (default bfloat16)")
    p.add_argument("--adapter-dtype", choices=list(DTYPES), default="float32", help="trainable parameters and gradients (default float32)")
    p.add_argument("--world-size", type=int, default=1, help="processes / GPUs (default 1)")
    p.add_argument("--strategy", choices=STRATEGIES, default="ddp", help="ddp: a full copy each; fsdp: weights, grads, state sharded")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="which device's kernels to model (default cuda)")
    p.add_argument("--num-labels", type=int, default=2, help="encoders: classifier outputs (default 2)")
    p.add_argument("--gpu-memory", help=f"memory to fit in: 48GB, 44.7GiB, 40960MiB or a GPU ({', '.join(GPUS)})")
    p.add_argument("--overhead", default="1GiB", help="memory outside torch's tensors (CUDA context, allocator slack; default 1GiB)")
    p.add_argument("--tflops", type=float, help="peak TFLOP/s per device (default: the --gpu-memory GPU's dense bf16 peak)")
    p.add_argument("--mfu", type=float, default=0.4, help="share of the peak a training step reaches (default 0.4)")
    p.add_argument("--kv-context", type=int, help="serving KV cache: tokens per sequence (default --seq-len)")
    p.add_argument("--kv-batch", type=int, help="serving KV cache: sequences (default --batch-size)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from ..plan import Recipe, format_plan, make_plan, plan_json
    from ..plan_shapes import GPUS, find_shape, parse_memory

    shape = find_shape(args.model)
    targets = args.target_modules or ()
    if isinstance(targets, str) and targets != "all-linear":
        raise ValueError(f"--target-modules {targets!r}: the planner takes module names (q_proj,v_proj) or all-linear, not a regex")
    recipe = Recipe(
        method=args.method, targets=(targets,) if isinstance(targets, str) else tuple(targets), r=args.r, lora_dropout=args.lora_dropout,
        num_virtual_tokens=args.num_virtual_tokens, reduction_factor=args.reduction_factor,
        quantization=args.quantization, double_quant=not args.no_double_quant, batch=args.batch_size,
        seq=args.seq_len, gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optim,
        dtype=args.dtype, adapter_dtype=args.adapter_dtype, world_size=args.world_size, strategy=args.strategy,
        device=args.device, num_labels=args.num_labels,
    )  # fmt: skip
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
    memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    overhead = parse_memory(args.overhead)[1] if args.overhead not in ("0", "") else 0
    tflops = args.tflops
    if tflops is None and memory and memory[0] in GPUS:
        tflops = GPUS[memory[0]][1]
    plan = make_plan(shape, recipe, args.kv_context, args.kv_batch)
    print((plan_json if args.json else format_plan)(plan, memory, tflops, args.mfu, overhead))
    return 0
