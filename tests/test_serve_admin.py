"""The server's adapter management (admin token, paths, bad adapters, load and delete while serving) and its limits
(a full queue, clients that go away, admin disabled without a token), through HTTP and the openai client."""

from __future__ import annotations

import concurrent.futures
import threading

import httpx
import openai
import pytest
from test_serve import (  # noqa: F401  (fixtures)
    adapters_dir, admin, client, make_base, paced, prompt_ids, ref, server, serving, solo, tok,
)

from peftkit.serve import create_app


# ----------------------------------------------------------------------------------------------------------------
# Adapter management


def test_admin_needs_the_bearer_token(server):
    url, _ = server
    assert admin(url, "POST", "/v1/adapters", token=None, json={"name": "c", "path": "c"}).status_code == 401
    assert admin(url, "POST", "/v1/adapters", token="wrong", json={"name": "c", "path": "c"}).status_code == 401
    assert admin(url, "DELETE", "/v1/adapters/a", token="wrong").status_code == 401
    assert admin(url, "POST", "/v1/adapters", token=None, json={"bad": "body"}).status_code == 401  # auth first
    assert admin(url, "DELETE", "/v1/adapters/nope").status_code == 404
    assert admin(url, "POST", "/v1/adapters", json={"name": "a", "path": "c"}).status_code == 409
    assert admin(url, "POST", "/v1/adapters", json={"name": "bad name!", "path": "c"}).status_code == 400


def test_admin_refuses_paths_outside_the_adapters_dir(server, adapters_dir, tmp_path):
    url, _ = server
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    link = adapters_dir / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    try:
        for path in ("../outside", str(outside), "sneaky", "c/../../outside", "/etc"):
            r = admin(url, "POST", "/v1/adapters", json={"name": "x", "path": path})
            assert r.status_code == 400 and "outside the adapters directory" in r.json()["error"]["message"], path
        r = admin(url, "POST", "/v1/adapters", json={"name": "x", "path": "missing"})
        assert r.status_code == 400 and "adapter_config.json" in r.json()["error"]["message"]
    finally:
        link.unlink()


def test_bad_adapter_is_refused_and_leaves_the_server_intact(server, client, adapters_dir, tok, solo):
    url, _ = server
    broken = adapters_dir / "broken"
    broken.mkdir(exist_ok=True)
    config = (adapters_dir / "a" / "adapter_config.json").read_text().replace('"r": 4', '"r": 5')
    (broken / "adapter_config.json").write_text(config)
    (broken / "adapter_model.safetensors").write_bytes((adapters_dir / "a" / "adapter_model.safetensors").read_bytes())
    r = admin(url, "POST", "/v1/adapters", json={"name": "broken", "path": "broken"})
    assert r.status_code == 400 and "shape" in r.json()["error"]["message"]
    assert "broken" not in [m.id for m in client.models.list().data if m.status == "loaded"]
    text = client.completions.create(model="a", prompt="Still fine", max_tokens=5, temperature=0).choices[0].text
    assert text == tok.decode(solo("a", prompt_ids(tok, "Still fine"), 5), skip_special_tokens=True)


def test_load_and_delete_at_run_time_while_serving(server, client, tok, solo, monkeypatch):
    url, state = server
    import peftkit.serve.ondemand as load_module  # where POST /v1/adapters reads folders

    slow_read = load_module.read_adapter
    disk = threading.Event()  # a slow disk, released only after a request was served meanwhile (no timing race)

    def read_slowly(path):
        assert disk.wait(120), "the read was never released"
        return slow_read(path)

    monkeypatch.setattr(load_module, "read_adapter", read_slowly)
    stream = client.completions.create(model="a", prompt="A long story", max_tokens=40, temperature=0, stream=True)
    loader = concurrent.futures.ThreadPoolExecutor(1).submit(admin, url, "POST", "/v1/adapters", json={"name": "c", "path": "c"})
    during = client.completions.create(model="b", prompt="Meanwhile", max_tokens=4, temperature=0).choices[0].text
    assert not loader.done(), "a request waited for the adapter load"
    disk.set()
    assert during == tok.decode(solo("b", prompt_ids(tok, "Meanwhile"), 4), skip_special_tokens=True)
    assert loader.result().status_code == 200, loader.result().text
    story = "".join(p.choices[0].text for p in stream)
    assert story == tok.decode(solo("a", prompt_ids(tok, "A long story"), 40), skip_special_tokens=True)

    assert "c" in [m.id for m in client.models.list().data]
    got = client.completions.create(model="c", prompt="New adapter", max_tokens=8, temperature=0).choices[0].text
    assert got == tok.decode(solo("c", prompt_ids(tok, "New adapter"), 8), skip_special_tokens=True)

    # deleting waits for the request using it, which finishes unchanged; afterwards "c" is gone
    key = state.scheduler.call(lambda: state.registry.key("c")).result(timeout=30)  # (its name inside the model)
    stream = client.completions.create(model="c", prompt="Last words", max_tokens=30, temperature=0, stream=True)
    first = next(iter(stream)).choices[0].text
    deleted = admin(url, "DELETE", "/v1/adapters/c")
    rest = "".join(p.choices[0].text for p in stream)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert first + rest == tok.decode(solo("c", prompt_ids(tok, "Last words"), 30), skip_special_tokens=True)
    assert [m.status for m in client.models.list().data if m.id == "c"] == ["on_disk"]  # loadable, not loaded
    assert state.registry.peft is not None and key not in state.registry.peft.peft_config
    assert not state.registry.has_adapter("c")


# ----------------------------------------------------------------------------------------------------------------
# Limits: queue full, disconnects, admin disabled


@pytest.fixture(scope="module")
def small_server(adapters_dir, tok):
    """One request at a time, one waiting, no admin token."""
    app = create_app(make_base(), tok, base_name="tiny", adapters={"a": str(adapters_dir / "a")},
                     adapters_dir=adapters_dir, api_key=None, max_batch_size=1, max_queue=1)
    with serving(app) as url:
        yield url, app.state.server


def test_admin_disabled_without_token(small_server):
    url, _ = small_server
    r = admin(url, "POST", "/v1/adapters", json={"name": "c", "path": "c"})
    assert r.status_code == 403 and "--api-key-file" in r.json()["error"]["message"]
    assert admin(url, "DELETE", "/v1/adapters/a").status_code == 403


def test_full_queue_answers_429_and_disconnects_free_slots(small_server, tok, solo):
    """What must hold under any load: a full queue answers 429, and a client that goes away (stream closed, or
    timed out) frees its row, so its request produces fewer tokens than it asked for and the next request runs."""
    url, state = small_server
    with paced(state.scheduler.host.model, 0.03):  # the long requests take >= 7 s, their clients leave within 1 s
        full_queue_and_disconnects(url, state, tok, solo)


def full_queue_and_disconnects(url, state, tok, solo):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    long = dict(model="a", prompt="Go on and on", max_tokens=240, temperature=0, stream=True)
    first = client.completions.create(**long)
    next(iter(first))  # running now (the only slot)
    second = client.completions.create(**{**long, "max_tokens": 5})  # waiting (the only queue place)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="a", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "queue_full"
    first.close()  # the client goes away: its row is freed and the waiting request runs
    text = "".join(p.choices[0].text for p in second)
    assert text == tok.decode(solo("a", prompt_ids(tok, "Go on and on"), 5), skip_special_tokens=True)
    assert state.scheduler.stats["tokens"] < 240  # the abandoned request stopped early

    # a non-streaming client that gives up (timeout) frees its slot too
    before = state.scheduler.stats["tokens"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "Go", "max_tokens": 240, "temperature": 0}, timeout=0.3)
    r = client.completions.create(model="a", prompt="After", max_tokens=3, temperature=0)
    assert r.choices[0].text == tok.decode(solo("a", prompt_ids(tok, "After"), 3), skip_special_tokens=True)
    assert state.scheduler.stats["tokens"] - before < 240
