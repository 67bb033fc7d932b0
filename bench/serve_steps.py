"""Where a server's time goes against its decode bound: step times, then one load served in process and over HTTP.

On the real SmolLM2-135M with serve_load.py's LoRA adapters (serve_adapters.py: four shapes, random non-zero B),
all attached before anything is timed (no on-demand loads), in the server's own registry (slots for 16):

1. Step times, in interleaved rounds (one of each variant per round; medians over rounds of each round's median):
   a plain decode step of B rows (the bound's step: serve_baselines.decode_bound's path, the argmax and host transfer
   included) and a fused step (B - 2 running rows plus 2 newcomers' whole prompts in one forward: serve/fused.py),
   each with one adapter (lora-000: q/v, rank 8, what serve_load.py's 1-adapter load serves), one all-linear adapter
   (lora-003) and 12 adapters of the four shapes mixed. What mixing adapters costs a step, apart from all else.
2. The same closed-loop load (C workers take R requests each from one queue, greedy, max_tokens T; one adapter,
   then the 12 mixed) served twice, in interleaved rounds: by the scheduler in this process (no HTTP, a finished
   request's worker sends its next at once) and by a `peftkit serve` process through the official openai client
   (serve_clients.py, as serve_load.py does; every adapter loaded by a warm-up request first, budget 16, so no
   on-demand load happens while timed). Reported: tokens/s of both, the in-process one against the bound with
   prefill (serve_report.with_prefill, from part 1's plain step of the same adapters and one prefill of B
   prompts), and the in-process steps split into plain and fused ones (count, median ms, mean decode rows). The
   difference between the two is what HTTP and the client processes cost; serve_load.py's 64- and 512-adapter
   loads add on-demand loads on top.
3. What one on-demand load costs the scheduler's thread, by the path residency.py takes (interleaved rounds, in
   the registry at its budget of 16): a new adapter taking an evicted one's key, layers and slot when both have one
   layout (AdapterRegistry.replace: a refill in place), or the victim detached and the new one attached (another
   layout); and the first decode step of B rows after the load against the next steps (what the layers' stacks
   cost to catch up).

    python bench/serve_steps.py --out bench/results          # about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import peftkit as pk  # noqa: E402
from report import write_report  # noqa: E402
from serve_adapters import chat_ids, write_lora_adapters  # noqa: E402
from serve_clients import ServerProcess, run_load  # noqa: E402
from serve_load import PROMPTS, cpu_name  # noqa: E402
from serve_report import with_prefill  # noqa: E402
from peftkit.serve.batch import KVBatch, left_pad  # noqa: E402
from peftkit.serve.fused import FusedLayout, flat_step  # noqa: E402
from peftkit.serve.registry import AdapterRegistry, read_adapter  # noqa: E402
from peftkit.serve.sampling import SamplingParams  # noqa: E402
from peftkit.serve.scheduler import Scheduler  # noqa: E402
from peftkit.serve.sequence import Sequence  # noqa: E402
from peftkit.serve.command import tune_blas  # noqa: E402

from peftkit import kernels  # noqa: E402

# part 1's last variant: the 12 mixed adapters again, each LoRA layer's rows gathered in PyTorch instead of
# read in place by the compiled kernel (peftkit.kernels), to show what the kernel saves
GATHERED = "12 adapters mixed, PyTorch gather (PEFTKIT_CPU_KERNELS=0)"

tune_blas()  # MKL's dispatch as `peftkit serve` sets it, before any matrix product: the bound and baselines alike


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for serve_steps.json/.md/.png")
    parser.add_argument("--rows", type=int, default=16, help="rows of a step, and the scheduler's batch size (B)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of part 1")
    parser.add_argument("--steps", type=int, default=12, help="steps timed per variant and round (the first 2 are warm-up)")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop workers of part 2 (C)")
    parser.add_argument("--requests", type=int, default=8, help="requests per worker in part 2 (R)")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request in part 2 (T)")
    parser.add_argument("--load-rounds", type=int, default=2, help="interleaved rounds of part 2 (in process, over HTTP)")
    parser.add_argument("--swap-rounds", type=int, default=8, help="interleaved rounds of part 3 (one load per path each)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--model", default="smollm2-135m", help="base model (a name or folder; the figures are for the default)")
    return parser.parse_args(argv)


def plain_step_ms(registry: AdapterRegistry, prompts: list[list[int]], names: list[str], steps: int) -> float:
    """Median ms of a decode step of len(names) rows after their prompts' prefill (the bound's step)."""
    ids, mask = left_pad([prompts[i % len(prompts)] for i in range(len(names))], registry.pad_id)
    times = []
    cache = registry.new_cache()
    logits, cache_mask = registry.prefill(ids, mask, cache, names)
    batch = KVBatch(cache, cache_mask, cache_mask.sum(dim=1))
    for _ in range(steps):
        start = time.perf_counter()
        tokens = logits.argmax(dim=-1, keepdim=True)
        tokens.tolist()
        logits = registry.forward(input_ids=tokens, cache=batch.cache, adapter_names=names, **batch.step_inputs())
        batch.advance()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def fused_step_ms(registry: AdapterRegistry, prompts: list[list[int]], names: list[str], newcomers: list[str],
                  steps: int) -> tuple[float, int]:
    """Median ms of a fused step: len(names) running rows' decode tokens and each newcomer's whole prompt (fresh
    newcomers every step, as the scheduler builds it); and the prompt tokens per step."""
    ids, mask = left_pad([prompts[i % len(prompts)] for i in range(len(names))], registry.pad_id)
    fresh = [prompts[(i + 5) % len(prompts)] for i in range(len(newcomers))]
    lengths = [len(p) for p in fresh]
    cache = registry.new_cache()
    logits, cache_mask = registry.prefill(ids, mask, cache, names)
    batch = KVBatch(cache, cache_mask, cache_mask.sum(dim=1))
    flat_names = names + [n for n, length in zip(newcomers, lengths) for _ in range(length)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tokens = logits[: len(names)].argmax(dim=-1).tolist()
        flat, positions, _, keep = flat_step(tokens, batch.lengths, fresh, [(0, 0)] * len(fresh), registry.pad_id)
        layout = FusedLayout(len(names), batch.cache, batch.step_inputs()["attention_mask"], lengths,
                             [registry.new_cache() for _ in newcomers])
        logits = registry.fused_forward(flat, positions, layout, flat_names, keep)
        batch.advance()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3, sum(lengths)


def prefill_ms(registry: AdapterRegistry, prompts: list[list[int]], names: list[str]) -> float:
    """One prefill of len(names) prompts, as the bound prefills a group of newcomers."""
    ids, mask = left_pad([prompts[i % len(prompts)] for i in range(len(names))], registry.pad_id)
    start = time.perf_counter()
    registry.prefill(ids, mask, registry.new_cache(), names)
    return (time.perf_counter() - start) * 1e3


def scheduler_run(registry: AdapterRegistry, tok, jobs: list[tuple[str, str]], args) -> dict:
    """The closed-loop load on a Scheduler driven from this thread: every step timed, split by kind."""
    scheduler = Scheduler(registry, max_batch_size=args.rows, max_queue=4 * args.rows)
    queue = [(adapter, chat_ids(tok, prompt)) for adapter, prompt in jobs]
    finished: list[int] = []  # one entry per request ended since the loop last looked
    answered: list[Sequence] = []
    ended = 0

    def send() -> None:
        if queue:
            adapter, prompt = queue.pop(0)
            seq = Sequence(adapter, prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0.0), tok,
                           lambda event: finished.append(1) if event.kind in ("finish", "error") else None)
            answered.append(seq)
            scheduler.submit(seq)

    for _ in range(args.clients):
        send()
    plain, fused = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        while ended < len(jobs):
            before = dict(scheduler.stats)
            step_start = time.perf_counter()
            scheduler.step()
            took = time.perf_counter() - step_start
            rows = scheduler.stats["decode_rows"] - before["decode_rows"]
            if scheduler.stats["decode_steps"] > before["decode_steps"]:
                (fused if scheduler.stats["fused"] > before["fused"] else plain).append((took, rows))
            while finished:  # each worker sends its next request as soon as its last one ends
                finished.pop()
                ended += 1
                send()
    wall = time.perf_counter() - start
    tokens = sum(len(s.output_ids) for s in answered)
    errors = [s for s in answered if s.finish_reason not in ("stop", "length")]
    assert not errors, f"{len(errors)} request(s) failed in process: {[s.finish_reason for s in errors][:3]}"

    def kind(steps: list[tuple[float, int]]) -> dict:
        return {"steps": len(steps), "median_ms": statistics.median(t for t, _ in steps) * 1e3 if steps else None,
                "mean_rows": statistics.mean(r for _, r in steps) if steps else None, "total_s": sum(t for t, _ in steps)}

    return {"wall_s": wall, "tokens": tokens, "requests": len(answered), "tokens_per_s": tokens / wall,
            "prompt_tokens": scheduler.stats["prefill_tokens"], "decode_steps": scheduler.stats["decode_steps"],
            "decode_rows": scheduler.stats["decode_rows"], "plain": kind(plain), "fused": kind(fused)}


def http_run(server: ServerProcess, jobs: list[tuple[str, str]], args) -> dict:
    """The same load through HTTP: client c's i-th request is jobs[i * C + c], so the workers' shared queue takes
    them in the order the in-process run sends them."""
    plan = [jobs[c :: args.clients] for c in range(args.clients)]
    records, wall = run_load(server.url, plan, args.max_tokens, timeout=1800)
    failed = [r["error"] for r in records if r["error"] is not None]
    assert not failed and len(records) == len(jobs), f"{len(failed)} request(s) failed over HTTP: {failed[:3]}"
    tokens = sum(r["tokens"] for r in records)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_ttft_s": statistics.median(r["ttft"] for r in records)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = pk.load_model(args.model)
    model.eval()
    registry = AdapterRegistry(model, tok, args.model, slot_capacity=16)
    tmp = Path(tempfile.mkdtemp(prefix="serve-steps-"))  # (the server process reads the adapters from here)
    try:
        names = write_lora_adapters(model, tmp, 16 + 2 * args.swap_rounds, seed=0)
        names, spare = names[:16], names[16:]  # (adapter i has shape i % 4: serve_adapters.LORA_SHAPES)
        for name in names:
            registry.attach(name, *read_adapter(tmp / name), str(tmp / name))
        steps, prompt_tokens = step_times(registry, tok, names, args)
        runs = load_runs(registry, tok, names, tmp, steps, args)
        swaps = load_costs(registry, tok, names, spare, tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "kernels": kernels.status(),
              "prompt_tokens_per_fused_step": prompt_tokens,
              "args": {k: str(v) for k, v in vars(args).items()}, "steps": steps, "runs": runs, "swaps": swaps}
    write_report(args.out, "serve_steps", report, markdown(report), lambda path: plot(report, path))
    return 0


def step_times(registry: AdapterRegistry, tok, names: list[str], args) -> tuple[dict, int]:
    """Part 1: per variant, the medians over rounds of plain step, fused step and prefill (ms), with every round's
    figures; and the prompt tokens of a fused step."""
    b, prompts = args.rows, [chat_ids(tok, p) for p in PROMPTS]
    variants = {"one adapter (q/v, r 8)": [names[0]], "one all-linear adapter (r 8)": [names[3]],
                "12 adapters mixed": names[:12], GATHERED: names[:12]}
    rows = {label: [chosen[i % len(chosen)] for i in range(b)] for label, chosen in variants.items()}
    newcomers = {label: [names[(12 + k) % 16] if len(chosen) > 1 else chosen[0] for k in range(2)]
                 for label, chosen in variants.items()}
    rounds: dict[str, dict[str, list[float]]] = {label: {"plain": [], "fused": [], "prefill": []} for label in variants}
    prompt_tokens = 0
    setting = os.environ.get("PEFTKIT_CPU_KERNELS", "1")
    with torch.inference_mode():
        for r in range(args.rounds):
            for label in variants:
                os.environ["PEFTKIT_CPU_KERNELS"] = "0" if label == GATHERED else setting  # (read by every layer call)
                rounds[label]["plain"].append(plain_step_ms(registry, prompts, rows[label], args.steps))
                ms, prompt_tokens = fused_step_ms(registry, prompts, rows[label][: b - 2], newcomers[label], args.steps)
                rounds[label]["fused"].append(ms)
                rounds[label]["prefill"].append(prefill_ms(registry, prompts, rows[label]))
            print(f"round {r + 1}: " + "; ".join(f"{k}: plain {v['plain'][-1]:.0f} ms, fused {v['fused'][-1]:.0f} ms"
                                                 for k, v in rounds.items()), flush=True)
    os.environ["PEFTKIT_CPU_KERNELS"] = setting
    steps = {label: {k: statistics.median(v) for k, v in figures.items()} | {"per_round": figures}
             for label, figures in rounds.items()}
    return steps, prompt_tokens


def load_runs(registry: AdapterRegistry, tok, names: list[str], folder: Path, steps: dict, args) -> dict:
    """Part 2: per load, its in-process and HTTP runs (interleaved rounds), the in-process ones against the bound."""
    b = args.rows
    loads = {"one adapter (q/v, r 8)": [names[0]], "12 adapters mixed": names[:12]}
    jobs = {label: [(adapters[i % len(adapters)], PROMPTS[i % len(PROMPTS)]) for i in range(args.clients * args.requests)]
            for label, adapters in loads.items()}
    server = ServerProcess(args.model, folder, folder / "server.log", max_batch=b, max_queue=4 * b, threads=args.threads,
                           max_adapters=16, dtype="float32")
    runs: dict[str, dict] = {label: {"in_process": [], "http": []} for label in loads}
    try:
        server.wait_ready()
        run_load(server.url, [[(name, PROMPTS[0])] for name in names], 1, timeout=600)  # every adapter loaded
        for r in range(args.load_rounds):
            for label in loads:
                runs[label]["in_process"].append(scheduler_run(registry, tok, jobs[label], args))
                runs[label]["http"].append(http_run(server, jobs[label], args))
                print(f"round {r + 1}, {label}: {runs[label]['in_process'][-1]['tokens_per_s']:.1f} tokens/s in "
                      f"process, {runs[label]['http'][-1]['tokens_per_s']:.1f} over HTTP", flush=True)
    finally:
        server.stop()
    for label, both in runs.items():
        bound = {"rows": b, "step_ms": steps[label]["plain"], "prefill_ms": steps[label]["prefill"]}
        for run in both["in_process"]:
            run["bound_with_prefill"] = with_prefill(bound, run["tokens"] / run["requests"])
            run["of_bound"] = run["tokens_per_s"] / run["bound_with_prefill"]
        both["http_of_in_process"] = statistics.median(h["tokens_per_s"] / i["tokens_per_s"]
                                                       for h, i in zip(both["http"], both["in_process"]))
    return runs


REFILL, ATTACH = "refill in place (same layout)", "detach + attach (another layout)"


def load_costs(registry: AdapterRegistry, tok, names: list[str], spare: list[str], folder: Path, args) -> dict:
    """Part 3: per path, each round's load (ms on the scheduler's thread, the folder already read) and its first
    decode step's extra time over the median of the next three."""
    prompts, b = [chat_ids(tok, p) for p in PROMPTS], args.rows
    resident, out = list(names), {REFILL: {"load_ms": [], "first_step_extra_ms": []},
                                  ATTACH: {"load_ms": [], "first_step_extra_ms": []}}
    for r in range(args.swap_rounds):
        for path, new in ((REFILL, spare[2 * r]), (ATTACH, spare[2 * r + 1])):
            shape = int(new.rsplit("-", 1)[1]) % 4
            # the least recently loaded resident adapter of the new one's shape (refill) or of another one (attach)
            victim = next(n for n in resident if (int(n.rsplit("-", 1)[1]) % 4 == shape) == (path == REFILL))
            others = [n for n in resident if n != victim]
            rows = [victim] + [others[i % len(others)] for i in range(b - 1)]
            with torch.inference_mode():
                ids, mask = left_pad([prompts[i % len(prompts)] for i in range(b)], registry.pad_id)
                cache = registry.new_cache()
                logits, cache_mask = registry.prefill(ids, mask, cache, rows)
                batch = KVBatch(cache, cache_mask, cache_mask.sum(dim=1))
            config, tensors = read_adapter(folder / new)
            start = time.perf_counter()
            if path == REFILL:
                assert registry.replace(victim, new, config, tensors, str(folder / new)) is not None
            else:
                registry.detach(victim)
                registry.attach(new, config, tensors, str(folder / new))
            out[path]["load_ms"].append((time.perf_counter() - start) * 1e3)
            resident = [n for n in resident if n != victim] + [new]
            rows[0] = new
            times = []
            with torch.inference_mode():
                for _ in range(4):
                    start = time.perf_counter()
                    tokens = logits.argmax(dim=-1, keepdim=True)
                    logits = registry.forward(input_ids=tokens, cache=batch.cache, adapter_names=rows, **batch.step_inputs())
                    batch.advance()
                    times.append((time.perf_counter() - start) * 1e3)
            out[path]["first_step_extra_ms"].append(times[0] - statistics.median(times[1:]))
        print(f"round {r + 1}: " + "; ".join(f"{k}: load {v['load_ms'][-1]:.1f} ms, first step +"
                                             f"{v['first_step_extra_ms'][-1]:.1f} ms" for k, v in out.items()), flush=True)
    return {path: figures | {"median_load_ms": statistics.median(figures["load_ms"]),
                             "median_first_step_extra_ms": statistics.median(figures["first_step_extra_ms"])}
            for path, figures in out.items()}


def markdown(report: dict) -> str:
    lines = [f"CPU: {report['cpu']}, {report['threads']} torch threads, torch {report['torch']}; "
             f"{report.get('kernels', 'before the CPU kernel')}.", "",
             f"| adapters | plain {report['args']['rows']}-row step (ms) | fused step: {int(report['args']['rows']) - 2} rows + "
             f"{report['prompt_tokens_per_fused_step']} prompt tokens (ms) | prefill of {report['args']['rows']} prompts (ms) |",
             "|---|---|---|---|"]
    for label, s in report["steps"].items():
        lines.append(f"| {label} | {s['plain']:.1f} | {s['fused']:.1f} | {s['prefill']:.0f} |")
    lines += ["", "| load | round | in process: tokens/s | of bound with prefill | plain steps x mean rows, median ms | "
              "fused steps x mean rows, median ms | over HTTP: tokens/s | p50 TTFT (s) |", "|---|---|---|---|---|---|---|---|"]

    def kind(k: dict) -> str:
        return f"{k['steps']} x {k['mean_rows']:.1f}, {k['median_ms']:.0f}" if k["steps"] else "none"

    for label, both in report["runs"].items():
        for r, (i, h) in enumerate(zip(both["in_process"], both["http"])):
            lines.append(f"| {label} | {r + 1} | {i['tokens_per_s']:.1f} | {i['of_bound']:.0%} | {kind(i['plain'])} | "
                         f"{kind(i['fused'])} | {h['tokens_per_s']:.1f} | {h['p50_ttft_s']:.2f} |")
    lines += ["", "Over HTTP against in process (median of the rounds' ratios): " + "; ".join(
        f"{label}: {both['http_of_in_process']:.2f}x" for label, both in report["runs"].items()) + "."]
    if "swaps" in report:
        lines += ["", f"| an on-demand load, by path ({len(next(iter(report['swaps'].values()))['load_ms'])} rounds) | "
                  "load on the scheduler's thread, median ms | first decode step after it, extra ms (median) |",
                  "|---|---|---|"]
        lines += [f"| {path} | {f['median_load_ms']:.1f} | {f['median_first_step_extra_ms']:+.1f} |"
                  for path, f in report["swaps"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from report import panels, save_figure

    fig, (ax,) = panels(1, width=7.0)
    labels = list(report["steps"])
    for k, (kind, color) in enumerate((("plain", "tab:blue"), ("fused", "tab:orange"))):
        ax.bar([i + 0.4 * k for i in range(len(labels))], [report["steps"][l][kind] for l in labels], 0.4,
               color=color, label=f"{kind} step")
    ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("ms (median)")
    ax.set_title("A serving step by adapters mixed (SmolLM2-135M, CPU)")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
