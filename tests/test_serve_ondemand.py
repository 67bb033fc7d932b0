"""Adapters on demand: a request names a folder of --adapters-dir and the server loads it (once, however many ask),
evicting least recently used idle adapters under --max-adapters / --adapter-memory, never one with rows in flight.

Real uvicorn on 127.0.0.1 and the official `openai` client (helpers from test_serve). The adapters are LoRAs with
random non-zero A and B on a tiny random Llama, saved with save_pretrained; the reference for every answer is the
same adapter generating alone with ``generate(do_sample=False)`` on an identical copy of the model, so a response
computed with the wrong adapter (or none) is caught.
"""

from __future__ import annotations

import concurrent.futures
import functools
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import tiny_llama
from prometheus_client.parser import text_string_to_metric_families
from test_serve import VOCAB, make_base, paced, prompt_ids, serving, tok  # noqa: F401 (tok is a fixture)

import peftkit as pk
from peftkit.serve import create_app
from peftkit.serve.residency import Budget

N_ADAPTERS = 40


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    """x0 .. x39: LoRA adapters of ranks 2-4 on every linear layer, random non-zero A and B, one folder each."""
    root = tmp_path_factory.mktemp("ondemand")
    torch.manual_seed(0)
    config = lambda i: pk.LoraConfig(r=2 + i % 3, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # noqa: E731
    pm = pk.get_peft_model(tiny_llama(vocab_size=VOCAB, seed=1), config(0), "x0")
    for i in range(1, N_ADAPTERS):
        pm.add_adapter(f"x{i}", config(i))
    with torch.no_grad():  # larger B than the default init, so that every adapter steers greedy decoding its own way
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    pm.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def solo(adapters_dir, tok):
    """Greedy tokens of one adapter generating alone: (adapter, prompt, max_new) -> text."""
    ref = pk.PeftModel.from_pretrained(make_base(), adapters_dir / "x0", "x0")
    for i in range(1, N_ADAPTERS):
        ref.load_adapter(adapters_dir / f"x{i}", f"x{i}")
    ref.eval()
    eos = sorted({ref.generation_config.eos_token_id, tok.eos_token_id})
    lock = threading.Lock()

    @functools.lru_cache(maxsize=None)
    def run(adapter: str, prompt: str, max_new: int) -> str:
        ids = torch.tensor([prompt_ids(tok, prompt)])
        with lock, torch.inference_mode():
            ref.set_adapter(adapter)
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                               eos_token_id=eos, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)

    return run


@contextmanager
def start(adapters_dir, tok, **kwargs):
    """A server on 127.0.0.1 serving adapters on demand from ``adapters_dir``: yields (url, its Server)."""
    defaults = dict(base_name="tiny", adapters_dir=adapters_dir, max_batch_size=8, max_queue=64)
    app = create_app(make_base(), tok, **{**defaults, **kwargs})
    with serving(app) as url:
        yield url, app.state.server


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client: openai.OpenAI, model: str, prompt: str, n: int = 6) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0).choices[0].text


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics parsed: (sample name, sorted labels) -> value."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_adapters_really_differ(solo):
    """The reference outputs of the 40 adapters are distinct enough that a crossed response would show."""
    texts = [solo(f"x{i}", "Tell me a story", 6) for i in range(N_ADAPTERS)]
    assert len(set(texts)) >= 36, texts


def test_on_demand_load_equals_the_adapter_served_preloaded(adapters_dir, tok, solo):
    with start(adapters_dir, tok, adapters={"pre": str(adapters_dir / "x1")}) as (url, _):
        client = openai_client(url)
        for prompt in ("Once upon a time", "The answer is"):
            preloaded = complete(client, "pre", prompt, 8)
            assert complete(client, "x1", prompt, 8) == preloaded == solo("x1", prompt, 8)
        chat = client.chat.completions.create(model="x2", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                              temperature=0)
        assert chat.model == "x2" and chat.usage.completion_tokens >= 1
        cards = {m.id: m for m in client.models.list().data}
        assert cards["x1"].status == cards["x2"].status == "loaded" and cards["x1"].parent == "tiny"
        assert cards["pre"].pinned is True and cards["x1"].pinned is False


def test_concurrent_first_requests_load_once_without_stalling_others(adapters_dir, tok, solo, monkeypatch):
    import peftkit.serve.ondemand as ondemand

    read = ondemand.read_adapter

    def read_slowly(path):  # a slow disk: the load takes >= 1 s, serving goes on meanwhile
        time.sleep(1.0)
        return read(path)

    with start(adapters_dir, tok, adapters={"pre": str(adapters_dir / "x0")}) as (url, _):
        client = openai_client(url)
        monkeypatch.setattr(ondemand, "read_adapter", read_slowly)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            firsts = [pool.submit(complete, client, "x3", f"Prompt {i}") for i in range(6)]
            time.sleep(0.3)
            t0 = time.monotonic()
            during = complete(client, "pre", "Meanwhile", 4)  # a resident adapter is served during the load
            served_in = time.monotonic() - t0
            assert not any(f.done() for f in firsts), "the first requests did not wait for the load"
            texts = [f.result() for f in firsts]
        assert during == solo("x0", "Meanwhile", 4) and served_in < 0.9
        assert texts == [solo("x3", f"Prompt {i}", 6) for i in range(6)]
        m = scrape(url)
        assert metric(m, "peftkit_adapter_loads_total", adapter="x3") == 1  # six requests, one load
        assert metric(m, "peftkit_adapter_cache_misses_total", adapter="x3") == 6
        assert metric(m, "peftkit_adapter_load_seconds_count", adapter="x3") == 1
        assert metric(m, "peftkit_adapter_load_seconds_sum", adapter="x3") >= 1.0


@pytest.mark.parametrize("budget", ["count", "memory"])
def test_eviction_spares_adapters_with_rows_in_flight(adapters_dir, tok, solo, budget):
    """A budget of two adapters: x4 streams a long answer while x5, x6, x7 and x5 again come and go. x4 is never
    evicted and its answer is unchanged; each newcomer evicts the least recently used idle adapter."""
    with start(adapters_dir, tok) as (url, _):  # each adapter's resident bytes (they are proportional to the rank)
        sizes = {}
        for name in ("x4", "x5", "x6", "x7"):
            complete(openai_client(url), name, "size", 1)
            sizes[name] = metric(scrape(url), "peftkit_adapter_resident_bytes", adapter=name, pinned="false")
    assert sizes["x4"] / 3 == sizes["x5"] / 4 == sizes["x6"] / 2 == sizes["x7"] / 3  # ranks 3, 4, 2, 3
    # memory: x4 + x5 (7 rank units) fit in 7.5 units, no three of them do
    limit = Budget(max_adapters=2) if budget == "count" else Budget(max_bytes=int(7.5 * sizes["x6"] / 2))
    with start(adapters_dir, tok, budget=limit) as (url, state):
        client = openai_client(url)
        with paced(state.registry.model, 0.05):  # x4's 60 tokens take >= 3 s; the four short requests far less
            stream = client.completions.create(model="x4", prompt="A long story", max_tokens=60, temperature=0,
                                               stream=True)
            chunks = iter(stream)
            pieces = [next(chunks).choices[0].text]
            for name in ("x5", "x6", "x7", "x5"):
                assert complete(client, name, "Short", 4) == solo(name, "Short", 4)
                resident = scrape(url)
                assert metric(resident, "peftkit_adapters_resident") <= 2
                assert limit.max_bytes is None or metric(resident, "peftkit_adapters_resident_bytes") <= limit.max_bytes
            assert state.scheduler.in_use("x4"), "x4 finished before the others came: nothing was tested"
            pieces += [p.choices[0].text for p in chunks]
        assert "".join(pieces) == solo("x4", "A long story", 60)
        m = scrape(url)
        evictions = {n: metric(m, "peftkit_adapter_evictions_total", adapter=n) for n in ("x4", "x5", "x6", "x7")}
        assert evictions == {"x4": 0, "x5": 1, "x6": 1, "x7": 1}
        assert metric(m, "peftkit_adapters_resident_peak") == 2
        assert sorted(a.name for a in state.registry.models()) == ["x4", "x5"]
