"""The OpenAI-compatible server: real uvicorn on 127.0.0.1 (free port, in a thread), the official `openai` client.

A tiny random Llama with SmolLM2's tokenizer (vocab 49152) and LoRA adapters with random non-zero B, so every
adapter changes the output. The reference for correctness is each adapter generating alone with
``generate(do_sample=False)`` on an identical copy of the model.
"""

from __future__ import annotations

import concurrent.futures
import functools
import socket
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import tiny_llama, start_server_process

import peftkit as pk
from peftkit.serve import create_app
from peftkit.serve.registry import AdapterRegistry, read_adapter
from peftkit.serve.sampling import SamplingParams, TextStream, sample_token
from peftkit.serve.scheduler import QueueFull, Scheduler
from peftkit.serve.sequence import Sequence
from peftkit.tuners.base import BASE

TOKEN = "test-token-123"
ADAPTERS = {  # name -> LoRA settings; init_lora_weights=False gives random non-zero A and B
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=16, target_modules=["o_proj", "down_proj", "up_proj"]),
    "c": dict(r=2, lora_alpha=4, target_modules="all-linear"),
}
VOCAB = 49152  # SmolLM2's tokenizer


def make_base() -> torch.nn.Module:
    return tiny_llama(vocab_size=VOCAB, seed=0)


@pytest.fixture(scope="module")
def tok():
    return pk.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(vocab_size=VOCAB, seed=1)
    names = list(ADAPTERS)
    pm = pk.get_peft_model(model, pk.LoraConfig(init_lora_weights=False, **ADAPTERS[names[0]]), names[0])
    for name in names[1:]:
        pm.add_adapter(name, pk.LoraConfig(init_lora_weights=False, **ADAPTERS[name]))
    for name in names:  # non-zero B everywhere, so the adapters really differ from the base
        assert all(p.abs().sum() > 0 for n, p in pm.named_parameters() if f"lora_B.{name}." in n)
    pm.save_pretrained(root)  # HF layout: each non-default adapter in root/<name>
    return root


@pytest.fixture(scope="module")
def ref(adapters_dir):
    """An identical copy of the served model holding every adapter, for solo generation."""
    pm = pk.PeftModel.from_pretrained(make_base(), adapters_dir / "a", "a")
    for name in ("b", "c"):
        pm.load_adapter(adapters_dir / name, name)
    return pm.eval()


@pytest.fixture(scope="module")
def solo(ref, tok):
    """Greedy tokens of one adapter generating alone: (adapter, prompt ids, max_new) -> list of token ids."""
    eos = sorted({ref.generation_config.eos_token_id, tok.eos_token_id})

    @functools.lru_cache(maxsize=None)
    def run(adapter: str, prompt: tuple[int, ...], max_new: int) -> tuple[int, ...]:
        ids = torch.tensor([prompt])
        if adapter != BASE:
            ref.set_adapter(adapter)
        with (ref.disable_adapter() if adapter == BASE else nullcontext()), torch.inference_mode():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                               eos_token_id=eos, pad_token_id=tok.pad_token_id)
        return tuple(out[0, len(prompt):].tolist())

    return run


@contextmanager
def serving(app):
    """uvicorn in a thread on 127.0.0.1 and a free port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def server(adapters_dir, tok):
    """Adapters a and b loaded at start; c loadable at run time from the adapters directory."""
    app = create_app(make_base(), tok, base_name="tiny", adapters={"a": str(adapters_dir / "a"), "b": str(adapters_dir / "b")},
                     adapters_dir=adapters_dir, api_key=TOKEN, max_batch_size=8, max_queue=32)
    with serving(app) as url:
        yield url, app.state.server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def admin(url: str, method: str, path: str, token: str | None = TOKEN, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, url + path, headers=headers, timeout=60, **kwargs)


def prompt_ids(tok, text: str) -> tuple[int, ...]:
    return tuple(tok(text).input_ids)


def chat_ids(tok, content: str) -> tuple[int, ...]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    return tuple(tok(text, add_special_tokens=False).input_ids)


# ----------------------------------------------------------------------------------------------------------------
# Sampling and detokenization


def test_sample_token_matches_softmax_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=1, temperature=0.5)
    draws = torch.tensor([sample_token(logits, params, gen) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = torch.softmax(logits / 0.5, dim=0)
    assert torch.allclose(freq, expected, atol=0.025), (freq, expected)
    # top_p = 0.7: the smallest set reaching 0.7 is {0} (p0 = 0.867 at T = 0.5), so only token 0 comes out
    nucleus = SamplingParams(max_tokens=1, temperature=0.5, top_p=0.7)
    assert {sample_token(logits, nucleus, gen) for _ in range(200)} == {0}
    # top_p = 0.9 keeps {0, 1} (0.867 < 0.9), renormalised: p1 = 0.117 / 0.984
    nucleus = SamplingParams(max_tokens=1, temperature=0.5, top_p=0.9)
    draws = torch.tensor([sample_token(logits, nucleus, gen) for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 1).float().mean().item() - expected[1].item() / expected[:2].sum().item()) < 0.02
    assert sample_token(logits, SamplingParams(max_tokens=1, temperature=0.0), gen) == 0


def test_text_stream_holds_back_stop_prefixes_and_cuts_at_stop(tok):
    ids = tok("The answer is 42. END of story").input_ids
    stream = TextStream(tok, stop=("END", ". E"))
    pieces = []
    for t in ids:
        pieces.append(stream.push(t))
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == "The answer is 42"
    # without a stop sequence, the streamed pieces add up to the full decode
    stream = TextStream(tok)
    text = "".join(stream.push(t) for t in tok("héllo 😀 wörld").input_ids) + stream.finish()
    assert text == "héllo 😀 wörld"
    # a partial UTF-8 character is never sent on its own
    stream = TextStream(tok)
    assert all("\ufffd" not in stream.push(t) for t in tok("😀😀").input_ids)
    # windowed decoding of any token sequence (special tokens, byte fragments) adds up to the whole decode
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(0)).tolist() + [2, 1, 0]
    stream = TextStream(tok)
    text = "".join(stream.push(t) for t in ids) + stream.finish()
    assert text == tok.decode(ids, skip_special_tokens=True)


def test_queue_bound_counts_running_and_waiting(tok):
    sched = Scheduler(host=None, max_batch_size=2, max_queue=1)  # never started: only admission is checked
    seqs = [_seq(tok, BASE, [1, 2], 4)[0] for _ in range(4)]
    for seq in seqs[:3]:
        sched.submit(seq)
    with pytest.raises(QueueFull, match="3 requests are running or waiting"):
        sched.submit(seqs[3])
    with pytest.raises(ValueError, match="max_batch_size"):
        Scheduler(host=None, max_batch_size=0)


# ----------------------------------------------------------------------------------------------------------------
# The scheduler driven step by step: joins and leaves at exact steps, and failures kept to one request


def _scheduler(adapters_dir, tok, **kwargs) -> tuple[Scheduler, AdapterRegistry]:
    registry = AdapterRegistry(make_base(), tok, "tiny")
    for name in ADAPTERS:
        config, tensors = read_adapter(adapters_dir / name)
        registry.attach(name, config, tensors, str(adapters_dir / name))
    return Scheduler(registry, **kwargs), registry


def _seq(tok, adapter: str, ids, max_tokens: int) -> tuple[Sequence, list]:
    events: list = []
    return Sequence(adapter, list(ids), SamplingParams(max_tokens=max_tokens, temperature=0.0), tok, events.append), events


def test_scheduler_rows_join_and_leave_between_steps(adapters_dir, tok, solo):
    sched, _ = _scheduler(adapters_dir, tok, max_batch_size=8)
    jobs = [("a", "Once upon a time", 12), (BASE, "The capital of France", 5), ("b", "x", 9),
            ("c", "A much longer prompt that pads the others on the left", 7), ("a", "Hi", 10)]
    seqs = [_seq(tok, adapter, prompt_ids(tok, p), n)[0] for adapter, p, n in jobs]
    sched.submit(seqs[0])
    sched.submit(seqs[1])
    sched.step()  # rows 0 and 1 prefilled together (left padding), then one decode step
    sched.step()
    sched.submit(seqs[2])
    sched.submit(seqs[3])
    for _ in range(3):
        sched.step()  # 1 leaves after its 5th token; 2 and 3 join a running batch
    sched.submit(seqs[4])
    while sched.load["running"] or sched.load["waiting"]:
        sched.step()
    for seq, (adapter, p, n) in zip(seqs, jobs):
        assert tuple(seq.output_ids) == solo(adapter, prompt_ids(tok, p), n), adapter
        assert seq.finish_reason in ("length", "stop")
    assert sched.stats["mixed_steps"] > 0 and sched.stats["max_rows"] == 4


def test_scheduler_failures_stay_with_their_request(adapters_dir, tok, solo):
    sched, registry = _scheduler(adapters_dir, tok, max_batch_size=8)
    poison, calls = 4242, {"decode": 0}
    forward = registry.forward

    def faulty(**inputs):
        if (inputs["input_ids"] == poison).any():
            raise RuntimeError("poisoned row")
        if inputs["input_ids"].shape[1] == 1:
            calls["decode"] += 1
            if calls["decode"] == 3:  # one transient failure of a whole decode step
                raise RuntimeError("transient")
        return forward(**inputs)

    registry.forward = faulty
    good = [("a", "Hello world", 8), ("b", "Good morning", 8), (BASE, "Tea or coffee", 8)]
    seqs = [_seq(tok, adapter, prompt_ids(tok, p), n) for adapter, p, n in good]
    bad, bad_events = _seq(tok, "c", [10, poison, 11], 8)
    for seq, _ in seqs[:2]:
        sched.submit(seq)
    sched.submit(bad)
    sched.submit(seqs[2][0])
    while sched.load["running"] or sched.load["waiting"]:
        sched.step()
    assert [e.kind for e in bad_events] == ["error"] and "poisoned row" in bad_events[0].error
    assert sched.stats["recoveries"] == 1
    for (seq, events), (adapter, p, n) in zip(seqs, good):
        assert tuple(seq.output_ids) == solo(adapter, prompt_ids(tok, p), n)
        assert events[-1].kind == "finish" and seq.text == tok.decode(seq.output_ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------------
# The API through the openai client


def test_models_and_health(server, client):
    url, _ = server
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and {"a", "b"} <= set(ids) and "__base__" not in ids
    assert client.models.retrieve("a").parent == "tiny" and client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and {"a", "b"} <= set(health["adapters"])


def test_completion_chat_and_stream_match_solo_greedy(client, tok, solo):
    text = "The quick brown fox"
    r = client.completions.create(model="a", prompt=text, max_tokens=10, temperature=0)
    expected = solo("a", prompt_ids(tok, text), 10)
    assert r.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(prompt_ids(tok, text)) and r.usage.completion_tokens == len(expected)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("stop" if expected[-1] == tok.eos_token_id else "length")
    # token ids as the prompt give the same result
    r2 = client.completions.create(model="a", prompt=list(prompt_ids(tok, text)), max_tokens=10, temperature=0)
    assert r2.choices[0].text == r.choices[0].text

    chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "Name a colour"}],
                                          max_tokens=9, temperature=0)
    expected = solo("b", chat_ids(tok, "Name a colour"), 9)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    assert chat.usage.prompt_tokens == len(chat_ids(tok, "Name a colour")) and chat.usage.completion_tokens == len(expected)

    chunks = list(client.chat.completions.create(model="b", messages=[{"role": "user", "content": "Name a colour"}],
                                                 max_tokens=9, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)

    pieces = list(client.completions.create(model="tiny", prompt=text, max_tokens=6, temperature=0, stream=True))
    expected = solo(BASE, prompt_ids(tok, text), 6)
    assert "".join(p.choices[0].text for p in pieces) == tok.decode(expected, skip_special_tokens=True)
    assert pieces[-1].choices[0].finish_reason is not None


def test_stop_sequences_cut_the_text(client, tok, solo):
    text = "Hello"
    full = client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="tiny", prompt=text, max_tokens=12, temperature=0, stop=stop, stream=True))
    assert "".join(p.choices[0].text for p in streamed) == r.choices[0].text


def test_concurrent_mixed_adapters_equal_solo_greedy(server, client, tok, solo):
    """Many requests over a, b and the base at once: each equals its adapter generating alone, token for token."""
    _, state = server
    before = dict(state.scheduler.stats)
    # (model, kind, prompt, max_tokens): different lengths so that rows join and leave at different steps
    kinds = ["text", "stream", "chat", "text"]
    jobs = [(["a", "b", "tiny"][i % 3], kinds[i % 4], f"Request number {i} says" + " more" * (i % 5), 4 + 3 * (i % 4))
            for i in range(12)]

    def run(job):
        model, kind, text, n = job
        if kind == "chat":
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=n, temperature=0)
            return r.choices[0].message.content, r.usage.completion_tokens
        if kind == "stream":
            stream = client.completions.create(model=model, prompt=text, max_tokens=n, temperature=0, stream=True)
            return "".join(p.choices[0].text for p in stream), None
        r = client.completions.create(model=model, prompt=text, max_tokens=n, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (model, kind, text, n), (got, count) in zip(jobs, results):
        ids = chat_ids(tok, text) if kind == "chat" else prompt_ids(tok, text)
        expected = solo(BASE if model == "tiny" else model, ids, n)
        assert got == tok.decode(expected, skip_special_tokens=True), (model, text)
        assert count in (None, len(expected))
    stats = state.scheduler.stats
    assert stats["mixed_steps"] > before["mixed_steps"], "requests for different adapters never shared a step"
    assert stats["max_rows"] >= 3


def test_seeded_sampling_is_reproducible_under_batching(client):
    def sample(seed, model="a"):
        r = client.completions.create(model=model, prompt="Pick a word:", max_tokens=12, temperature=0.9, top_p=0.95, seed=seed)
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(sample, [7, 7, 8, 7]))
    alone = sample(7)
    assert texts[0] == texts[1] == texts[3] == alone
    assert texts[2] != alone  # another seed draws another text (12 tokens from a near-flat distribution)


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"model": "nope", "prompt": "x"}, 404, "Available models: ['tiny', 'a', 'b'"),
        ({"model": "a", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "a", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
        ({"model": "a", "prompt": "x", "max_tokens": 10_000}, 400, "maximum context length is 256 tokens"),
        ({"model": "a", "prompt": "word " * 300}, 400, "context is 256 tokens"),
        ({"model": "a", "prompt": "x", "temperature": 2.5}, 400, "temperature"),
        ({"model": "a", "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": "a", "prompt": "x", "stop": ["1", "2", "3", "4", "5"]}, 400, "stop"),
        ({"model": "a", "prompt": "x", "best_of": 2}, 400, "best_of=2 is not supported"),
        ({"model": "a", "prompt": "x", "tools": []}, 400, "tools: unrecognized request argument"),
        ({"model": "a", "prompt": ["x", "y"]}, 400, "one prompt per request"),
        ({"model": "a", "prompt": [1, 99999999]}, 400, "outside the vocabulary"),
        ({"model": "a", "prompt": ""}, 400, "must not be empty"),
        ({"model": "a", "prompt": "x", "seed": 1.5}, 400, "seed"),
        ({"model": "a", "prompt": "x", "stream": "yes"}, 400, "stream"),
        ({"model": "a"}, 400, "prompt: Field required"),
    ],
)
def test_completion_validation_errors(server, body, status, fragment):
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"model": "a", "messages": []}, "messages"),
        ({"model": "a", "messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"model": "a", "messages": [{"role": "user", "content": 5}]}, "content"),
        ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_completion_tokens": 3}, "not both"),
        ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000}, "maximum context length"),
    ],
)
def test_chat_validation_errors(server, body, fragment):
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_errors_reach_the_openai_client_typed(client, server):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a", prompt="x", max_tokens=-1)
    r = httpx.post(server[0] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_failing_request_gets_an_error_and_the_others_do_not(server, client, tok, solo, monkeypatch):
    _, state = server
    poison, forward, fused_forward = 4242, state.registry.forward, state.registry.fused_forward

    def faulty(**inputs):
        if (inputs["input_ids"] == poison).any():
            raise RuntimeError("poisoned row")
        return forward(**inputs)

    def faulty_fused(input_ids, *args):  # a newcomer may arrive while rows decode: its prompt is then in their forward
        if (input_ids == poison).any():
            raise RuntimeError("poisoned row")
        return fused_forward(input_ids, *args)

    monkeypatch.setattr(state.registry, "forward", faulty)
    monkeypatch.setattr(state.registry, "fused_forward", faulty_fused)

    def bad(stream: bool):
        if not stream:
            return client.completions.create(model="a", prompt=[5, poison, 6], max_tokens=4, temperature=0)
        return "".join(p.choices[0].text for p in client.completions.create(
            model="a", prompt=[5, poison, 6], max_tokens=4, temperature=0, stream=True))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        bad_plain, bad_stream = pool.submit(bad, False), pool.submit(bad, True)
        good = pool.submit(lambda: client.completions.create(model="b", prompt="Unaffected", max_tokens=6, temperature=0))
        with pytest.raises(openai.InternalServerError, match="poisoned row"):
            bad_plain.result()
        with pytest.raises(openai.APIError, match="poisoned row"):
            bad_stream.result()
        assert good.result().choices[0].text == tok.decode(solo("b", prompt_ids(tok, "Unaffected"), 6), skip_special_tokens=True)


@contextmanager
def paced(model: torch.nn.Module, seconds: float):
    """Every forward of ``model`` takes at least ``seconds`` longer: a 240-token request then lasts >= 240 x that,
    however idle or busy the machine, so a test can leave it part-way through."""
    handle = model.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.slow
def test_serve_command_runs_from_one_command(tmp_path, adapters_dir, tok):
    """``python -m peftkit.serve`` (what ``peftkit serve`` runs) on a local model folder, in a subprocess."""
    folder = tmp_path / "model"
    make_base().save_pretrained(folder)
    tok.save_pretrained(folder)
    (tmp_path / "token").write_text(TOKEN + "\n")
    proc, url = start_server_process(["--model", str(folder), "--adapter", f"a={adapters_dir / 'a'}", "--api-key-file",
                                      str(tmp_path / "token"), "--max-batch-size", "4", "--log-level", "warning"])
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [str(folder), "a"]
        r = client.completions.create(model="a", prompt="Hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        assert admin(url, "DELETE", "/v1/adapters/a").json()["deleted"] is True
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_help(capsys):
    from peftkit.serve import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert exit_.value.code == 0 and "--adapter NAME=PATH" in help_text and "127.0.0.1" in help_text
    with pytest.raises(SystemExit) as exit_:  # a usage error: argparse's status 2 and its one line
        main(["--adapter", "no-equals-sign"])
    assert exit_.value.code == 2 and "NAME=PATH" in capsys.readouterr().err
