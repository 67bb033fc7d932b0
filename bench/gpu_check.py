"""The GPU check's comparisons with HF PEFT, each part in its own process under a time cap; one table, one JSON.

Parts (bench/gpu_parts.py): ``train`` (LoRA training tokens/s in bf16 against HF PEFT + Trainer, held-out loss),
``qlora`` (QLoRA peak GPU memory and step time against HF PEFT + bitsandbytes), ``decode`` (mixed-adapter decode of
32 rows over 32 adapters against the base and HF PEFT), and ``plan`` (``peftkit plan``'s peak against the measured
one). A part that fails or runs past its cap is reported as such
and the others still run. ``--dry-run`` runs every part on the CPU with a tiny model and one or two steps.

    python bench/gpu_check.py [--dry-run] [--json bench/results/gpu_check.json] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# part: (seconds cap on the GPU, keyword arguments full size, keyword arguments of the dry run)
PARTS = {
    "train": (150, dict(steps=30, batch=8, seq=512), dict(steps=2, batch=2, seq=16)),
    "qlora": (110, dict(steps=10, batch=4, seq=512), dict(steps=2, batch=2, seq=16)),
    "decode": (80, dict(rounds=30), dict(rounds=2)),
    "plan": (40, dict(batch=8, seq=512), dict(batch=2, seq=16)),
}


def run_part(name: str, args: argparse.Namespace) -> dict:
    cap, full, tiny = PARTS[name]
    kwargs = tiny if args.dry_run else full
    cmd = [sys.executable, __file__, "--child", name, "--device", args.device, "--size", "tiny" if args.dry_run else "full",
           "--kwargs", json.dumps(kwargs)]  # fmt: skip
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=cap * (3 if args.dry_run else 1))
    except subprocess.TimeoutExpired:
        return {"part": name, "error": f"ran past its {cap} s cap"}
    if out.returncode:
        return {"part": name, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
                "stderr_tail": out.stderr[-3000:]}  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def table(results: dict[str, dict]) -> str:
    rows = ["| comparison | peftkit | HF PEFT | ratio |", "|---|---|---|---|"]
    t, q, d = results.get("train", {}), results.get("qlora", {}), results.get("decode", {})
    for name, r in results.items():
        if isinstance(r.get("error"), str):
            rows.append(f"| {name} | failed: {r['error']} | | |")
    if "speedup" in t:
        rows.append(f"| (a) LoRA training tokens/s, {t['params'] / 1e9:.2f}B Llama, {t['batch']}x{t['seq']} | "
                    f"{t['peftkit_tokens_per_s']:,.0f} | {t['hf_tokens_per_s']:,.0f} | {t['speedup']:.2f}x (paired median) |")
        rows.append(f"| (a) held-out loss after {t['steps']} steps | {t['peftkit_held_out_loss']:.4f} | "
                    f"{t['hf_held_out_loss']:.4f} | |")  # fmt: skip
    if "step_time_ratio" in q:
        if q.get("peftkit_peak_mib") is not None:
            rows.append(f"| (b) QLoRA peak GPU memory (MiB) | {q['peftkit_peak_mib']:,.0f} | {q['hf_peak_mib']:,.0f} | "
                        f"{q['peftkit_peak_mib'] / q['hf_peak_mib']:.2f}x |")  # fmt: skip
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        rows.append(f"| (b) QLoRA step time (ms) | {1e3 * med(q['peftkit_step_s']):.1f} | {1e3 * med(q['hf_step_s']):.1f} | "
                    f"{q['step_time_ratio']:.2f}x (paired median) |")  # fmt: skip
    if "median_ms" in d:
        ms = d["median_ms"]
        rows.append(f"| (c) mixed decode {d['rows']} rows / {d['adapters']} adapters, ms (base {ms['base']:.2f}) | "
                    f"{ms['peftkit']:.2f} ({d['peftkit_over_base']:.2f}x base) | {ms['hf']:.2f} ({d['hf_over_base']:.2f}x base) | "
                    f"{ms['peftkit'] / ms['hf']:.2f}x |")  # fmt: skip
    p = results.get("plan", {})
    if "relative_error" in p:
        rows.append(f"| peftkit plan vs measured peak, LoRA {p['batch']}x{p['seq']} {p['dtype']} (MiB) | "
                    f"measured {p['measured_peak_mib']:,.0f} | planned {p['planned_peak_mib']:,.0f} | {100 * p['relative_error']:+.1f}% |")  # fmt: skip
    return "\n".join(rows)


def machine(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_mib"] = torch.cuda.get_device_properties(device).total_memory // 2**20
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, one or two steps of each part")
    parser.add_argument("--device", help="default cuda (cpu with --dry-run)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gpu_check.json")
    parser.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=["full", "tiny"], help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.child:
        sys.path.insert(0, str(Path(__file__).parent))
        import gpu_parts

        fn = {"train": gpu_parts.part_train, "qlora": gpu_parts.part_qlora, "decode": gpu_parts.part_decode,
              "plan": gpu_parts.part_plan}[args.child]  # fmt: skip
        print(json.dumps(fn(args.device, args.size, **json.loads(args.kwargs))))
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device visible to torch; run with --dry-run for the CPU rehearsal")
    results = {}
    for name in args.parts:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_part(name, args)
    text = table(results)
    print(text)
    report = {"dry_run": args.dry_run, "machine": machine(args.device), "results": results, "table": text}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.json)
    print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any(isinstance(r.get("error"), str) for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
