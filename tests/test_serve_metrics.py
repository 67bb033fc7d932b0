"""GET /metrics (Prometheus, per adapter) counts what was sent, and every error the server answers has OpenAI's shape.

The server and adapters are test_serve_ondemand's (tiny random Llama, LoRA folders written with save_pretrained).
"""

from __future__ import annotations

import time

import httpx
import pytest
from test_serve import prompt_ids, tok  # noqa: F401 (tok is a fixture)
from test_serve_ondemand import adapters_dir, metric, openai_client, scrape, start  # noqa: F401 (adapters_dir is a fixture)

# LoRA on every linear layer of tiny_llama (hidden 64, 4 heads, 2 KV heads of 16, MLP 128, 2 layers): A is r x in,
# B is out x r, so an adapter holds r x sum(in + out) float32 numbers. Per layer: q 64+64, k 64+32, v 64+32,
# o 64+64, gate 64+128, up 64+128, down 128+64 = 1024.
LORA_NUMBERS_PER_RANK = 2 * 1024


def test_metrics_count_the_requests_sent(adapters_dir, tok):
    started = time.monotonic()
    with start(adapters_dir, tok, adapters={"pre": str(adapters_dir / "x0")}) as (url, _):
        client = openai_client(url)
        sent = [("x1", "First prompt", 5), ("x1", "A second, longer prompt here", 7)]
        completion_tokens = 0
        for model, prompt, n in sent:
            completion_tokens += client.completions.create(model=model, prompt=prompt, max_tokens=n,
                                                           temperature=0).usage.completion_tokens
        stream = list(client.completions.create(model="x1", prompt="Streamed", max_tokens=4, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        completion_tokens += stream[-1].usage.completion_tokens
        client.completions.create(model="pre", prompt="Hit", max_tokens=3, temperature=0)
        client.completions.create(model="tiny", prompt="Base", max_tokens=2, temperature=0)
        assert httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404

        r = httpx.get(url + "/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
        m = scrape(url)
        assert metric(m, "peftkit_requests_total", adapter="x1") == 3
        assert metric(m, "peftkit_requests_total", adapter="pre") == 1
        assert metric(m, "peftkit_requests_total", adapter="tiny") == 1  # the base model by its id
        assert metric(m, "peftkit_requests_total", adapter="nope") == 0  # refused before it was submitted
        prompt_tokens = sum(len(prompt_ids(tok, p)) for p in ("First prompt", "A second, longer prompt here", "Streamed"))
        assert metric(m, "peftkit_prompt_tokens_total", adapter="x1") == prompt_tokens
        assert metric(m, "peftkit_completion_tokens_total", adapter="x1") == completion_tokens == 5 + 7 + 4
        assert metric(m, "peftkit_requests_finished_total", adapter="x1", finish_reason="length") == 3
        for name in ("peftkit_time_to_first_token_seconds", "peftkit_request_latency_seconds",
                     "peftkit_queue_time_seconds"):
            assert metric(m, name + "_count", adapter="x1") == 3 and metric(m, name + "_count", adapter="tiny") == 1
            assert metric(m, name + "_bucket", adapter="x1", le="+Inf") == 3
        queue, ttft, latency = (metric(m, f"peftkit_{n}_sum", adapter="x1")
                                for n in ("queue_time_seconds", "time_to_first_token_seconds", "request_latency_seconds"))
        assert 0 <= queue <= ttft <= latency  # each request: queued, then its first token, then its last
        # x1 was loaded on demand by its first request (a miss), then found resident twice (hits); pre is pinned
        assert metric(m, "peftkit_adapter_cache_misses_total", adapter="x1") == 1
        assert metric(m, "peftkit_adapter_cache_hits_total", adapter="x1") == 2
        assert metric(m, "peftkit_adapter_cache_hits_total", adapter="pre") == 1
        assert metric(m, "peftkit_adapter_loads_total", adapter="x1") == 1
        assert metric(m, "peftkit_adapter_load_seconds_count", adapter="x1") == 1
        assert metric(m, "peftkit_adapter_evictions_total", adapter="x1") == 0
        # resident: pre (rank 2) and x1 (rank 3), their bytes by hand
        assert metric(m, "peftkit_adapters_resident") == 2 and metric(m, "peftkit_adapters_resident_peak") == 2
        assert metric(m, "peftkit_adapter_resident_bytes", adapter="pre", pinned="true") == 2 * LORA_NUMBERS_PER_RANK * 4
        assert metric(m, "peftkit_adapter_resident_bytes", adapter="x1", pinned="false") == 3 * LORA_NUMBERS_PER_RANK * 4
        assert metric(m, "peftkit_adapters_resident_bytes") == 5 * LORA_NUMBERS_PER_RANK * 4
        assert metric(m, "peftkit_requests_running") == 0 and metric(m, "peftkit_requests_waiting") == 0
        # the scheduler's counters: each request's first token comes from its prefill, every later one from a
        # decode step's row; the thread's seconds are split, not double-counted
        tokens = sum(metric(m, "peftkit_completion_tokens_total", adapter=a) for a in ("x1", "pre", "tiny"))
        assert metric(m, "peftkit_decode_rows_total") == tokens - 5
        assert 1 <= metric(m, "peftkit_decode_steps_total") <= tokens - 5
        assert metric(m, "peftkit_scheduler_steps_total") >= metric(m, "peftkit_decode_steps_total")
        assert metric(m, "peftkit_prefill_tokens_total") >= prompt_tokens
        parts = [metric(m, f"peftkit_{n}_seconds_total") for n in ("decode", "prefill", "adapter_change", "scheduler_idle")]
        assert all(p > 0 for p in parts[:2]) and parts[2] > 0  # x1 was attached on the scheduler thread
        assert sum(parts) <= time.monotonic() - started  # within the server's lifetime so far

    with start(adapters_dir, tok) as (url, _):  # another app in the same process keeps its own counts
        assert metric(scrape(url), "peftkit_requests_total", adapter="x1") == 0


def test_evictions_and_the_budget_in_metrics(adapters_dir, tok):
    from peftkit.serve.residency import Budget

    with start(adapters_dir, tok, budget=Budget(max_adapters=2, max_bytes=10**6)) as (url, _):
        client = openai_client(url)
        for name in ("x1", "x2", "x3", "x1"):  # x3 evicts x1 (least recently used), then x1 evicts x2
            client.completions.create(model=name, prompt="Hi", max_tokens=1, temperature=0)
        m = scrape(url)
        assert [metric(m, "peftkit_adapter_evictions_total", adapter=n) for n in ("x1", "x2", "x3")] == [1, 1, 0]
        assert metric(m, "peftkit_adapter_loads_total", adapter="x1") == 2
        assert metric(m, "peftkit_adapters_max") == 2 and metric(m, "peftkit_adapter_memory_limit_bytes") == 10**6
        assert metric(m, "peftkit_adapters_resident") == 2


# ----------------------------------------------------------------------------------------------------------------
# Every error in OpenAI's shape


def _openai_shaped(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_every_error_has_openai_shape(adapters_dir, tok, monkeypatch):
    with start(adapters_dir, tok) as (url, state):
        error = _openai_shaped(httpx.get(url + "/v2/nothing"), 404)
        assert error["message"] == "no route GET /v2/nothing" and error["type"] == "invalid_request_error"
        error = _openai_shaped(httpx.delete(url + "/v1/models"), 405)
        assert error["message"] == "no route DELETE /v1/models"
        error = _openai_shaped(httpx.post(url + "/v1/completions", json={"model": "x1", "prompt": 5}), 400)
        assert error["param"] == "prompt" and "prompt must be" in error["message"]
        error = _openai_shaped(httpx.post(url + "/v1/chat/completions", json={"model": "x1"}), 400)
        assert error["message"] == "messages: Field required" and error["param"] == "messages"
        error = _openai_shaped(httpx.get(url + "/v1/models/nope"), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"
        error = _openai_shaped(httpx.post(url + "/v1/adapters", json={"name": "n", "path": "x1"}), 403)
        assert error["type"] == "permission_error"

        def broken() -> list[str]:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(state.loader, "loadable", broken)
        error = _openai_shaped(httpx.get(url + "/v1/models"), 500)
        assert error["type"] == "server_error" and error["message"] == "internal error: RuntimeError: disk on fire"
