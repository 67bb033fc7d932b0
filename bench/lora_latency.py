"""LoRA inference latency on SmolLM2-135M, peftkit and Hugging Face PEFT side by side in one process.

Measures one forward pass for: the base model, LoRA merged, LoRA unmerged (prefill 4 x 128; decode of 32 rows x
1 token with a KV cache of 64 tokens), and mixed-adapter decode with 1, 4, 16 and 32 distinct adapters among
32 rows (peftkit twice: with its compiled CPU kernel, peftkit.kernels, and with PEFTKIT_CPU_KERNELS=0, the PyTorch
gather). Variants are timed in interleaved rounds (A B C A B C ...) so machine noise hits them alike; each figure
is a median, reported as a ratio to the base model measured in the same rounds.

    python bench/lora_latency.py --rounds 15 [--json bench/results/lora_latency.json]
    python bench/lora_latency.py --cases mixed      # the mixed-adapter cases alone (about a minute)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import peftkit as pk
from peftkit import kernels
from timing import decode_fn, forward_fn as prefill_fn, interleaved

R, TARGETS, N_ADAPTERS = 8, ["q_proj", "v_proj"], 32
CASES = ("prefill", "decode", "mixed")


def gathered(fn):
    """``fn`` run with peftkit's compiled CPU kernel turned off (the PyTorch gather path)."""
    def run():
        before = os.environ.get("PEFTKIT_CPU_KERNELS")
        os.environ["PEFTKIT_CPU_KERNELS"] = "0"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["PEFTKIT_CPU_KERNELS"]
            else:
                os.environ["PEFTKIT_CPU_KERNELS"] = before
    return run


def randomize(named_params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def build(base):
    """peftkit and HF PEFT models with N_ADAPTERS LoRA adapters each (identical weights), unmerged and merged."""
    import peft

    ours = pk.get_peft_model(copy.deepcopy(base), pk.LoraConfig(r=R, lora_alpha=16, target_modules=TARGETS), "a0")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=R, lora_alpha=16, target_modules=TARGETS), adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        ours.add_adapter(f"a{i}", pk.LoraConfig(r=R, lora_alpha=16, target_modules=TARGETS))
        theirs.add_adapter(f"a{i}", peft.LoraConfig(r=R, lora_alpha=16, target_modules=TARGETS))
    for i in range(N_ADAPTERS):
        for model in (ours, theirs):
            randomize([(n, p) for n, p in model.named_parameters() if f".a{i}." in n], seed=i)
    ours_merged = copy.deepcopy(ours)
    ours_merged.merge_adapter(["a0"])
    theirs_merged = copy.deepcopy(theirs)
    theirs_merged.merge_adapter(["a0"])
    return ours, theirs, ours_merged, theirs_merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path, help="where to write the figures (default bench/results/lora_latency.json, "
                        "or lora_latency_<cases>.json for some of the cases)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="which cases to time (default all)")
    args = parser.parse_args()
    part = "" if set(args.cases) == set(CASES) else "_" + "_".join(c for c in CASES if c in args.cases)
    args.json = args.json or Path(__file__).parent / "results" / f"lora_latency{part}.json"
    torch.manual_seed(0)
    base, _ = pk.load_model("smollm2-135m")
    ours, theirs, ours_merged, theirs_merged = build(base)
    for m in (ours, theirs, ours_merged, theirs_merged):
        m.eval()
    for m in (ours, theirs):
        m.set_adapter("a0")

    rows = []
    x = torch.randint(0, 49152, (4, 128))
    t = {} if "prefill" not in args.cases else interleaved(
        {
            "base": prefill_fn(base, x),
            "peftkit merged": prefill_fn(ours_merged, x),
            "peftkit unmerged": prefill_fn(ours, x),
            "HF PEFT merged": prefill_fn(theirs_merged, x),
            "HF PEFT unmerged": prefill_fn(theirs, x),
        },
        args.rounds,
    )
    rows += [("prefill 4x128", k, v, v / t["base"]) for k, v in t.items()]
    if t:
        print(f"prefill done: {t}", file=sys.stderr, flush=True)

    prompt = torch.randint(0, 49152, (32, 64))
    with torch.inference_mode():
        t = {} if "decode" not in args.cases else interleaved(
            {
                "base": decode_fn(base, prompt),
                "peftkit merged": decode_fn(ours_merged, prompt),
                "peftkit unmerged": decode_fn(ours, prompt),
                "HF PEFT merged": decode_fn(theirs_merged, prompt),
                "HF PEFT unmerged": decode_fn(theirs, prompt),
            },
            args.rounds * 3,
        )
        rows += [("decode 32x1 (cache 64)", k, v, v / t["base"]) for k, v in t.items()]
        if t:
            print(f"decode done: {t}", file=sys.stderr, flush=True)
        for n in (1, 4, 16, 32) if "mixed" in args.cases else ():
            names = [f"a{i % n}" for i in range(32)]
            t = interleaved(
                {
                    "base": decode_fn(base, prompt),
                    "peftkit mixed": decode_fn(ours, prompt, adapter_names=names),
                    "peftkit mixed, PyTorch gather": gathered(decode_fn(ours, prompt, adapter_names=names)),
                    "HF PEFT mixed": decode_fn(theirs, prompt, adapter_names=names),
                },
                args.rounds * 3,
            )
            rows += [(f"mixed decode 32 rows, {n} adapters", k, v, v / t["base"]) for k, v in t.items() if k != "base"]
            print(f"mixed {n} done: {t}", file=sys.stderr, flush=True)

    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, LoRA r={R} on {TARGETS}, {N_ADAPTERS} adapters "
          f"loaded; {kernels.status()}")
    print("| case | variant | median ms | ratio to base |\n|---|---|---|---|")
    for case, variant, sec, ratio in rows:
        print(f"| {case} | {variant} | {sec * 1e3:.1f} | {ratio:.3f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([dict(case=c, variant=v, ms=s * 1e3, ratio=r) for c, v, s, r in rows], indent=1))


if __name__ == "__main__":
    main()
