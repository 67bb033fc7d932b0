"""What the server is compared with: the bound set by its own batch decode step, and an HF-PEFT-style baseline.

The bound (:func:`decode_bound`): B rows, with the adapters of the load's first B requests, prefilled and then
decoded through the server's own path (``AdapterRegistry.prefill``/``forward`` on a ``KVBatch``, argmax and the
host transfer of the tokens included), untimed until the context reaches the load's typical length (prompt +
half of max_tokens), then ``steps`` steps timed one by one. Bound tokens/s = B / median step time: what the server
would reach if every step were a full decode step (no prefill, no HTTP, no idle rows). It is measured before and
after each load's runs and the medians are taken over both (:func:`combine_bounds`). The prefill of the B
prompts (one forward, as the server prefills a group of newcomers) is timed too: with T tokens generated per request,
B * T / (prefill + T * step) is the bound once every request's prompt has to be read as well.

The HF PEFT baseline (``python bench/serve_baselines.py SPEC OUT``, a child process so its peak RSS is its own):
transformers ``generate`` on a ``peft.PeftModel`` with ``adapter_names=`` (one adapter per row, LoRA only; under the
same autocast as the server), fed the
same closed-loop load as the server (its workers take requests from one shared queue). Batches form per arrival window: when the first waiting request arrived W ms
ago, up to B waiting requests go as one static batch that runs until its longest row ends; adapters are loaded into
the one PeftModel the first time a batch needs them and never evicted (HF PEFT has no budget), so its memory grows
with the adapters used. Time to first token: when the batch's first decode step runs (a logits processor notes
it). Clients of the baseline are simulated in its own loop (no HTTP), which only flatters it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def decode_bound(model, tok, adapters_dir: Path, rows: list[str], prompts: list[list[int]], typical_context: int,
                 steps: int, base_name: str, precision) -> tuple[dict, torch.nn.Module]:
    """Time ``steps`` decode steps of len(rows) rows through the server's registry; (figures, the plain model back)."""
    from peftkit.serve.batch import KVBatch, left_pad
    from peftkit.serve.registry import AdapterRegistry, read_adapter
    from peftkit.tuners.base import BASE

    registry = AdapterRegistry(model, tok, base_name, precision)
    names = [BASE if r == base_name else r for r in rows]
    for name in dict.fromkeys(n for n in names if n != BASE):
        config, tensors = read_adapter(adapters_dir / name)
        registry.attach(name, config, tensors, str(adapters_dir / name))
    ids, mask = left_pad([prompts[i % len(prompts)] for i in range(len(rows))], registry.pad_id, registry.device)
    times = []
    with torch.inference_mode():
        cache = registry.new_cache()
        start = time.perf_counter()
        logits, cache_mask = registry.prefill(ids, mask, cache, names)
        prefill_s = time.perf_counter() - start
        batch = KVBatch(cache, cache_mask, cache_mask.sum(dim=1))
        warm = max(1, typical_context - steps // 2 - int(batch.lengths.float().mean()))
        for step in range(warm + steps):
            start = time.perf_counter()
            tokens = logits.argmax(dim=-1, keepdim=True)
            tokens.tolist()  # the server's one host transfer per step
            logits = registry.forward(input_ids=tokens, cache=batch.cache, adapter_names=names, **batch.step_inputs())
            batch.advance()
            if step >= warm:
                times.append(time.perf_counter() - start)
    context = int(batch.lengths.float().mean()) - steps // 2
    for name in dict.fromkeys(n for n in names if n != BASE):
        registry.detach(name)
    figures = {"rows": len(rows), "distinct_adapters": len(set(names)), "context": context,
               "step_times_ms": [t * 1e3 for t in times], "prefill_times_ms": [prefill_s * 1e3], "prompt_tokens": int(mask.sum())}
    return figures, registry.model


def combine_bounds(first: dict, second: dict) -> dict:
    """One bound from two measurements of the same rows (before and after a load's runs, so drift of a shared
    machine shows and is averaged): medians over all their steps and prefills."""
    steps = first["step_times_ms"] + second["step_times_ms"]
    prefills = first["prefill_times_ms"] + second["prefill_times_ms"]
    step_ms = statistics.median(steps)
    return first | {"step_times_ms": steps, "prefill_times_ms": prefills, "steps": len(steps), "step_ms": step_ms,
                    "tokens_per_s": first["rows"] / (step_ms / 1e3), "prefill_ms": statistics.median(prefills),
                    "step_ms_before_after": [statistics.median(first["step_times_ms"]), statistics.median(second["step_times_ms"])]}


def run_hf_baseline(spec_path: Path, out_path: Path, timeout: float = 1800.0) -> dict:
    """Run the baseline in a child process on ``spec`` (written by the caller); its JSON result."""
    import subprocess

    log = out_path.with_suffix(".log")
    with log.open("w") as stderr:
        done = subprocess.run([sys.executable, __file__, str(spec_path), str(out_path)], stderr=stderr, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the HF PEFT baseline failed ({done.returncode}): {log.read_text()[-2000:]}")
    return json.loads(out_path.read_text())


def _hf_worker(spec: dict) -> dict:
    """The baseline itself (in the child): see the module docstring."""
    from peft import PeftModel
    from transformers import LogitsProcessor, LogitsProcessorList

    import peftkit as pk
    from peftkit.device import resolve_precision
    from peftkit.serve.command import tune_blas
    from serve_adapters import chat_ids, eos_ids

    tune_blas()  # as the servers it is compared with (serve_load.py, which starts it, sets it already)

    torch.set_num_threads(spec["threads"])
    model, tok = pk.load_model(spec["model"])
    model.eval()
    precision = resolve_precision(spec["dtype"], torch.device("cpu"))
    tok.padding_side = "left"
    eos = eos_ids(model, tok)
    folder = Path(spec["adapters_dir"])
    plan = [list(map(tuple, client)) for client in spec["plan"]]
    window, max_batch, max_tokens = spec["window_ms"] / 1e3, spec["max_batch"], spec["max_tokens"]

    class FirstStep(LogitsProcessor):  # called once per generated token: the first call is the first token
        def __init__(self) -> None:
            self.at = None

        def __call__(self, input_ids, scores):
            self.at = self.at or time.perf_counter()
            return scores

    from serve_clients import queue_order, reset_peak_rss

    reset = reset_peak_rss(os.getpid())  # as for the servers: the peak from here on, not the model load's
    peft_model, loaded, load_s = None, [], 0.0
    queue = queue_order(plan)  # the workers' shared queue, as the servers' load takes it (serve_clients.py)
    start = time.perf_counter()
    # each worker's request in flight (an index into queue, None once the queue is empty) and when it arrived
    current: list[int | None] = list(range(min(len(plan), len(queue))))
    taken = len(current)
    arrival = [start] * len(current)
    records, batches = [], []
    while any(j is not None for j in current):
        waiting = sorted((arrival[c], c) for c in range(len(current)) if current[c] is not None)
        close = waiting[0][0] + window  # arrivals happen only when a batch ends (closed loop): none during the wait
        time.sleep(max(0.0, close - time.perf_counter()))
        members = [c for _, c in waiting[:max_batch]]
        jobs = [queue[current[c]] for c in members]
        t_load = time.perf_counter()
        for name in dict.fromkeys(name for name, _ in jobs):
            if name not in loaded:
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, str(folder / name), adapter_name=name)
                else:
                    peft_model.load_adapter(str(folder / name), adapter_name=name)
                loaded.append(name)
        peft_model.eval()
        load_s += time.perf_counter() - t_load
        prompts = [chat_ids(tok, prompt) for _, prompt in jobs]
        width = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        first = FirstStep()
        with torch.inference_mode(), precision.autocast(torch.device("cpu")):
            gen = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=[n for n, _ in jobs],
                                      max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                                      pad_token_id=tok.pad_token_id, logits_processor=LogitsProcessorList([first]))
        end = time.perf_counter()
        batches.append(len(jobs))
        for row, c in enumerate(members):
            out = gen[row, width:].tolist()
            n = next((i + 1 for i, t in enumerate(out) if t in eos), len(out))
            name, prompt = jobs[row]
            records.append({"model": name, "prompt": prompt, "text": tok.decode(out[:n], skip_special_tokens=True),
                            "tokens": n, "error": None, "latency": end - arrival[c], "ttft": first.at - arrival[c]})
            arrival[c] = end
            current[c], taken = (taken, taken + 1) if taken < len(queue) else (None, taken)
    wall = time.perf_counter() - start
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    return {"records": records, "wall_s": wall, "adapter_loads": len(loaded), "adapter_load_s": load_s,
            "batches": len(batches), "mean_batch": sum(batches) / len(batches), "peak_rss_mib": hwm,
            "peak_rss_since": "run start" if reset else "process start"}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    spec_file, out_file = map(Path, sys.argv[1:3])
    out_file.write_text(json.dumps(_hf_worker(json.loads(spec_file.read_text()))))
