"""The sampling and output fields of OpenAI's API through the official `openai` client: ``n``, ``logprobs`` /
``top_logprobs``, ``stop`` across token boundaries, ``presence_penalty`` / ``frequency_penalty``, ``seed`` and
``stream_options.include_usage``. Real uvicorn, the tiny random Llama and adapters of test_serve.py; references are
hand computations from the reference model's logits."""

from __future__ import annotations

import concurrent.futures
from contextlib import nullcontext

import httpx
import openai
import pytest
import torch
from test_serve import adapters_dir, chat_ids, client, make_base, prompt_ids, ref, server, solo, tok  # noqa: F401

from peftkit.serve.sampling import SamplingParams, apply_penalties, choice_seed, token_logprobs
from peftkit.tuners.base import BASE


def _logits(ref, adapter: str, ids: list[int]) -> torch.Tensor:
    """The reference model's logits at every position of ``ids`` (positions, vocab), float32."""
    if adapter != BASE:
        ref.set_adapter(adapter)
    with (ref.disable_adapter() if adapter == BASE else nullcontext()), torch.inference_mode():
        return ref(torch.tensor([ids])).logits[0].float()


def _hand_greedy(ref, adapter: str, prompt: list[int], steps: int, presence: float = 0.0, frequency: float = 0.0,
                 eos: frozenset[int] = frozenset()) -> list[int]:
    """Greedy decoding with OpenAI's penalties applied by hand: z_t -= c_t * frequency + [c_t > 0] * presence."""
    out: list[int] = []
    for _ in range(steps):
        z = _logits(ref, adapter, prompt + out)[-1].clone()
        for t in set(out):
            c = out.count(t)
            z[t] -= c * frequency + presence
        out.append(int(z.argmax()))
        if out[-1] in eos:
            break
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sampling functions against hand computations


def test_penalties_follow_openais_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5], [9.0, 8.0, 7.0, 6.0]])
    counts = [torch.tensor([0.0, 2.0, 0.0, 1.0]), torch.tensor([3.0, 0.0, 0.0, 1.0])]
    params = [SamplingParams(1, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(1, presence_penalty=-1.0, frequency_penalty=2.0)]
    apply_penalties(logits, [0, 2], counts, params)
    # row 0: token 1 -= 2 * 0.25 + 0.5, token 3 -= 1 * 0.25 + 0.5; row 1 untouched; row 2 (second params)
    assert logits.tolist() == [[1.0, 1.0, 3.0, 3.25], [0.5, 0.5, 0.5, 0.5], [9.0 - 6.0 + 1.0, 8.0, 7.0, 6.0 - 2.0 + 1.0]]


def test_token_logprobs_are_of_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 1.0]])
    got = token_logprobs(logits, [0.5, 0.0], [2, 1], 2)  # T = 0.5; greedy counts as T = 1
    first, second = torch.log_softmax(logits[0] / 0.5, dim=0), torch.log_softmax(logits[1], dim=0)
    assert got[0].token == 2 and got[0].logprob == pytest.approx(float(first[2]))
    assert [t for t, _ in got[0].top] == [0, 1] and [lp for _, lp in got[0].top] == pytest.approx(first[:2].tolist())
    assert got[1].logprob == pytest.approx(float(second[1])) and got[1].top[0] == (1, pytest.approx(float(second[1])))
    assert token_logprobs(logits, [1.0, 1.0], [0, 0], 0)[0].top == []


def test_choice_seeds_are_distinct_and_stable():
    assert choice_seed(None, 3) is None and choice_seed(7, 0) == 7
    seeds = [choice_seed(7, i) for i in range(16)]
    assert len(set(seeds)) == 16 and seeds == [choice_seed(7, i) for i in range(16)]
    assert all(0 <= s < 2**64 for s in seeds)


# ----------------------------------------------------------------------------------------------------------------
# n


def test_n_choices_each_a_row_seeded_and_reproducible(client, tok, solo):
    kwargs = dict(model="a", prompt="Pick a word:", max_tokens=10, temperature=1.0, seed=11)
    r = client.completions.create(n=3, logprobs=0, **kwargs)
    texts = [c.text for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3  # distinct draws
    assert [c.text for c in client.completions.create(n=3, **kwargs).choices] == texts  # reproducible
    assert client.completions.create(n=1, **kwargs).choices[0].text == texts[0]  # choice 0 is the n=1 answer
    # usage: every choice's tokens (one logprobs entry each), the prompt once
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    assert r.usage.prompt_tokens == len(prompt_ids(tok, "Pick a word:"))
    # greedy: every choice is the solo answer
    chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=6,
                                          temperature=0)
    expected = tok.decode(solo("b", chat_ids(tok, "Hi"), 6), skip_special_tokens=True)
    assert [c.message.content for c in chat.choices] == [expected, expected]
    assert chat.usage.completion_tokens == 2 * len(solo("b", chat_ids(tok, "Hi"), 6))


def test_n_streams_every_choice_and_ends_with_usage(client, tok):
    chunks = list(client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "Tell me"}], n=2, max_tokens=8, temperature=0.8, seed=3,
        stream=True, stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Tell me"}], n=2,
                                           max_tokens=8, temperature=0.8, seed=3)
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[i].message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [whole.choices[i].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


# ----------------------------------------------------------------------------------------------------------------
# logprobs


def test_chat_logprobs_equal_log_softmax_of_the_models_logits(client, tok, ref, solo):
    r = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Name a colour"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    prompt = list(chat_ids(tok, "Name a colour"))
    ids = list(solo("a", tuple(prompt), 6))
    assert len(content) == r.usage.completion_tokens == len(ids)
    logp = torch.log_softmax(_logits(ref, "a", prompt + ids), dim=-1)[len(prompt) - 1 :]
    for k, entry in enumerate(content):
        top = logp[k].topk(3)
        token = ids[k]
        assert token == int(top.indices[0])  # greedy: the sampled token is the most likely
        assert entry.token == tok.decode([token]) and bytes(entry.bytes).decode("utf-8", "replace") == tok.decode([token])
        assert entry.logprob == pytest.approx(float(top.values[0]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([int(i)]) for i in top.indices]


def test_completion_logprobs_legacy_format_and_stream(client, tok, ref, solo):
    text = "The quick brown fox"
    r = client.completions.create(model="tiny", prompt=text, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    prompt = list(prompt_ids(tok, text))
    ids = list(solo(BASE, tuple(prompt), 5))
    expected = torch.log_softmax(_logits(ref, BASE, prompt + ids), dim=-1)[len(prompt) - 1 :]
    assert len(lp.tokens) == len(ids) and lp.tokens == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs == pytest.approx([float(expected[k, t]) for k, t in enumerate(ids)], abs=1e-4)
    for k, top in enumerate(lp.top_logprobs):  # {token text: logprob} of the 2 most likely
        best = expected[k].topk(2)
        assert top == {tok.decode([int(i)]): pytest.approx(float(v), abs=1e-4) for i, v in zip(best.indices, best.values)}
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = list(client.completions.create(model="tiny", prompt=text, max_tokens=5, temperature=0, logprobs=2,
                                              stream=True))
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset


# ----------------------------------------------------------------------------------------------------------------
# stop, penalties, seed


def test_stop_strings_across_token_boundaries(client, tok):
    text = "Once"
    full = client.completions.create(model="b", prompt=text, max_tokens=16, temperature=0, logprobs=0)
    pieces = full.choices[0].logprobs.tokens
    # a stop sequence made of the end of one token and the start of the next, where both have 2+ characters
    # (and whose first occurrence is there)
    def boundary(i: int) -> tuple[str, int]:
        return pieces[i][-2:] + pieces[i + 1][:2], len("".join(pieces[: i + 1])) - 2

    k = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
             and full.choices[0].text.index(boundary(i)[0]) == boundary(i)[1])
    stop, cut = boundary(k)
    for stops in (stop, ["never appears", stop]):
        r = client.completions.create(model="b", prompt=text, max_tokens=16, temperature=0, stop=stops)
        assert r.choices[0].text == full.choices[0].text[:cut] and r.choices[0].finish_reason == "stop"
        streamed = list(client.completions.create(model="b", prompt=text, max_tokens=16, temperature=0, stop=stops,
                                                  stream=True))
        assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text and stop not in r.choices[0].text


def test_penalties_end_to_end_equal_hand_greedy(client, tok, ref):
    text = "one one one"
    prompt = list(prompt_ids(tok, text))
    for presence, frequency in ((0.0, 2.0), (1.5, 0.0), (-0.5, 1.0)):
        r = client.completions.create(model="a", prompt=text, max_tokens=12, temperature=0,
                                      presence_penalty=presence, frequency_penalty=frequency, logprobs=0)
        expected = _hand_greedy(ref, "a", prompt, 12, presence, frequency,
                                eos=frozenset({ref.generation_config.eos_token_id, tok.eos_token_id}))
        assert r.choices[0].text == tok.decode(expected, skip_special_tokens=True), (presence, frequency)
    plain = client.completions.create(model="a", prompt=text, max_tokens=12, temperature=0).choices[0].text
    assert plain != client.completions.create(model="a", prompt=text, max_tokens=12, temperature=0,
                                              frequency_penalty=2.0).choices[0].text  # the penalty changed the text


def test_seed_reproducible_with_penalties_under_concurrency(client):
    def sample(seed):
        return client.completions.create(model="b", prompt="Say:", max_tokens=10, temperature=1.2, seed=seed,
                                         presence_penalty=0.7, n=2).choices

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        runs = [[c.text for c in choices] for choices in pool.map(sample, [5, 5, 6])]
    assert runs[0] == runs[1] and runs[0] != runs[2]


# ----------------------------------------------------------------------------------------------------------------
# Validation: OpenAI's ranges, OpenAI's error shape


@pytest.mark.parametrize(
    "path, extra, fragment",
    [
        ("/v1/completions", {"n": 0}, "n: Input should be greater than or equal to 1"),
        ("/v1/completions", {"n": 17}, "n: Input should be less than or equal to 16"),
        ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty: Input should be less than or equal to 2"),
        ("/v1/completions", {"frequency_penalty": -2.01}, "frequency_penalty: Input should be greater than or equal to -2"),
        ("/v1/completions", {"logprobs": 6}, "logprobs: Input should be less than or equal to 5"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/completions", {"stop": ["a", "b", "c", "d", "e"]}, "stop must be a non-empty string or a list of at most 4"),
        ("/v1/completions", {"stop": [""]}, "stop must be"),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options is only allowed with stream=true"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs needs logprobs=true"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs: Input should be less than or equal to 20"),
        ("/v1/chat/completions", {"n": 1.5}, "n: Input should be a valid integer"),
    ],
)
def test_field_validation_in_openais_error_shape(server, path, extra, fragment):
    body = {"model": "a", **({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})}
    r = httpx.post(server[0] + path, json={**body, **extra}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == list(extra)[-1], error
