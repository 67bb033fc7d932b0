"""Load test of `peftkit serve` on the real SmolLM2-135M: mixed-adapter continuous batching vs one at a time.

16 concurrent clients (threads using the official `openai` client, streaming, greedy) spread over 4 LoRA adapters
and the base model send N chat requests each to a server on 127.0.0.1 (a free port). The same load is served
twice in this one process, side by side: with --max-batch-size 16 and with --max-batch-size 1.

Checked: nothing lost (every request answered), nothing crossed (each answer equals what its adapter generates
alone with ``PeftModel.generate(do_sample=False)``). Measured: p50/p99 latency, p50 time to first token, and
generated tokens per second of wall time.

    python bench/serve_load.py                 # 16 clients x 4 requests x 32 tokens
    python bench/serve_load.py --requests 2    # shorter
    python bench/serve_load.py --threads 1     # when other jobs share the cores (2 threads oversubscribe them)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import openai
import torch
import uvicorn

import peftkit as pk
from peftkit.serve import create_app

BASE_NAME = "smollm2-135m"
ADAPTERS = {  # random non-zero LoRA factors (init_lora_weights=False), B scaled so the text stays readable
    "sql": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "poet": dict(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "math": dict(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"]),
    "chat": dict(r=8, lora_alpha=8, target_modules="all-linear"),
}
B_SCALE = 0.3
PROMPTS = [
    "Write one sentence about the sea.",
    "What is the capital of France?",
    "List three fruits.",
    "Explain what a CPU does.",
    "Give me a name for a cat.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]


def make_adapters(model, folder: Path) -> None:
    """Save the random adapters as HF PEFT folders, then hand the base model back unchanged."""
    torch.manual_seed(0)
    names = list(ADAPTERS)
    pm = pk.get_peft_model(model, pk.LoraConfig(init_lora_weights=False, **ADAPTERS[names[0]]), names[0])
    for name in names[1:]:
        pm.add_adapter(name, pk.LoraConfig(init_lora_weights=False, **ADAPTERS[name]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_B." in n:
                p.mul_(B_SCALE)
    pm.save_pretrained(folder)
    pm.unload()


def solo_outputs(model, tok, folder: Path, jobs: set[tuple[str, str]], max_tokens: int) -> dict[tuple[str, str], str]:
    """Each (model, prompt) generated alone with its adapter: the reference the server must reproduce."""
    names = list(ADAPTERS)
    pm = pk.PeftModel.from_pretrained(model, folder / names[0], names[0])
    for name in names[1:]:
        pm.load_adapter(folder / name, name)
    pm.eval()
    eos = sorted({model.generation_config.eos_token_id, tok.eos_token_id})
    out = {}
    for name, prompt in sorted(jobs):
        ids = torch.tensor([chat_ids(tok, prompt)])
        if name != BASE_NAME:
            pm.set_adapter(name)
        with (pm.disable_adapter() if name == BASE_NAME else nullcontext()), torch.inference_mode():
            gen = pm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=eos, pad_token_id=tok.pad_token_id)
        out[(name, prompt)] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    pm.unload()
    return out


def chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


@contextmanager
def serving(app):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # loopback only
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server failed to start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def run_load(url: str, plan: list[list[tuple[str, str]]], max_tokens: int, timeout: float) -> tuple[list[dict], float]:
    """Each client sends its requests one after another (closed loop); returns per-request records and wall time."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=timeout)

    def one_client(requests: list[tuple[str, str]]) -> list[dict]:
        records = []
        for model, prompt in requests:
            start = time.perf_counter()
            first, text, usage, error = None, "", None, None
            try:
                stream = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                    temperature=0, stream=True, stream_options={"include_usage": True},
                )
                for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage.completion_tokens
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        text += chunk.choices[0].delta.content
            except openai.APIError as err:
                error = repr(err)
            end = time.perf_counter()
            records.append({"model": model, "prompt": prompt, "text": text, "tokens": usage, "error": error,
                            "latency": end - start, "ttft": (first or end) - start})
        return records

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(plan)) as pool:
        results = list(pool.map(one_client, plan))
    return [r for client_records in results for r in client_records], time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(label: str, records: list[dict], wall: float, expected: dict, sent: int, stats: dict) -> dict:
    answered = [r for r in records if r["error"] is None and r["tokens"] is not None]
    crossed = [r for r in answered if r["text"] != expected[(r["model"], r["prompt"])]]
    tokens = sum(r["tokens"] for r in answered)
    return {
        "config": label, "sent": sent, "answered": len(answered), "matches_solo": len(answered) - len(crossed),
        "p50_latency_s": statistics.median(r["latency"] for r in answered),
        "p99_latency_s": percentile([r["latency"] for r in answered], 0.99),
        "p50_ttft_s": statistics.median(r["ttft"] for r in answered),
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "mean_rows_per_step": stats["tokens"] / max(1, stats["decode_steps"] + stats["prefills"]),
        "mixed_steps": stats["mixed_steps"], "decode_steps": stats["decode_steps"],
        "mismatches": [{k: r[k] for k in ("model", "prompt", "text")} | {"solo": expected[(r["model"], r["prompt"])]}
                       for r in crossed],
        "errors": [r["error"] for r in records if r["error"] is not None],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 when other jobs share the cores")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = pk.load_model(BASE_NAME)
    models = [BASE_NAME, *ADAPTERS]
    rng = random.Random(0)
    plan = [[(models[(c + i) % len(models)], rng.choice(PROMPTS)) for i in range(args.requests)] for c in range(args.clients)]
    sent = args.clients * args.requests
    with tempfile.TemporaryDirectory(prefix="peftkit-serve-bench-") as tmp:
        folder = Path(tmp)
        make_adapters(model, folder)
        jobs = {job for client in plan for job in client}
        t0 = time.perf_counter()
        expected = solo_outputs(model, tok, folder, jobs, args.max_tokens)
        solo_s = time.perf_counter() - t0
        # a crossed answer is only visible when the other models answer that prompt differently
        unique = sum(1 for client in plan for m, p in client
                     if all(expected[(m, p)] != expected[(o, q)] for o, q in jobs if q == p and o != m))
        print(f"solo references: {len(jobs)} (model, prompt) pairs in {solo_s:.1f} s; {unique}/{sent} requests "
              "have an answer no other model gives to their prompt", file=sys.stderr)
        rows = []
        for label, batch in (("continuous batching, max batch 16", 16), ("one at a time, max batch 1", 1)):
            app = create_app(model, tok, base_name=BASE_NAME, adapters={n: str(folder / n) for n in ADAPTERS},
                             max_batch_size=batch, max_queue=sent)
            with serving(app) as url:
                records, wall = run_load(url, plan, args.max_tokens, args.timeout)
                stats = dict(app.state.server.scheduler.stats)
            model = app.state.server.registry.model if app.state.server.registry.peft is None else app.state.server.registry.peft.unload()
            rows.append(summarize(label, records, wall, expected, sent, stats))
            print(f"{label}: {rows[-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr)

    print(f"\n{args.clients} clients x {args.requests} requests, {len(models)} models ({BASE_NAME} + {len(ADAPTERS)} "
          f"LoRA adapters), greedy, max_tokens {args.max_tokens}, streaming, torch threads {torch.get_num_threads()}\n")
    print("| config | answered | equal to solo | p50 latency (s) | p99 latency (s) | p50 TTFT (s) | tokens | wall (s) | tokens/s | rows/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['answered']}/{r['sent']} | {r['matches_solo']}/{r['answered']} | {r['p50_latency_s']:.2f} | "
              f"{r['p99_latency_s']:.2f} | {r['p50_ttft_s']:.2f} | {r['tokens']} | {r['wall_s']:.1f} | "
              f"{r['tokens_per_s']:.1f} | {r['mean_rows_per_step']:.1f} |")
    print(f"\nspeed-up from batching: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x tokens/s")
    for r in rows:
        for m in r["mismatches"]:
            print(f"MISMATCH ({r['config']}): {json.dumps(m)}")
        for e in r["errors"]:
            print(f"ERROR ({r['config']}): {e}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    ok = all(r["answered"] == r["sent"] and r["matches_solo"] == r["answered"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
