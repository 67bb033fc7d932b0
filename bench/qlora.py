"""QLoRA on SmolLM2-135M: LoRA over an fp32 base vs over an NF4 + double-quant base (peftkit) vs HF PEFT's QLoRA.

Every variant trains LoRA r=8 (alpha 16) on q_proj and v_proj with AdamW (lr 1e-3) on the same fixed-length
chunks of the first Alpaca records, for the same steps, each in a fresh Python process so that its peak RSS
(VmHWM: imports, loading and training together) is its own. Reported per variant: load time and peak RSS right
after loading, whole-process peak RSS, base-weight bytes (peftkit.memory_footprint of the loaded base),
median step time (forward + backward + optimizer step), training loss at the last step, and the loss on a held-out
batch after training (same math for all variants: train mode without dropout, no gradients).

Variants: ``fp32`` (peftkit, full-precision base), ``nf4`` (peftkit: load_model(quantization="nf4"),
prepare_model_for_kbit_training), ``hf-qlora`` (transformers BitsAndBytesConfig nf4 + double quant, peft
prepare_model_for_kbit_training + LoraConfig); ``nf4-gc`` and ``hf-qlora-gc`` add activation checkpointing
(use_reentrant=False), QLoRA's usual recipe (not run by default). All variants set ``use_cache=False`` (a training
forward never reads the KV cache). Finally ``nf4`` and ``hf-qlora`` train side by side in one process, alternating
steps, for a step-time ratio that machine noise hits alike. Two CPU cores are shared with other work: compare
ratios, not absolute times.

Children run with ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1048576`` (``--default-malloc`` to skip): with glibc's
per-thread arenas, the main thread occasionally gets moved to a fresh arena when another thread holds the main one,
stranding memory it had freed; and glibc's default mmap threshold grows with every large block freed, so later weight
reads land in the heap, where freed blocks fragment between small quantized ones. Measured here, the same 4-bit load
grew the process by 340-490 MiB with one arena alone and by 253-274 MiB with both settings (0.5x the fp32 weights).
Every variant gets the same settings.

    python bench/qlora.py [--steps 10] [--variants fp32 nf4 hf-qlora nf4-gc hf-qlora-gc] [--json bench/results/qlora.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "alpaca_sample_1727.json"
VARIANTS = ("fp32", "nf4", "hf-qlora", "nf4-gc", "hf-qlora-gc")
DEFAULT_VARIANTS = ("fp32", "nf4", "hf-qlora")
R, ALPHA, TARGETS, LR = 8, 16, ["q_proj", "v_proj"], 1e-3


def rss(key: str = "VmHWM") -> int:
    """Bytes of this process's resident set: current (VmRSS) or peak so far (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def alpaca_text(record: dict) -> str:
    context = f"### Input:\n{record['input']}\n\n" if record.get("input") else ""
    return f"### Instruction:\n{record['instruction']}\n\n{context}### Response:\n{record['output']}"


def batches(tokenizer, records: int, steps: int, batch: int, seq: int):
    """``steps`` training batches and one held-out batch of fixed-length chunks of the concatenated records."""
    import torch

    ids: list[int] = []
    for record in json.loads(DATA.read_text())[:records]:
        ids += tokenizer(alpaca_text(record))["input_ids"] + [tokenizer.eos_token_id]
    chunks = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    need = (steps + 1) * batch
    if chunks.shape[0] < need:
        raise SystemExit(f"{records} records give {chunks.shape[0]} chunks of {seq} tokens; {need} needed: raise --records")
    return [chunks[i * batch : (i + 1) * batch] for i in range(steps)], chunks[steps * batch : need]


def load(variant: str):
    """(model ready for LoRA training, LoRA-wrapped model, base-weight footprint)."""
    import torch

    import peftkit as pk

    gc = variant.endswith("-gc")
    if variant.startswith("hf-qlora"):
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
        )
        path = pk.models.resolve_model_path("smollm2-135m")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
        loaded = time.perf_counter()
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        footprint = pk.memory_footprint(model)
        torch.manual_seed(0)
        lora = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
    else:
        model, _ = pk.load_model("smollm2-135m", quantization=None if variant == "fp32" else "nf4")
        loaded = time.perf_counter()
        if variant != "fp32":
            model = pk.prepare_model_for_kbit_training(model, gradient_checkpointing=gc)
        footprint = pk.memory_footprint(model)
        torch.manual_seed(0)
        lora = pk.get_peft_model(model, pk.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS))
    model.config.use_cache = False
    return lora, footprint, loaded


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (import cost is not loading cost)

    import peftkit as pk

    tokenizer = pk.load_tokenizer("smollm2-135m")
    train, held_out = batches(tokenizer, args.records, args.steps, args.batch, args.seq)
    rss_ready = rss("VmRSS")
    start = time.perf_counter()
    model, footprint, loaded = load(variant)
    load_s, load_peak = loaded - start, rss()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = pk.make_optimizer("adamw", params, lr=LR)
    model.train()
    times, losses = [], []
    for x in train:
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    with torch.no_grad():  # train mode (no dropout anywhere): the same fp32 matmuls for every variant
        eval_loss = model(input_ids=held_out, labels=held_out).loss.item()
    return {
        "variant": variant,
        "rss_before_load_mib": rss_ready / 2**20,
        "load_s": load_s,
        "load_peak_rss_mib": load_peak / 2**20,
        "peak_rss_mib": rss() / 2**20,
        "base_weight_mib": footprint.base_total / 2**20,
        "base_weight_by_format_mib": {k: v / 2**20 for k, v in footprint.base_bytes.items()},
        "quantized_bits_per_param": None if footprint.quantized_params == 0 else footprint.bits_per_param,
        "trainable_params": sum(p.numel() for p in params),
        "median_step_s": statistics.median(times),
        "step_s": times,
        "losses": losses,
        "eval_loss": eval_loss,
    }


def interleaved_step_times(args: argparse.Namespace, pair: tuple[str, str]) -> dict:
    """Both variants in one process, one training step each in turn (A B A B ...), so that load from other work on
    the machine hits them alike; the ratio is the median over rounds of A's step time over B's in the same round."""
    import peftkit as pk

    tokenizer = pk.load_tokenizer("smollm2-135m")
    train, _ = batches(tokenizer, args.records, args.steps, args.batch, args.seq)
    runs = {}
    for variant in pair:
        model = load(variant)[0]
        params = [p for p in model.parameters() if p.requires_grad]
        runs[variant] = (model.train(), pk.make_optimizer("adamw", params, lr=LR), [])
    for x in train:
        for variant, (model, optimizer, times) in runs.items():
            t = time.perf_counter()
            model(input_ids=x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
    steps = {v: times[1:] for v, (_, _, times) in runs.items()}  # step 1 warms up
    paired = [a / b for a, b in zip(steps[pair[0]], steps[pair[1]])]  # same round: similar machine load
    return {"pair": list(pair), "median_step_s": {v: statistics.median(t) for v, t in steps.items()},
            "min_step_s": {v: min(t) for v, t in steps.items()}, "ratio": statistics.median(paired),
            "paired_ratios": paired, "step_s": {v: times for v, (_, _, times) in runs.items()}}  # fmt: skip


def table(results: list[dict]) -> str:
    fp32 = next((r for r in results if r["variant"] == "fp32"), None)
    rows = [
        "| variant | load s | peak RSS after load (MiB) | whole-run peak RSS (MiB) | base weights (MiB) | vs fp32 | "
        "bits/param (quantized) | median step (s) | train loss, last step | held-out loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = f"{r['base_weight_mib'] / fp32['base_weight_mib']:.2f}x" if fp32 else "-"
        bits = f"{r['quantized_bits_per_param']:.3f}" if r["quantized_bits_per_param"] else "-"
        rows.append(
            f"| {r['variant']} | {r['load_s']:.1f} | {r['load_peak_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['base_weight_mib']:.1f} | {ratio} | {bits} | {r['median_step_s']:.2f} | {r['losses'][-1]:.4f} | "
            f"{r['eval_loss']:.4f} |"
        )
    return "\n".join(rows)


def ratios(results: list[dict]) -> dict[str, float]:
    by = {r["variant"]: r for r in results}
    out = {}
    if "fp32" in by and "nf4" in by:
        fp32, nf4 = by["fp32"], by["nf4"]
        out["base_weights_nf4_over_fp32"] = nf4["base_weight_mib"] / fp32["base_weight_mib"]
        out["peak_rss_nf4_over_fp32"] = nf4["peak_rss_mib"] / fp32["peak_rss_mib"]
        out["held_out_loss_nf4_vs_fp32_pct"] = 100 * (nf4["eval_loss"] / fp32["eval_loss"] - 1)
        out["last_train_loss_nf4_vs_fp32_pct"] = 100 * (nf4["losses"][-1] / fp32["losses"][-1] - 1)
    for ours, theirs in (("nf4", "hf-qlora"), ("nf4-gc", "hf-qlora-gc")):
        if ours in by and theirs in by:
            out[f"step_time_{ours}_over_{theirs}"] = by[ours]["median_step_s"] / by[theirs]["median_step_s"]
            out[f"load_peak_rss_{ours}_over_{theirs}"] = by[ours]["load_peak_rss_mib"] / by[theirs]["load_peak_rss_mib"]
            out[f"peak_rss_{ours}_over_{theirs}"] = by[ours]["peak_rss_mib"] / by[theirs]["peak_rss_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--default-malloc", action="store_true", help="do not set MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_ in children")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "qlora.json")
    parser.add_argument("--no-interleave", action="store_true", help="skip the interleaved nf4 / hf-qlora step timing")
    parser.add_argument("--child", choices=VARIANTS + ("interleave",), help=argparse.SUPPRESS)  # one run, JSON out
    args = parser.parse_args()
    if args.child == "interleave":
        print(json.dumps(interleaved_step_times(args, ("nf4", "hf-qlora"))))
        return
    if args.child:
        print(json.dumps(run_variant(args.child, args)))
        return
    results = []
    load_avg = [os.getloadavg()]
    children = list(args.variants) + ([] if args.no_interleave else ["interleave"])
    env = dict(os.environ) if args.default_malloc else {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    for variant in children:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq), "--records", str(args.records)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-4000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        load_avg.append(os.getloadavg())
    interleaved = results.pop() if not args.no_interleave else None
    text = table(results)
    summary = ratios(results)
    if interleaved:
        summary["step_time_nf4_over_hf_qlora_interleaved"] = interleaved["ratio"]
    print(text)
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.3f}")
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "setup": {"model": "smollm2-135m", "lora": {"r": R, "lora_alpha": ALPHA, "target_modules": TARGETS},
                  "optimizer": f"adamw lr {LR}", "steps": args.steps, "batch": args.batch, "seq": args.seq,
                  "records": args.records, "data": str(DATA.name)},  # fmt: skip
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1m": [a[0] for a in load_avg],
                    "malloc_arena_max": env.get("MALLOC_ARENA_MAX"),
                    "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_")},
        "results": results,
        "interleaved_step_times": interleaved,
        "ratios": summary,
        "table": text,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.json.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=2)
    os.replace(f.name, args.json)
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
