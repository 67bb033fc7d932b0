"""Inference latency per method on SmolLM2-135M (the LoRA paper's Table 1 question, on this machine).

One forward pass at (batch 1, seq 128), (batch 8, seq 128) and (batch 4, seq 512), and one decode step of one token
per row with a KV cache of 128 tokens (batch 1 and batch 8), for: the base model, LoRA merged, LoRA unmerged, (IA)^3
merged, Houlsby adapters, Pfeiffer adapters and prefix tuning. All variants of a shape are timed in interleaved rounds
(A B C ... A B C ...) after warm-up; each figure is the median, reported as a ratio to the base model measured in the
same rounds. Adapters carry non-zero weights (a freshly initialised LoRA or adapter is close to a no-op, but its
compute is the same; the outputs are checked to differ from the base so nothing is silently skipped).

    python bench/latency.py                 # the BENCHMARKS.md table (about 15 minutes on 2 cores)
    python bench/latency.py --quick         # two rounds of the small shapes (what the test runs)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import peftkit as pk
from report import write_report
from timing import decode_fn, forward_fn, interleaved

VARIANTS = ["base", "lora merged", "lora unmerged", "ia3 merged", "houlsby", "pfeiffer", "prefix"]
FORWARD_SHAPES = [(1, 128), (8, 128), (4, 512)]
DECODE_BATCHES = [1, 8]
CACHE = 128
VOCAB = 49152


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Give every trainable (adapter) tensor random non-trivial values, so the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.05 if "ia3" in name else 0.02
                p.add_(torch.randn(p.shape, generator=g) * scale)


def build(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every variant, each on its own copy of the base weights."""

    def wrap(config: pk.PeftConfig, seed: int) -> pk.PeftModel:
        model = pk.get_peft_model(copy.deepcopy(base), config)
        perturb(model, seed)
        return model.eval()

    lora = wrap(pk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 1)
    lora_merged = copy.deepcopy(lora).merge_and_unload()
    ia3_merged = wrap(pk.IA3Config(), 2).merge_and_unload()
    return {
        "base": base.eval(),
        "lora merged": lora_merged,
        "lora unmerged": lora,
        "ia3 merged": ia3_merged,
        "houlsby": wrap(pk.BottleneckConfig(variant="houlsby", reduction_factor=16), 3),
        "pfeiffer": wrap(pk.BottleneckConfig(variant="pfeiffer", reduction_factor=16), 4),
        "prefix": wrap(pk.PrefixTuningConfig(num_virtual_tokens=20), 5),
    }


def check_distinct(models: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Max abs logit difference of each variant from the base on one input (every adapter must change the output)."""
    x = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        base = models["base"](input_ids=x).logits
        return {name: float((m(input_ids=x).logits - base).abs().max()) for name, m in models.items() if name != "base"}


def measure(models: dict[str, torch.nn.Module], rounds: int, forward_shapes, decode_batches) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch, seq in forward_shapes:
        x = torch.randint(0, VOCAB, (batch, seq), generator=g)
        # the largest shape takes seconds per pass: fewer rounds there
        n = max(2, rounds // 3) if batch * seq > 2048 else rounds
        times = interleaved({name: forward_fn(m, x) for name, m in models.items()}, n, warmup=1)
        rows += [dict(case=f"forward {batch}x{seq}", variant=k, ms=v * 1e3, ratio=v / times["base"], rounds=n) for k, v in times.items()]
        print(f"forward {batch}x{seq}: " + ", ".join(f"{k} {v / times['base']:.3f}" for k, v in times.items()), file=sys.stderr, flush=True)
    for batch in decode_batches:
        prompt = torch.randint(0, VOCAB, (batch, CACHE), generator=g)
        times = interleaved({name: decode_fn(m, prompt) for name, m in models.items()}, rounds * 3)
        case = f"decode {batch}x1 (cache {CACHE})"
        rows += [dict(case=case, variant=k, ms=v * 1e3, ratio=v / times["base"], rounds=rounds * 3) for k, v in times.items()]
        print(f"{case}: " + ", ".join(f"{k} {v / times['base']:.3f}" for k, v in times.items()), file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = ["| method | " + " | ".join(cases) + " |", "|---|" + "---|" * len(cases)]
    for variant in VARIANTS:
        cells = []
        for case in cases:
            r = next(r for r in rows if r["case"] == case and r["variant"] == variant)
            cells.append(f"{r['ms']:.1f} ms" if variant == "base" else f"{r['ratio']:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Latency ratio to the base per method, one group of bars per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = [v for v in VARIANTS if v != "base"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(cases)
    for i, case in enumerate(cases):
        ratios = [next(r["ratio"] for r in rows if r["case"] == case and r["variant"] == v) for v in variants]
        ax.bar([j + i * width for j in range(len(variants))], ratios, width, label=case)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylim(0.8, max(1.2, max(r["ratio"] for r in rows) + 0.05))  # the differences are a few percent
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(variants))], variants)
    ax.set_ylabel("latency / base latency")
    ax.set_title("SmolLM2-135M inference latency relative to the base model (fp32, CPU)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="two rounds of forward 1x128 and decode 1x1 only")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for latency.{json,md,png}")
    args = parser.parse_args()
    torch.manual_seed(0)
    base, _ = pk.load_model("smollm2-135m")
    models = build(base)
    differences = check_distinct(models)
    unchanged = [k for k, v in differences.items() if v < 1e-4]
    if unchanged:
        raise SystemExit(f"these variants do not change the base model's output: {unchanged}")
    shapes, batches, rounds = (FORWARD_SHAPES, DECODE_BATCHES, args.rounds) if not args.quick else ([(1, 128)], [1], 2)
    rows = measure(models, rounds, shapes, batches)
    report = {
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "max_abs_logit_difference_from_base": differences,
        "rows": rows,
    }
    write_report(args.out, "latency", report, markdown(rows), lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
