"""The load side of the serving benchmark: a `peftkit serve` child process, who asks for what (the plan), and
the clients (the official `openai` client, streaming, greedy) in a closed loop.

Closed loop, not open: N workers share one queue of requests, and each takes the next one when its previous one
has finished (as vLLM's serving benchmark does with --max-concurrency N), so exactly N requests are in flight until
the queue runs out and, with N = the server's batch size, the batch can stay full. That makes the measured tokens/s
comparable with the full-batch decode step (the bound). (Giving each client its own fixed list instead let the
clients whose answers happened to be short finish early and leave their batch slot empty: the server's counters
showed 12.7 rows per decode step of 16 with four requests per client.) An open loop with Poisson arrivals needs a
rate chosen against the very capacity being measured: below it the batch is not full and tokens/s is just the
offered rate, above it the queue grows for as long as the run lasts; on a shared 2-core machine the capacity
drifts from run to run. The cost: a closed loop never queues more than N requests, so its latencies are those of
a system at exactly that load (no queueing beyond it, "coordinated omission").
"""

from __future__ import annotations

import concurrent.futures
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai


def make_plan(names: list[str], popularity: str, clients: int, requests: int, prompts: list[str], seed: int,
              prompts_per_adapter: int) -> list[list[tuple[str, str]]]:
    """Each client's requests, (adapter, prompt) in order. ``zipf``: the k-th adapter (from 1) is drawn with
    probability proportional to 1/k (s = 1); ``uniform``: all equally. The i-th adapter is asked one of
    ``prompts_per_adapter`` prompts starting at prompts[i % len(prompts)] (more when there are fewer adapters than
    prompts, so every prompt is used), so the solo references (one generation per distinct pair) stay few while
    neighbouring adapters get different prompts."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(len(names))] if popularity == "zipf" else [1.0] * len(names)
    draws = rng.choices(range(len(names)), weights, k=clients * requests)
    per_adapter = max(prompts_per_adapter, len(prompts) // len(names))
    jobs = [(names[i], prompts[(i + rng.randrange(per_adapter)) % len(prompts)]) for i in draws]
    return [jobs[c * requests:(c + 1) * requests] for c in range(clients)]


def queue_order(plan: list[list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """The plan's requests in the order the workers take them from their shared queue: every client's first request,
    then every client's second, and so on (so the first N are the N clients' first)."""
    return [client[i] for i in range(max(map(len, plan), default=0)) for client in plan if i < len(client)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """Peak resident set size of process ``pid`` (VmHWM in /proc/PID/status), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (writing 5 to /proc/PID/clear_refs, Linux >= 4.0); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class ServerProcess:
    """``python -m peftkit.serve`` (what `peftkit serve` runs) on 127.0.0.1 and a free port, as a child process, so
    its peak RSS is its own and none of the clients' memory counts."""

    def __init__(self, model: str, adapters_dir: Path, log: Path, *, max_batch: int, max_queue: int, threads: int,
                 max_adapters: int, dtype: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "peftkit.serve", "--model", model, "--host", "127.0.0.1", "--port", str(self.port),
                   "--adapters-dir", str(adapters_dir), "--max-adapters", str(max_adapters), "--max-batch-size",
                   str(max_batch), "--max-queue", str(max_queue), "--threads", str(threads), "--dtype", dtype,
                   "--log-level", "warning"]
        self.log = log
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.process.pid)

    def reset_peak_rss(self) -> bool:
        return reset_peak_rss(self.process.pid)

    def metrics(self) -> str | None:
        """The Prometheus text of /metrics, or None where this build has no such endpoint."""
        try:
            with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as response:
                return response.read().decode()
        except urllib.error.HTTPError:
            return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def metric_total(text: str | None, name: str) -> float | None:
    """Sum of every sample of metric ``name`` (all label sets) in Prometheus text, None without /metrics. A labelled
    counter has no sample (not even its TYPE line) until first incremented, so an absent one counts 0; the test
    checks that loads, which every on-demand run has, are found under the name used here."""
    if text is None:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "))


def run_load(url: str, plan: list[list[tuple[str, str]]], max_tokens: int, timeout: float) -> tuple[list[dict], float]:
    """len(plan) workers take the plan's requests from one queue (:func:`queue_order`), each sending its next when its
    previous one has finished (closed loop); per-request records, in the order sent, and the wall time."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)
    jobs = list(enumerate(queue_order(plan)))
    records: list[dict | None] = [None] * len(jobs)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                index, (model, prompt) = jobs.pop(0)
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
                error = getattr(err, "message", None) or repr(err)
            end = time.perf_counter()
            records[index] = {"model": model, "prompt": prompt, "text": text, "tokens": usage, "error": error,
                              "latency": end - start, "ttft": (first or end) - start}

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(plan)) as pool:
        for future in [pool.submit(worker) for _ in plan]:
            future.result()
    return [r for r in records if r is not None], time.perf_counter() - start
