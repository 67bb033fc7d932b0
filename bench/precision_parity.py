"""bf16 autocast against fp32 on this CPU: the same training run in both precisions, side by side in one process.

Two ``TrainingRun``s with the same config and seed, one with ``dtype="float32"`` and one with ``dtype="bfloat16"``,
take their optimizer steps alternately (fp32 step 1, bf16 step 1, fp32 step 2, ...), so a change in the machine's
load slows both alike; each step is timed. Then both adapters are scored on the same held-out split in fp32 (the
adapter's quality, not the scorer's rounding) and, for the bf16 run, also under bf16 autocast (what ``--dtype auto``
would evaluate with). Reported: median step time of each precision and their ratio, held-out loss of each and the
relative difference (issue 16 asks for under 1%), and the probe's fp32 / bf16 matmul GFLOP/s.

    python bench/precision_parity.py --task alpaca --steps 30 --threads 1
    python bench/precision_parity.py --task sst2 --steps 150 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = {
    # SmolLM2-135M, LoRA on q/v, Alpaca sample (86 held-out records, never trained on)
    "alpaca": dict(model="smollm2-135m", data=str(DATA / "instruct" / "alpaca_sample_1727.json"), batch_size=4, lr=2e-4,
                   dropout=0.0, eval_batch_size=8),
    # MiniLM-L6, LoRA all-linear r=16, SST-2 (first 300 dev sentences)
    "sst2": dict(model="minilm-l6", data=str(DATA / "glue" / "SST-2"), batch_size=32, lr=8e-4, r=16, alpha=32.0,
                 target_modules="all-linear", dropout=0.0, max_eval_examples=300, eval_batch_size=64),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="alpaca")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from peftkit.device import Precision, cpu_probe
    from peftkit.train import TrainConfig, TrainingRun

    torch.set_num_threads(args.threads)
    probe = cpu_probe(measure_without_flags=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="precision_parity-") as tmp:
        for dtype in ("float32", "bfloat16"):
            config = TrainConfig(**TASKS[args.task], max_steps=args.steps, seed=0, device="cpu", dtype=dtype,
                                 out=str(Path(tmp) / dtype), eval_every=0, save_every=0, num_samples=0)
            runs[dtype] = TrainingRun(config, progress=False)
        times: dict[str, list[float]] = {d: [] for d in runs}
        losses: dict[str, list[float]] = {d: [] for d in runs}
        for step in range(args.steps):
            for dtype, run in runs.items():
                start = time.perf_counter()
                loss, _, _ = run.train_step()
                times[dtype].append(time.perf_counter() - start)
                losses[dtype].append(loss)
            print(f"step {step + 1}: " + ", ".join(f"{d} {times[d][-1]:.2f} s loss {losses[d][-1]:.4f}" for d in runs),
                  file=sys.stderr, flush=True)
        scores = {}
        fp32 = Precision(torch.float32, "scoring")
        for dtype, run in runs.items():
            own = run.task.precision
            run.task.precision = fp32
            scores[dtype] = run.evaluate()
            if own.dtype != torch.float32:
                run.task.precision = own
                scores[dtype + "_own_precision"] = run.evaluate()
    median = {d: statistics.median(t[1:]) for d, t in times.items()}  # the first step warms up
    rel = (scores["bfloat16"]["loss"] - scores["float32"]["loss"]) / scores["float32"]["loss"]
    result = {
        "task": args.task, "steps": args.steps, "threads": args.threads, "cpu": probe.model, "flags": probe.flags,
        "probe_fp32_gflops": probe.fp32_gflops, "probe_bf16_gflops": probe.bf16_gflops,
        "median_step_s": median, "bf16_speedup": median["float32"] / median["bfloat16"],
        "final_train_loss": {d: v[-1] for d, v in losses.items()}, "eval": scores, "eval_loss_rel_diff": rel,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
