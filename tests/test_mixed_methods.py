"""Every method in one batch: base rows, LoRA of two ranks and target sets, (IA)^3, Houlsby and Pfeiffer bottleneck
adapters, prompt tuning and prefix tuning, each row with its own adapter (``adapter_names=``), the layer methods
sharing modules.

The reference is each row served alone: its prompt without padding, its adapter active (``set_adapter``) or the base
(``disable_adapter``), through the method's own solo path (prompt tuning prepends its embeddings, prefix tuning
starts from its cache). Library: logits within 1e-5 (fp32), decode steps through the mixed cache, and ``generate``
token for token. Server: the official ``openai`` client, concurrent greedy requests for every method, each equal to
solo ``generate``, some adapters loaded on demand.
"""

from __future__ import annotations

import concurrent.futures
from contextlib import nullcontext
from pathlib import Path

import openai
import pytest
import torch
from conftest import tiny_bert_classifier, tiny_llama
from test_serve import serving

import peftkit as pk
from peftkit.hf_compat import find_cache
from peftkit.serve import create_app
from peftkit.serve.registry import AdapterRegistry, read_adapter
from peftkit.tuners.base import BASE
from peftkit.tuners.bottleneck import BottleneckLayer
from peftkit.tuners.mixed_prompts import cache_mask

# Layer methods share modules: LoRA r=8 on every linear layer, (IA)^3 on k/v/down (its Llama default), Houlsby on o/down
# and Pfeiffer on down, so down_proj holds a bottleneck layer around an (IA)^3 layer around a LoRA layer.
CONFIGS = {
    "lora4": lambda: pk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "lora8": lambda: pk.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "ia3": lambda: pk.IA3Config(init_ia3_weights=False),
    "houlsby": lambda: pk.BottleneckConfig(variant="houlsby", reduction_factor=8),
    "pfeiffer": lambda: pk.BottleneckConfig(variant="pfeiffer", reduction_factor=4, non_linearity="gelu"),
    "prompt": lambda: pk.PromptTuningConfig(num_virtual_tokens=5),
    "prefix": lambda: pk.PrefixTuningConfig(num_virtual_tokens=3),
}
NAMES = [BASE, "lora4", "prompt", "lora8", "ia3", "prefix", "houlsby", "pfeiffer", "prompt", "prefix", BASE]
LENGTHS = [7, 3, 9, 5, 8, 1, 6, 2, 1, 9, 4]


def every_method(vocab_size: int = 128, seed: int = 1) -> pk.PeftModel:
    """A tiny Llama holding one adapter of each kind, all with non-zero weights (bottleneck up-projections start at
    zero: filled at random; prompt and prefix tuning start at N(0, 1))."""
    names = list(CONFIGS)
    pm = pk.get_peft_model(tiny_llama(vocab_size=vocab_size, seed=seed), CONFIGS[names[0]](), names[0])
    for name in names[1:]:
        pm.add_adapter(name, CONFIGS[name]())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in pm.adapter_layers():
            if isinstance(layer, BottleneckLayer):
                for up in layer.adapter_up.values():
                    for p in up.parameters():
                        p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return pm.eval()


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
    return ids, mask


def alone(pm: pk.PeftModel, name: str):
    if name == BASE:
        return pm.disable_adapter()
    pm.set_adapter(name)
    return nullcontext()


@torch.no_grad()
def solo_logits(pm: pk.PeftModel, name: str, ids: torch.Tensor) -> torch.Tensor:
    """(len, vocab): the row alone; prompt tuning's virtual positions dropped."""
    with alone(pm, name):
        return pm(input_ids=ids[None]).logits[0, -len(ids) :]


@pytest.fixture(scope="module")
def pm() -> pk.PeftModel:
    return every_method()


@pytest.fixture(scope="module")
def rows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 128, (n,), generator=g) for n in LENGTHS]


def test_every_method_in_one_batch_equals_each_row_alone(pm, rows):
    ids, mask = left_padded(rows)
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
    assert out.logits.shape == (len(NAMES), ids.shape[1], 128)  # aligned with input_ids, fronts dropped
    worst = 0.0
    for b, (name, r) in enumerate(zip(NAMES, rows)):
        solo = solo_logits(pm, name, r)
        diff = (out.logits[b, -len(r) :] - solo).abs().max().item()
        worst = max(worst, diff)
        assert diff <= 1e-5, name
    with pm.disable_adapter(), torch.no_grad():  # every adapter really moves its rows away from the base
        base = pm(input_ids=ids, attention_mask=mask).logits
    for b, name in enumerate(NAMES):
        moved = (out.logits[b, -LENGTHS[b] :] - base[b, -LENGTHS[b] :]).abs().max().item()
        assert (moved > 1e-3) == (name != BASE), name
    print(f"max |mixed - solo| logits over {len(NAMES)} rows: {worst:.2e}")


def test_adapters_sharing_modules_equal_each_adapter_on_a_model_of_its_own(pm, rows, tmp_path):
    """The reference without any sharing: each adapter saved, then loaded alone onto a fresh base (this also checks
    that layers wrapped by another method's layer save under the module's own name, HF PEFT's keys)."""
    down = pm.base_model.model.layers[0].mlp.down_proj
    assert [type(m).__name__ for m in (down, down.base_layer, down.base_layer.base_layer)] == [
        "BottleneckLayer", "IA3Layer", "LoraLayer"]
    assert "base_model.model.model.layers.0.mlp.down_proj.ia3_l" in pm.adapter_tensors("ia3")
    pm.save_pretrained(tmp_path)
    ids, mask = left_padded(rows)
    with torch.no_grad():
        mixed = pm(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        for b, (name, r) in enumerate(zip(NAMES, rows)):
            if name == BASE:
                own = tiny_llama(seed=1)(input_ids=r[None]).logits[0]
            else:
                own = pk.PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / name, name)(input_ids=r[None]).logits[0]
            assert (mixed[b, -len(r) :] - own[-len(r) :]).abs().max().item() <= 1e-5, name


def test_merging_into_shared_modules_is_refused_and_unload_restores_the_model(rows):
    pm = every_method()
    with pytest.raises(TypeError, match=r"model.layers.0.self_attn.k_proj holds adapters of several methods; merging \['ia3'\] into the weights"):
        pm.merge_adapter(["ia3"])
    assert pm.merged_adapters == []
    plain = pm.unload()
    reference = tiny_llama(seed=1)
    assert [type(m) for m in plain.modules()] == [type(m) for m in reference.modules()]
    with torch.no_grad():
        assert torch.equal(plain(input_ids=rows[0][None]).logits, reference(input_ids=rows[0][None]).logits)


def test_decode_steps_through_the_mixed_cache_equal_each_row_alone(pm, rows):
    """Greedy steps after the prefill, fed through the cache with the mask that covers the fronts."""
    ids, mask = left_padded(rows)
    seqs = [r.tolist() for r in rows]
    worst = 0.0
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask, adapter_names=NAMES, use_cache=True)
        cache, full = find_cache(out), cache_mask(pm, NAMES, mask)
        assert cache.get_seq_length() == full.shape[1] == 3 + 5 + ids.shape[1]  # prefix front, prompt front, input
        logits = out.logits[:, -1]
        for _ in range(4):
            for b, name in enumerate(NAMES):
                diff = (logits[b] - solo_logits(pm, name, torch.tensor(seqs[b]))[-1]).abs().max().item()
                worst = max(worst, diff)
                assert diff <= 1e-5, name
            token = logits.argmax(dim=-1)
            for b in range(len(NAMES)):
                seqs[b].append(int(token[b]))
            step = pm(input_ids=token[:, None], attention_mask=torch.cat((full, torch.ones_like(full[:, :1])), dim=1),
                      position_ids=full.sum(dim=1, keepdim=True), cache=cache, adapter_names=NAMES, use_cache=True)
            full = torch.cat((full, torch.ones_like(full[:, :1])), dim=1)
            logits = step.logits[:, -1]
    print(f"max |mixed - solo| logits over 4 decode steps: {worst:.2e}")


def test_generate_with_every_method_equals_each_row_generating_alone(pm, rows):
    ids, mask = left_padded(rows)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = pm.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **kw)
        assert torch.equal(mixed[:, : ids.shape[1]], ids)
        eos = pm.generation_config.eos_token_id
        for b, (name, r) in enumerate(zip(NAMES, rows)):
            with alone(pm, name):
                solo = pm.generate(input_ids=r[None], **kw)[0, len(r) :].tolist()
            got = mixed[b, ids.shape[1] :].tolist()
            if eos in got:  # a row that ends early is padded in the batch
                got = got[: got.index(eos) + 1]
            assert got == solo, name


def test_mixed_batch_errors_name_the_problem(pm):
    ids, mask = left_padded([torch.tensor([5, 6, 7]), torch.tensor([8, 9])])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\] in adapter_names"):
        pm(input_ids=ids, adapter_names=["prompt", "nope"])
    with pytest.raises(ValueError, match="adapter_names has 1 entries but the batch has 2 rows"):
        pm(input_ids=ids, adapter_names=["prefix"])
    with pytest.raises(TypeError, match="pass input_ids=... .* by keyword"):
        pm(ids, adapter_names=["prompt", BASE])
    with pytest.raises(ValueError, match="labels are not supported in a mixed batch with prompt- or prefix-tuning rows"):
        pm(input_ids=ids, labels=ids, adapter_names=["prefix", "lora4"])
    with pytest.raises(ValueError, match="num_beams and num_return_sequences must be 1"):
        pm.generate(input_ids=ids, attention_mask=mask, adapter_names=["prompt", BASE], num_beams=2, max_new_tokens=2)
    pm.train()
    try:
        with pytest.raises(RuntimeError, match=r"is for inference: call model.eval\(\) first"):
            pm(input_ids=ids, adapter_names=["prompt", "prefix"])
    finally:
        pm.eval()
    merged = pk.get_peft_model(tiny_llama(), CONFIGS["lora4"](), "lora4")
    merged.add_adapter("prompt", CONFIGS["prompt"]())
    merged.eval().merge_adapter(["lora4"])
    with pytest.raises(RuntimeError, match=r"adapters \['lora4'\] are merged; unmerge_adapter\(\) before mixed"):
        merged(input_ids=ids, adapter_names=["prompt", "lora4"])


def test_sequence_classifiers_mix_left_padded_on_decoders_and_are_refused_on_encoders():
    """A decoder's classifier reads the last column (given embeddings): left-padded rows equal each row alone, right
    padding is refused; an encoder's pooler reads the first column, which the fronts move: refused."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, num_labels=3, pad_token_id=0)
    pm = pk.get_peft_model(LlamaForSequenceClassification(config), pk.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"), "prompt")
    pm.add_adapter("lora", pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", init_lora_weights=False))
    pm.add_adapter("prefix", pk.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    pm.eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 128, (n,), generator=g) for n in (3, 2, 4, 1)]
    names = ["prompt", "lora", "prefix", BASE]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        mixed = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for b, (name, r) in enumerate(zip(names, rows)):
            with alone(pm, name):
                assert (mixed[b] - pm(input_ids=r[None]).logits[0]).abs().max().item() <= 1e-5, name
        with pytest.raises(ValueError, match="sequence classification in a mixed batch .* needs left-padded input"):
            pm(input_ids=ids.flip(1), attention_mask=mask.flip(1), adapter_names=names)
    bert = pk.get_peft_model(tiny_bert_classifier(), pk.PromptTuningConfig(num_virtual_tokens=2, task_type="SEQ_CLS")).eval()
    with pytest.raises(ValueError, match="needs a decoder-only model; bert is an encoder"):
        bert(input_ids=ids, attention_mask=mask, adapter_names=["default", BASE, "default", BASE])


def test_server_prefill_adds_fronts_once_and_right_aligns_the_cache(pm, rows, tmp_path):
    """The host's prefill on a fresh cache: the returned mask covers the fronts and ends every row at the last
    column (the decode batch's layout); a later chunk on the filled cache adds no front again."""
    pm.save_pretrained(tmp_path)
    registry = AdapterRegistry(tiny_llama(seed=1), type("Tok", (), {"eos_token_id": 0, "pad_token_id": 0})(), "tiny")
    for name in CONFIGS:
        config, tensors = read_adapter(tmp_path / name)
        registry.attach(name, config, tensors, str(tmp_path / name))
    ids, mask = left_padded(rows)
    mask = mask.bool()
    half = ids.shape[1] - 3
    cache = registry.new_cache()
    _, first = registry.prefill(ids[:, :half], mask[:, :half], cache, NAMES)
    counts = torch.tensor([{"prompt": 5, "prefix": 3}.get(n, 0) for n in NAMES])
    assert torch.equal(first.sum(dim=1), counts + mask[:, :half].sum(dim=1))
    assert torch.equal(first.long().sort(dim=1).values, first.long())  # each row's columns end at the right
    full = torch.cat((first, mask[:, half:]), dim=1)
    logits, after = registry.prefill(ids[:, half:], full, cache, NAMES)
    assert torch.equal(after, full) and cache.get_seq_length() == full.shape[1]
    for b, (name, r) in enumerate(zip(NAMES, rows)):
        assert (logits[b] - solo_logits(pm, name, r)[-1]).abs().max().item() <= 1e-5, name


# ----------------------------------------------------------------------------------------------------------------
# The server: every method in one batch, through the official client

VOCAB = 49152  # SmolLM2's tokenizer, as in test_serve.py


@pytest.fixture(scope="module")
def tok():
    return pk.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Adapter folders of every method for a tiny Llama with SmolLM2's vocabulary, and the reference model."""
    root: Path = tmp_path_factory.mktemp("every_method")
    ref = every_method(vocab_size=VOCAB)
    ref.save_pretrained(root)
    return root, ref


def test_server_answers_every_method_at_once_as_each_alone(served, tok):
    root, ref = served
    names = list(CONFIGS)
    # three loaded at start, the others on demand from the folder (so layers nest in another order than in `ref`);
    # a prefill budget of 16 tokens: longer prompts go in by chunks (the first adds the virtual front, later ones not)
    app = create_app(tiny_llama(vocab_size=VOCAB, seed=1), tok, base_name="tiny", adapters_dir=root,
                     adapters={n: str(root / n) for n in ("lora4", "ia3", "prompt")}, max_batch_size=8, max_queue=32,
                     prefill_chunk=16)
    eos = sorted({ref.generation_config.eos_token_id, tok.eos_token_id} - {None})
    jobs = [(model, f"Request {i} for {model}" + " and more" * (3 * (i % 4)), 6 + i % 4)  # prompts of 5 to 33 tokens
            for i, model in enumerate(["tiny", *names, *reversed(names)])]  # (each method has a short and a long one)
    registry, steps, chunks = app.state.server.registry, [], []
    decode = registry.forward

    def recorded(**inputs):  # every forward after a first prefill: decode steps and later chunks of long prompts
        (chunks if inputs["input_ids"].shape[1] > 1 else steps).append(set(inputs["adapter_names"]))
        return decode(**inputs)

    fused, fused_newcomers, fused_forward = [], [], registry.fused_forward

    def fused_recorded(input_ids, position_ids, layout, adapter_names, keep):  # decode steps with newcomers' prompts
        fused.append(set(adapter_names[: layout.rows]))
        fused_newcomers.append({adapter_names[start] for start in layout.starts})
        return fused_forward(input_ids, position_ids, layout, adapter_names, keep)

    registry.forward, registry.fused_forward = recorded, fused_recorded
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def run(job):
            model, text, n = job
            return client.completions.create(model=model, prompt=text, max_tokens=n, temperature=0).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(run, jobs))  # the first wave loads four adapters on demand
            answers += list(pool.map(run, jobs))  # the second finds every adapter loaded
        stats = dict(app.state.server.scheduler.stats)
        keys = app.state.server.scheduler.call(lambda: sorted(registry.key(n) for n in names)).result(timeout=30)
        assert sorted(registry.peft.peft_config) == keys
    for (model, text, n), got in zip(jobs + jobs, answers):
        ids = torch.tensor([tok(text).input_ids])
        with alone(ref, BASE if model == "tiny" else model), torch.no_grad():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                               eos_token_id=eos, pad_token_id=tok.pad_token_id)
        assert got == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), (model, text)
    assert stats["mixed_steps"] > 0 and stats["max_rows"] >= 4, stats
    # prompt and prefix rows decoded in the same steps as rows of the layer methods and the base
    assert any({"prompt", "prefix"} <= s and len(s - {"prompt", "prefix"}) >= 2 for s in steps), steps
    assert {"prompt", "prefix"} <= set().union(*chunks), chunks  # their long prompts went in by chunks
    # running prompt and prefix rows took newcomers' prompts in their steps, and their own newcomers went into steps
    # with their fronts
    assert any(s & {"prompt", "prefix"} for s in fused), fused
    assert {"prompt", "prefix"} <= set().union(*fused_newcomers), fused_newcomers


def test_the_context_limit_counts_an_adapter_s_virtual_tokens(served, tok):
    """Prompt and prefix tuning put their virtual tokens before the prompt, in the same positions: a request must
    leave room for them (a model with learned positions would index past its table otherwise)."""
    root, _ = served
    app = create_app(tiny_llama(vocab_size=VOCAB, seed=1), tok, base_name="tiny", adapters_dir=root, max_batch_size=4,
                     max_queue=8)
    context = 256  # tiny_llama's max_position_embeddings
    ids = [5] * 240
    with serving(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for model in ("tiny", "lora4"):  # 240 + 14 fits without virtual tokens
            done = client.completions.create(model=model, prompt=ids, max_tokens=14, temperature=0)
            assert done.choices[0].finish_reason in ("length", "stop")
        for model, virtual in (("prompt", 5), ("prefix", 3)):
            with pytest.raises(openai.BadRequestError) as err:
                client.completions.create(model=model, prompt=ids, max_tokens=14, temperature=0)
            assert err.value.code == "context_length_exceeded"
            assert f"{virtual} virtual tokens of adapter '{model}', 240 in the prompt, 14 for the completion" in err.value.message
            fits = client.completions.create(model=model, prompt=ids, max_tokens=context - 240 - virtual, temperature=0)
            assert fits.usage.prompt_tokens == 240
            with pytest.raises(openai.BadRequestError, match=f"behind the adapter's {virtual} virtual tokens"):
                client.completions.create(model=model, prompt=[5] * (context - virtual), max_tokens=1)
            chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                  temperature=0)  # no max_tokens: what the context leaves, fronts counted
            assert chat.choices[0].finish_reason in ("length", "stop")
            assert chat.usage.prompt_tokens + chat.usage.completion_tokens <= context - virtual


@pytest.mark.slow
def test_every_method_on_smollm2_in_float64_equals_each_row_alone(tok):
    """The real model (SmolLM2-135M, 30 layers) in float64, where rounding is out of the way: every row of the mixed
    batch equals its solo run to 1e-9 (measured: 1e-13). In float32 the same batch differs from solo runs by up to
    about 5e-5 for most rows and 1e-2 for a random N(0, 1) prefix: a batch of other shapes sums in another order."""
    model = pk.load_model("smollm2-135m")[0].double()
    names = list(CONFIGS)
    pm = pk.get_peft_model(model, CONFIGS[names[0]](), names[0])
    for name in names[1:]:
        pm.add_adapter(name, CONFIGS[name]())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "adapter_up" in n:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif "ia3_l" in n:  # N(0, 1) vectors would wreck a real model: around 1
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    pm.eval()
    texts = ["The capital of France is", "Write a poem about the sea.", "1, 2, 3, 4,", "Translate: good morning",
             "Once upon a time there was", "The quick brown fox", "def fibonacci(n):", "Hello"]
    rows = [torch.tensor(tok(t).input_ids) for t in texts]
    names = [BASE, *names]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        mixed = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        with pm.disable_adapter():
            base = pm(input_ids=ids, attention_mask=mask).logits
    for b, (name, r) in enumerate(zip(names, rows)):
        assert (mixed[b, -len(r) :] - solo_logits(pm, name, r)).abs().max().item() <= 1e-9, name
        assert ((mixed[b, -len(r) :] - base[b, -len(r) :]).abs().max().item() > 1e-2) == (name != BASE), name

