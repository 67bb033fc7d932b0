"""What reading an adapter file on another thread costs a server's decoding: safetensors' reader against peftkit's.

A server reads each adapter it loads on demand on a worker thread (serve/registry.read_adapter) while its scheduler
thread decodes. Both need Python's GIL, and the scheduler gives it up and takes it back around every torch op, so
whatever the reader does while holding the GIL stalls the decoding; its CPU work competes for the cores as well.

On the real SmolLM2-135M with serve_load.py's LoRA adapters (serve_adapters.py: four shapes, 1.3-9.8 MB files), in
the server's registry (slots for 16), decode steps of B rows over 12 mixed adapters are timed in interleaved rounds:
with no reader, with a thread reading one adapter file every 30 ms through safetensors.torch.load (what peftkit
used before; with the checksum peftkit verifies), and through peftkit.checkpoint.load_tensors(views=True) (the
file read once without the GIL, each tensor a view: peftkit/safetensors_views.py). Reported per reader: decode ms
lost per file read (each round's reader time minus that round's no-reader time, over the reads it made; the median
of rounds); the read's own time per file, without decoding; and the longest stretch for which a thread that
wakes every 0.5 ms waited for the GIL during a read (how long the reader held it at a time).

    python bench/adapter_reads.py --out bench/results          # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import load as library_load  # noqa: E402

import peftkit as pk  # noqa: E402
from report import write_report  # noqa: E402
from serve_adapters import chat_ids, write_lora_adapters  # noqa: E402
from serve_load import PROMPTS, cpu_name  # noqa: E402
from peftkit import checkpoint  # noqa: E402
from peftkit.serve.batch import KVBatch, left_pad  # noqa: E402
from peftkit.serve.command import tune_blas  # noqa: E402
from peftkit.serve.registry import AdapterRegistry, read_adapter  # noqa: E402


def library_read(path: Path) -> None:
    raw = path.read_bytes()
    dict(sorted(library_load(raw).items()))
    checkpoint.checksum_status(raw, path)


def views_read(path: Path) -> None:
    checkpoint.load_tensors(path, views=True)


READERS = {"safetensors.torch.load": library_read, "peftkit views": views_read}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for adapter_reads.json/.md/.png")
    parser.add_argument("--rows", type=int, default=16, help="rows of each decode step")
    parser.add_argument("--steps", type=int, default=24, help="decode steps per variant and round")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (no reader, then each reader)")
    parser.add_argument("--period", type=float, default=0.03, help="seconds between two reads of the reader thread")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--model", default="smollm2-135m", help="base model (a name or folder; the figures are for the default)")
    return parser.parse_args(argv)


class Reader(threading.Thread):
    """Reads the files one after another, ``period`` apart, through the reader ``mode`` names (none: idle)."""

    def __init__(self, files: list[Path], period: float) -> None:
        super().__init__(daemon=True)
        self.files, self.period, self.mode, self.reads = files, period, None, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        at = 0
        while not self.stopped.is_set():
            mode = self.mode
            if mode is not None:
                READERS[mode](self.files[at % len(self.files)])
                at += 1
                self.reads += 1
            time.sleep(self.period)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tune_blas()
    torch.set_num_threads(args.threads)
    model, tok = pk.load_model(args.model)
    model.eval()
    registry = AdapterRegistry(model, tok, args.model, slot_capacity=16)
    tmp = Path(tempfile.mkdtemp(prefix="adapter-reads-"))
    try:
        names = write_lora_adapters(model, tmp, 16 + 40, seed=0)
        for name in names[:16]:
            registry.attach(name, *read_adapter(tmp / name), str(tmp / name))
        files = [tmp / name / checkpoint.WEIGHTS_NAME for name in names[16:]]
        sizes = sorted({round(os.path.getsize(f) / 1e6, 1) for f in files})
        read_ms, held_ms = read_alone(files)
        lost = decode_lost(registry, tok, names[:12], files, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
              "file_mb": sizes,
              "args": {k: str(v) for k, v in vars(args).items()},
              "read_ms": read_ms, "gil_held_ms": held_ms, "decode": lost}
    write_report(args.out, "adapter_reads", report, markdown(report), lambda path: plot(report, path))
    return 0


def read_alone(files: list[Path]) -> tuple[dict[str, float], dict[str, float]]:
    """Per reader, the median ms of one file's read, and the median over reads of the longest time a thread that
    wakes every 0.5 ms waited for the GIL during the read (how long the reader held it at a stretch)."""
    gaps: list[float] = []
    stop = threading.Event()

    def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.0005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    took: dict[str, list[float]] = {mode: [] for mode in READERS}
    held: dict[str, list[float]] = {mode: [] for mode in READERS}
    try:
        for _ in range(3):
            for path in files:
                for mode, read in READERS.items():
                    seen, start = len(gaps), time.perf_counter()
                    read(path)
                    took[mode].append((time.perf_counter() - start) * 1e3)
                    held[mode].append(max(gaps[seen:], default=0.0) * 1e3)
    finally:
        stop.set()
        thread.join()
    return ({mode: statistics.median(v) for mode, v in took.items()},
            {mode: statistics.median(v) for mode, v in held.items()})


def decode_lost(registry: AdapterRegistry, tok, mixed: list[str], files: list[Path], args) -> dict:
    """Per variant, each round's (ms of ``args.steps`` decode steps, reads made meanwhile)."""
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    rows = [mixed[i % len(mixed)] for i in range(args.rows)]
    ids, mask = left_pad([prompts[i % len(prompts)] for i in range(len(rows))], registry.pad_id)
    reader = Reader(files, args.period)
    reader.start()
    rounds: dict[str, list[tuple[float, int]]] = {"no reader": [], **{mode: [] for mode in READERS}}
    try:
        with torch.inference_mode():
            for _ in range(args.rounds):
                for variant in rounds:
                    reader.mode = None if variant == "no reader" else variant
                    cache = registry.new_cache()
                    logits, cache_mask = registry.prefill(ids, mask, cache, rows)
                    batch = KVBatch(cache, cache_mask, cache_mask.sum(dim=1))
                    reads, start = reader.reads, time.perf_counter()
                    for _ in range(args.steps):
                        tokens = logits.argmax(dim=-1, keepdim=True)
                        tokens.tolist()
                        logits = registry.forward(input_ids=tokens, cache=batch.cache, adapter_names=rows,
                                                  **batch.step_inputs())
                        batch.advance()
                    rounds[variant].append(((time.perf_counter() - start) * 1e3, reader.reads - reads))
    finally:
        reader.mode = None
        reader.stopped.set()
        reader.join()
    base = [ms for ms, _ in rounds["no reader"]]
    out = {"rounds": rounds, "no_reader_step_ms": statistics.median(base) / args.steps}
    for mode in READERS:
        per_read = [(ms - b) / max(1, n) for (ms, n), b in zip(rounds[mode], base)]
        out[mode] = {"lost_ms_per_read": statistics.median(per_read), "per_round": per_read}
    return out


def markdown(report: dict) -> str:
    d = report["decode"]
    lines = [f"{report['args']['rows']} decode rows of 12 mixed LoRA adapters on {report['args']['model']}, {report['threads']} torch "
             f"threads, {report['cpu']}, {report['args']['rounds']} interleaved rounds of {report['args']['steps']} steps; "
             f"adapter files of {', '.join(map(str, report['file_mb']))} MB read in turn; "
             f"a decode step without a reader: {d['no_reader_step_ms']:.0f} ms (median of rounds)", "",
             "| reader | decode ms lost per file read (median of rounds) | the read alone (ms, median) | "
             "longest GIL hold in a read (ms, median) |", "|---|---|---|---|"]
    for mode in READERS:
        lines.append(f"| {mode} | {d[mode]['lost_ms_per_read']:.1f} | {report['read_ms'][mode]:.1f} | "
                     f"{report['gil_held_ms'][mode]:.1f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    modes = list(READERS)
    ax.bar(modes, [report["decode"][m]["lost_ms_per_read"] for m in modes], color=["tab:gray", "tab:blue"])
    ax.set_ylabel("decode ms lost per adapter read")
    ax.set_title(f"Reading adapters beside decoding ({report['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
