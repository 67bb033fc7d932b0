"""Check ``peftkit plan`` against the peak memory of real training steps on this machine.

Each case (SmolLM2-135M and MiniLM-L6: LoRA, QLoRA (NF4 + double quantization) and full fine-tuning) runs in a
fresh Python process: load the model, wrap it, build AdamW, take one warm-up training step (so the optimizer state
exists, as in any step after the first), then profile a second step (forward, backward, optimizer step,
``zero_grad(set_to_none=True)``).

What "peak" means: the most bytes of torch tensors alive at once, the CPU analogue of
``torch.cuda.max_memory_allocated`` (which is what the planner predicts). It is read from torch's own allocator:
``torch.profiler`` with ``profile_memory=True`` records every CPU allocation and free of the profiled step, and the
running sum of those, added to the bytes alive when the step starts (parameters, buffers, optimizer state: every
tensor the model and the optimizer hold, each storage once), peaks at the measured figure. Process RSS is not used:
it also counts the Python runtime and libraries (about 400 MiB), glibc's retained heap and the memory-mapped
safetensors file, none of which a GPU's allocator sees; tracemalloc sees no torch memory at all.

Inputs are random token ids (the values do not change memory), batch 4 x 128 tokens for SmolLM2 and 32 x 128
for MiniLM (sequence classification, 2 labels), fp32 (one SmolLM2 case in bf16: weights, adapters and activations),
LoRA r=8 on the family's default targets (q/v).

    python bench/plan_validate.py [--json bench/results/plan_validate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name: (model, task, method, quantization, gradient checkpointing, batch, seq[, dtype])
CASES = {
    "smollm2 lora bf16": ("smollm2-135m", "causal-lm", "lora", None, False, 4, 128, "bfloat16"),
    "smollm2 lora": ("smollm2-135m", "causal-lm", "lora", None, False, 4, 128),
    "smollm2 qlora": ("smollm2-135m", "causal-lm", "lora", "nf4", False, 4, 128),
    "smollm2 qlora + checkpointing": ("smollm2-135m", "causal-lm", "lora", "nf4", True, 4, 128),
    "smollm2 full": ("smollm2-135m", "causal-lm", "full", None, False, 4, 128),
    "minilm lora": ("minilm-l6", "seq-cls", "lora", None, False, 32, 128),
    "minilm qlora": ("minilm-l6", "seq-cls", "lora", "nf4", False, 32, 128),
    "minilm full": ("minilm-l6", "seq-cls", "full", None, False, 32, 128),
}
R, ALPHA = 8, 16


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (tied weights and views count once)."""
    import torch

    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def profiled_peak(step) -> int:
    """The most bytes of CPU tensors ``step()`` holds at once beyond what was alive when it began: the running sum
    of torch.profiler's allocation and free events (torch's own CPU allocator), in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(case: str) -> dict:
    import torch

    import peftkit as pk
    from peftkit.base_layers import kind_of

    model_name, task, method, quantization, checkpointing, batch, seq, dtype = (CASES[case] + ("float32",))[:8]
    torch.manual_seed(0)
    model, _ = pk.load_model(model_name, task=task, quantization=quantization, dtype=getattr(torch, dtype))
    if quantization:
        model = pk.prepare_model_for_kbit_training(model, gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if method == "lora":
        task_type = "SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM"
        model = pk.get_peft_model(model, pk.LoraConfig(r=R, lora_alpha=ALPHA, task_type=task_type))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = x if task == "causal-lm" else torch.randint(0, 2, (batch,), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        model(input_ids=x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    held = list(model.parameters()) + list(model.buffers())
    held += [v for state in optimizer.state.values() for v in state.values()]
    for module in model.modules():  # quantized layers: packed weights, block constants, double-quant constants
        kind = kind_of(module)
        if kind is not None and kind.quantized:
            held += list(kind.storage(module)[2])
    start = tensor_bytes(held + [x, labels])
    peak = profiled_peak(step)
    return {"case": case, "model": model_name, "task": task, "method": method, "quantization": quantization,
            "gradient_checkpointing": checkpointing, "batch": batch, "seq": seq, "dtype": dtype, "start_bytes": start,
            "adapter_dtype": str(params[0].dtype).removeprefix("torch."),
            "step_peak_bytes": peak, "peak_bytes": start + peak, "trainable_params": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "plan_validate.json")
    parser.add_argument("--child", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    rows = []
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", case], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{case} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
