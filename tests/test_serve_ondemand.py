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
from conftest import tiny_llama, start_server_process
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


def test_requests_for_an_adapter_being_evicted_are_reloaded_never_crossed(adapters_dir, tok, solo):
    """One adapter at a time: concurrent requests alternate between x8 and x9, so each load evicts the other one
    as soon as it is idle, and requests keep arriving for the adapter being evicted. Each either waits and gets it
    reloaded or is served before it goes; every answer equals its adapter's own."""
    jobs = [(f"x{8 + i % 2}", f"Turn {i}") for i in range(12)]
    with start(adapters_dir, tok, budget=Budget(max_adapters=1)) as (url, state):
        client = openai_client(url)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            texts = list(pool.map(lambda job: complete(client, *job), jobs))
        assert texts == [solo(name, prompt, 6) for name, prompt in jobs]
        m = scrape(url)
        loads = sum(metric(m, "peftkit_adapter_loads_total", adapter=n) for n in ("x8", "x9"))
        evictions = sum(metric(m, "peftkit_adapter_evictions_total", adapter=n) for n in ("x8", "x9"))
        assert loads >= 2 and evictions == loads - 1  # every load after the first evicted the other adapter
        assert metric(m, "peftkit_adapters_resident_peak") == 1 and len(state.registry.models()) == 1


@pytest.mark.slow
def test_32_clients_over_40_adapters_under_a_budget_of_8(adapters_dir, tok, solo):
    """32 concurrent clients, 2 requests each over 40 adapters (Zipf-skewed, s = 1), at most 8 resident: every
    answer equals its adapter generating alone, none is lost, and the resident count never exceeds 8 (the
    server's own peak, plus /metrics sampled throughout)."""
    rng = random.Random(0)
    weights = [1 / (k + 1) for k in range(N_ADAPTERS)]
    jobs = [(f"x{rng.choices(range(N_ADAPTERS), weights)[0]}", f"Client {c} asks {r}") for c in range(32) for r in range(2)]
    with start(adapters_dir, tok, budget=Budget(max_adapters=8), max_batch_size=16, adapter_wait_s=120) as (url, state):
        client = openai_client(url)
        samples, done = [], threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(metric(scrape(url), "peftkit_adapters_resident"))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def client_run(c: int) -> list[str]:
            return [complete(client, *jobs[2 * c + r]) for r in range(2)]

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            texts = [t for pair in pool.map(client_run, range(32)) for t in pair]
        done.set()
        sampler.join(30)
        assert len(texts) == len(jobs) == 64
        wrong = [(job, text) for job, text in zip(jobs, texts) if text != solo(job[0], job[1], 6)]
        assert not wrong, wrong
        m = scrape(url)
        distinct = {name for name, _ in jobs}
        assert sum(metric(m, "peftkit_requests_total", adapter=n) for n in distinct) == 64
        assert sum(metric(m, "peftkit_requests_finished_total", adapter=n, finish_reason="length")
                   for n in distinct) == 64
        assert metric(m, "peftkit_adapters_resident_peak") == 8 and max(samples) <= 8 and len(samples) > 5
        loads = sum(metric(m, "peftkit_adapter_loads_total", adapter=n) for n in distinct)
        evictions = sum(metric(m, "peftkit_adapter_evictions_total", adapter=n) for n in distinct)
        assert loads >= len(distinct) and evictions == loads - len(state.registry.models())
        # ranks 2-4: a third of the victims share the newcomer's layout, and those loads took over their layers
        # (every answer above is still its adapter's own)
        reuses = metric(m, "peftkit_adapter_reuses_total")
        assert 0 < reuses <= evictions
        # the budget was full of busy adapters at times: those loads waited for one to become idle, and were served
        assert sum(metric(m, "peftkit_adapter_room_waits_total", adapter=n) for n in distinct) > 0
        print(f"32x40: {loads:.0f} loads, {evictions:.0f} evictions ({reuses:.0f} reused their layers), "
              f"{sum(metric(m, 'peftkit_adapter_room_waits_total', adapter=n) for n in distinct):.0f} loads waited")


# ----------------------------------------------------------------------------------------------------------------
# Bad names and folders: an OpenAI-shaped 4xx naming the problem, and nothing else disturbed


@pytest.fixture(scope="module")
def bad_dir(adapters_dir, tmp_path_factory) -> Path:
    """good (= x10), and broken copies of it: no config, truncated weights, a rank that does not match its tensors,
    another base's shapes; plus a symlink leading out of the directory."""
    import shutil

    root = tmp_path_factory.mktemp("bad")
    shutil.copytree(adapters_dir / "x10", root / "good")
    for name in ("no-config", "truncated", "wrong-rank", "other-base"):
        shutil.copytree(adapters_dir / "x10", root / name)
    (root / "no-config" / "adapter_config.json").unlink()
    weights = root / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:60])
    config = root / "wrong-rank" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 3', '"r": 5'))
    from transformers import LlamaConfig, LlamaForCausalLM

    narrower = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=128,
                                            num_attention_heads=4, num_key_value_heads=2))  # another base's shapes
    other = pk.get_peft_model(narrower, pk.LoraConfig(r=3, target_modules="all-linear", init_lora_weights=False))
    other.save_pretrained(root / "other-base")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(adapters_dir / "x10", outside / "x")
    (root / "sneaky").symlink_to(outside / "x", target_is_directory=True)
    return root


@pytest.mark.parametrize("model, status, code, fragment", [
    ("nope", 404, "model_not_found", "The model 'nope' does not exist. Available models: ['tiny', 'good'] or a folder"),
    ("no-config", 404, "model_not_found", "the folder 'no-config' in the adapters directory has no adapter_config.json"),
    ("../outside", 400, "invalid_model", "is outside the adapters directory"),
    ("/etc", 400, "invalid_model", "is outside the adapters directory"),
    ("sneaky", 400, "invalid_model", "is outside the adapters directory"),
    ("good/../good", 400, "invalid_model", "not a folder name directly inside the adapters directory"),
    ("truncated", 422, "adapter_load_failed", "adapter_model.safetensors is not a readable safetensors file"),
    ("wrong-rank", 422, "adapter_load_failed", "shape"),
    ("other-base", 422, "adapter_load_failed", "shape"),
])
def test_bad_folders_get_an_openai_error_naming_the_problem(bad_dir, tok, solo, model, status, code, fragment):
    with start(bad_dir, tok, budget=Budget(max_adapters=1)) as (url, state):
        client = openai_client(url)
        before = complete(client, "good", "Still fine", 4)  # resident and idle: a load would have to evict it
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"message", "type", "param", "code"}
        error = r.json()["error"]
        assert error["code"] == code and error["param"] == "model" and error["type"] == "invalid_request_error"
        assert fragment in error["message"] and str(bad_dir) not in error["message"]
        assert [a.name for a in state.registry.models()] == ["good"]  # not evicted for a refused folder
        assert complete(client, "good", "Still fine", 4) == before == solo("x10", "Still fine", 4)
        assert metric(scrape(url), "peftkit_adapter_evictions_total", adapter="good") == 0


def test_a_full_budget_of_busy_adapters_waits_then_answers_503(adapters_dir, tok, solo):
    with start(adapters_dir, tok, budget=Budget(max_adapters=1), adapter_wait_s=0.5) as (url, state):
        client = openai_client(url)
        with paced(state.registry.model, 0.05):
            stream = client.completions.create(model="x11", prompt="Busy", max_tokens=40, temperature=0, stream=True)
            chunks = iter(stream)
            first = next(chunks).choices[0].text
            t0 = time.monotonic()
            with pytest.raises(openai.InternalServerError) as err:
                complete(client, "x12", "Wait")
            assert 0.5 <= time.monotonic() - t0 < 4  # waited --adapter-wait (0.5 s), not for the whole stream
            assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"
            assert err.value.body["code"] == "adapter_budget_full"
            assert "all 1 resident adapters are in use" in err.value.body["message"]
            assert first + "".join(c.choices[0].text for c in chunks) == solo("x11", "Busy", 40)
        assert complete(client, "x12", "Wait") == solo("x12", "Wait", 6)  # idle now: x11 is evicted for it


def test_requests_waiting_for_a_load_count_against_the_queue_bound(adapters_dir, tok, solo):
    """--max-batch-size 1 + --max-queue 1: one request runs, one waits for room to load its adapter, and a third is
    refused at once with 429 (before, requests waiting for loads were outside the bound and each held its adapter's
    tensors read from disk)."""
    with start(adapters_dir, tok, budget=Budget(max_adapters=1), adapter_wait_s=60, max_batch_size=1, max_queue=1) as (url, state):
        client = openai_client(url)
        with paced(state.registry.model, 0.05):
            stream = client.completions.create(model="x11", prompt="Busy", max_tokens=30, temperature=0, stream=True)
            chunks = iter(stream)
            first = next(chunks).choices[0].text
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(complete, client, "x12", "Wait")
                deadline = time.monotonic() + 10
                while metric(scrape(url), "peftkit_adapter_room_waits_total", adapter="x12") == 0:
                    assert time.monotonic() < deadline, "the load of x12 never waited for room"
                    time.sleep(0.05)
                t0 = time.monotonic()
                with pytest.raises(openai.RateLimitError) as err:
                    complete(client, "x13", "Refused")
                assert time.monotonic() - t0 < 2 and err.value.body["code"] == "queue_full"
                assert "--max-batch-size 1 + --max-queue 1" in err.value.body["message"]
                assert first + "".join(c.choices[0].text for c in chunks) == solo("x11", "Busy", 30)
                assert waiting.result(timeout=60) == solo("x12", "Wait", 6)  # served once x11 was idle
        assert metric(scrape(url), "peftkit_adapter_cache_misses_total", adapter="x13") == 0


def test_pinned_adapters_fill_the_budget(adapters_dir, tok):
    with pytest.raises(ValueError, match=r"the 2 --adapter adapter\(s\) .* exceed --max-adapters 1"):
        create_app(make_base(), tok, base_name="tiny", budget=Budget(max_adapters=1),
                   adapters={"p": str(adapters_dir / "x0"), "q": str(adapters_dir / "x1")})
    with start(adapters_dir, tok, budget=Budget(max_adapters=1), adapters={"p": str(adapters_dir / "x0")}) as (url, _):
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"model": "x1", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_budget_exceeded"
        assert "the 1 pinned adapter(s)" in r.json()["error"]["message"] and time.monotonic() - t0 < 5  # no wait


def test_models_list_loaded_and_loadable_with_their_parent(bad_dir, tok):
    with start(bad_dir, tok, adapters={"pinned": str(bad_dir / "good")}) as (url, _):
        client = openai_client(url)
        complete(client, "good", "x", 1)
        cards = [(m.id, m.parent, m.status, getattr(m, "pinned", None)) for m in client.models.list().data]
        assert cards == [("tiny", None, "loaded", None), ("pinned", "tiny", "loaded", True),
                         ("good", "tiny", "loaded", False), ("other-base", "tiny", "on_disk", None),
                         ("truncated", "tiny", "on_disk", None), ("wrong-rank", "tiny", "on_disk", None)]
        assert client.models.retrieve("wrong-rank").status == "on_disk"
        assert client.models.retrieve("good").pinned is False and client.models.retrieve("tiny").parent is None
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no-config")
        with pytest.raises(openai.BadRequestError):
            client.models.retrieve("sneaky")


# ----------------------------------------------------------------------------------------------------------------
# The command line


def test_serve_help_teaches_the_budget_flags(capsys):
    from peftkit.serve import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    for fragment in ("--adapters-dir DIR", "--max-adapters N", "--adapter-memory MiB", "--adapter-wait SECONDS",
                     "peftkit serve --adapters-dir adapters/ --max-adapters 8", "GET /metrics"):
        assert fragment in text, fragment
    for bad in (["--adapter-memory", "0"], ["--adapter-memory", "nan"], ["--max-adapters", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main(bad)
        assert exit_.value.code == 2 and bad[0] in capsys.readouterr().err


@pytest.mark.slow
def test_serve_command_loads_on_demand_under_its_budget(tmp_path, adapters_dir, tok, solo):
    """``python -m peftkit.serve --adapters-dir DIR --max-adapters 1`` in a subprocess: the flags reach the app."""
    folder = tmp_path / "model"
    make_base().save_pretrained(folder)
    tok.save_pretrained(folder)
    proc, url = start_server_process(["--model", str(folder), "--adapters-dir", str(adapters_dir), "--max-adapters",
                                      "1", "--adapter-memory", "1", "--log-level", "warning"])
    try:
        client = openai_client(url)
        for name in ("x13", "x14", "x13"):
            assert complete(client, name, "From the command line") == solo(name, "From the command line", 6)
        m = scrape(url)
        assert metric(m, "peftkit_adapters_max") == 1 and metric(m, "peftkit_adapter_memory_limit_bytes") == 2**20
        assert metric(m, "peftkit_adapter_evictions_total", adapter="x13") == 1
        assert metric(m, "peftkit_adapter_evictions_total", adapter="x14") == 1
    finally:
        proc.terminate()
        proc.wait(30)
