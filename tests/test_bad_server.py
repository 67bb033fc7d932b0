"""Bad adapters and bad numbers at the server: refused at start-up and by POST /v1/adapters with a 4xx naming the
key or file (OpenAI's error shape), and a request whose logits are NaN/Inf gets a 422, never a 500 or empty text."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import openai
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from test_serve import TOKEN, VOCAB, admin, client, make_base, serving, tok  # noqa: F401 (fixtures)

import peftkit as pk
from peftkit import checkpoint
from peftkit.serve import create_app
from peftkit.serve.command import main as serve_main
from peftkit.serve.sampling import greedy_and_unusable

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _tensor(folder: Path, value: torch.Tensor) -> None:
    tensors = load_file(folder / checkpoint.WEIGHTS_NAME)
    tensors[KEY] = value
    save_file(tensors, folder / checkpoint.WEIGHTS_NAME)


def _flip(folder: Path) -> None:
    path = folder / checkpoint.WEIGHTS_NAME
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))


def _config(folder: Path, **fields) -> None:
    path = folder / checkpoint.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


# name -> (how the copy of a good adapter is damaged, what the refusal must say)
BROKEN = {
    "nan": (lambda f: _tensor(f, torch.full((64, 4), math.nan)), f"tensor {KEY} holds 256 NaN/Inf value(s) of 256"),
    "inf": (lambda f: _tensor(f, torch.full((64, 4), math.inf)), f"tensor {KEY} holds 256 NaN/Inf"),
    "int64": (lambda f: _tensor(f, torch.ones(64, 4, dtype=torch.int64)), f"tensor {KEY} is int64, not floating point"),
    "flipped": (_flip, "adapter_model.safetensors: its tensor data does not match the SHA-256"),
    "truncated": (lambda f: (f / checkpoint.WEIGHTS_NAME).write_bytes((f / checkpoint.WEIGHTS_NAME).read_bytes()[:50]),
                  "adapter_model.safetensors is not a readable safetensors file"),
    "no-weights": (lambda f: (f / checkpoint.WEIGHTS_NAME).unlink(), "no adapter weights at"),
    "alpha0": (lambda f: _config(f, lora_alpha=0), "LoraConfig.lora_alpha must be a finite number > 0"),
    "bad-json": (lambda f: (f / checkpoint.CONFIG_NAME).write_text("{"), "adapter_config.json is not valid JSON"),
}


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory) -> Path:
    """"good" and "spare" (random non-zero LoRA), and one damaged copy of "good" per BROKEN entry."""
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in (("good", 1), ("spare", 2)):
        torch.manual_seed(seed)
        pm = pk.get_peft_model(tiny_llama(vocab_size=VOCAB, seed=1),
                               pk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        pm.save_pretrained(root / name)
    for name, (damage, _) in BROKEN.items():
        shutil.copytree(root / "good", root / name)
        damage(root / name)
    return root


@pytest.fixture(scope="module")
def server(adapters_dir, tok):
    app = create_app(make_base(), tok, base_name="tiny", adapters={"good": str(adapters_dir / "good")},
                     adapters_dir=adapters_dir, api_key=TOKEN, max_batch_size=4, max_queue=8)
    with serving(app) as url:
        yield url, app.state.server


@pytest.mark.parametrize("name", ["nan", "int64", "flipped", "no-weights"])
def test_a_bad_adapter_stops_the_server_at_start_up(adapters_dir, tok, name):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(BROKEN[name][1])):
        create_app(make_base(), tok, base_name="tiny", adapters={"x": str(adapters_dir / name)})


def test_the_serve_command_names_the_bad_adapter_in_one_line(adapters_dir, tiny_lm, capsys):
    import socket

    with socket.socket() as s:  # a free port: the command checks it can listen before loading anything
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = serve_main(["--model", str(tiny_lm), "--adapter", f"x={adapters_dir / 'nan'}", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err  # the CLI's handler: one line, status 1 (peftkit.cli.errors)
    (line,) = [line for line in err.splitlines() if line.startswith("peftkit serve: error: ")]
    assert BROKEN["nan"][1] in line


@pytest.mark.parametrize("name", list(BROKEN))
def test_post_adapters_refuses_a_bad_adapter_with_400_naming_it(server, client, name):
    url, _ = server
    r = admin(url, "POST", "/v1/adapters", json={"name": f"bad-{name}", "path": name})
    error = r.json()["error"]
    assert r.status_code == 400 and error["type"] == "invalid_request_error" and error["param"] == "path"
    assert error["message"].startswith(f"cannot load adapter 'bad-{name}' from '{name}': ")
    assert BROKEN[name][1] in error["message"] and str(server[1].adapters_dir) not in error["message"]
    assert [m.id for m in client.models.list().data if m.status == "loaded"] == ["tiny", "good"]
    assert client.completions.create(model="good", prompt="Still here", max_tokens=3, temperature=0).choices[0].text


@pytest.mark.parametrize("name, fragment", [("good", "the name 'good' is taken; DELETE /v1/adapters/good first"),
                                            ("tiny", "the name 'tiny' is taken")])
def test_post_adapters_refuses_a_name_in_use_with_409(server, name, fragment):
    url, _ = server
    r = admin(url, "POST", "/v1/adapters", json={"name": name, "path": "spare"})
    assert r.status_code == 409
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                  "param": "name", "code": "adapter_exists"}}
    assert fragment in r.json()["error"]["message"]


def _poison(state, adapter: str) -> None:
    """Make a loaded adapter's weights NaN behind the load checks (as an overflow at run time would)."""

    def fill() -> None:
        key = state.registry.key(adapter)  # (its name inside the model)
        with torch.no_grad():
            for name, p in state.registry.peft.named_parameters():
                if f"lora_B.{key}." in name:
                    p.fill_(math.nan)

    state.scheduler.call(fill).result(timeout=30)


def test_non_finite_logits_answer_422_and_leave_other_requests_alone(server, client):
    url, state = server
    assert admin(url, "POST", "/v1/adapters", json={"name": "spare", "path": "spare"}).status_code == 200
    healthy = client.completions.create(model="good", prompt="Hello", max_tokens=4, temperature=0).choices[0].text
    _poison(state, "spare")
    message = "adapter 'spare' gave non-finite logits (NaN or Inf) at output token 1"
    for sampling in ({"temperature": 0}, {"temperature": 0.8, "seed": 1}, {"temperature": 1.0, "top_p": 0.5}):
        with pytest.raises(openai.UnprocessableEntityError, match=re.escape(message)):
            client.completions.create(model="spare", prompt="Hello", max_tokens=4, **sampling)
    with pytest.raises(openai.APIError, match="gave non-finite logits"):
        list(client.chat.completions.create(model="spare", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, stream=True))
    assert client.completions.create(model="good", prompt="Hello", max_tokens=4, temperature=0).choices[0].text == healthy
    assert client.completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=0).choices[0].text
    assert admin(url, "DELETE", "/v1/adapters/spare").status_code == 200


def test_greedy_and_unusable():
    rows = torch.tensor([[0.0, 1.0, 2.0], [0.0, -math.inf, 2.0], [math.nan, 1.0, 2.0], [0.0, math.inf, 1.0],
                         [-math.inf, -math.inf, -math.inf], [3.0, 5.0, 5.0]])
    greedy, broken = greedy_and_unusable(rows)
    assert broken.tolist() == [False, False, True, True, True, False]
    assert greedy[[0, 1, 5]].tolist() == [2, 2, 1]  # (a tie: the first, as argmax and generate take)
