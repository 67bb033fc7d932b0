"""Fused steps (serve/fused.py): newcomers' prompts in the same forward as the running rows' next tokens must give
what a decode step and a prefill apart give, keep every answer equal to solo generation, and fall back to separate
prefills whenever a fused forward cannot be trusted."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from test_serve import _scheduler, _seq, adapters_dir, prompt_ids, ref, solo, tok  # noqa: F401  (fixtures)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import peftkit as pk
from peftkit.serve.batch import KVBatch, left_pad
from peftkit.serve.fused import RAGGED, FusedLayout, FusionGate, LayoutIgnored, flat_step
from peftkit.serve.registry import AdapterRegistry
from peftkit.tuners.base import BASE

METHODS = {  # one adapter of each stacked method, two LoRA shapes
    "lora-qv": lambda: pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "lora-all": lambda: pk.LoraConfig(r=8, lora_alpha=4, target_modules="all-linear", init_lora_weights=False),
    "ia3": lambda: pk.IA3Config(),
    "houlsby": lambda: pk.BottleneckConfig(variant="houlsby", reduction_factor=8),
}


def _registry() -> AdapterRegistry:
    class Tok:
        eos_token_id, pad_token_id = 2, 0

    registry = AdapterRegistry(tiny_llama(), Tok(), "tiny")
    source = tiny_llama(seed=1)
    for k, (name, make) in enumerate(METHODS.items()):
        pm = pk.get_peft_model(source, make(), name)
        with torch.no_grad():  # away from the identity init, so every adapter changes the output
            g = torch.Generator().manual_seed(k)
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        registry.attach(name, pm.peft_config[name], {n: t.clone() for n, t in pm.adapter_tensors(name).items()}, "mem")
        source = pm.unload()
    return registry


def _apart_and_fused(registry: AdapterRegistry, rows: list[str], prompts: list[list[int]],
                     newcomers: list[tuple[str, list[int]]]) -> dict:
    """Prefill ``rows`` (one prompt each) into a batch; then from copies of that batch, one decode step apart and
    each newcomer's prefill alone, and one fused step of both. Returns the logits of each and the fused layout."""
    with torch.inference_mode():
        cache = registry.new_cache()
        logits, cache_mask = registry.prefill(*left_pad(prompts, registry.pad_id), cache, rows)
        batch = KVBatch(cache, cache_mask, cache_mask.sum(dim=1))
        apart = copy.deepcopy(batch)
        step = logits.argmax(dim=-1, keepdim=True)
        decoded = registry.forward(input_ids=step, cache=apart.cache, adapter_names=rows, **apart.step_inputs())
        alone = [registry.prefill(*left_pad([p], registry.pad_id), registry.new_cache(), [name])[0]
                 for name, p in newcomers]
        fronts = [registry.front(name) for name, _ in newcomers]
        flat, positions, lengths, keep = flat_step(step[:, 0].tolist(), batch.lengths, [p for _, p in newcomers],
                                                   fronts, registry.pad_id)
        layout = FusedLayout(len(rows), batch.cache, batch.step_inputs()["attention_mask"], lengths,
                             [registry.new_cache() for _ in newcomers], fronts)
        names = rows + [name for (name, _), n in zip(newcomers, lengths) for _ in range(n)]
        fused = registry.fused_forward(flat, positions, layout, names, keep)
    return {"prefill": logits, "decoded": decoded, "alone": alone, "fused": fused, "layout": layout,
            "caches": (batch.cache, apart.cache)}


def test_a_fused_step_gives_the_decode_step_and_the_prefills_apart():
    registry = _registry()
    rows = ["lora-qv", "ia3", BASE, "houlsby", "lora-all", "lora-qv"]
    prompts = [[5, 9, 11, 3, 7][: 3 + i % 3] for i in range(len(rows))]
    newcomers = [("lora-all", [4, 8, 15, 16, 23, 42]), ("houlsby", [7, 7, 1]), ("ia3", [3, 1, 4, 1, 5]), (BASE, [9, 2])]
    out = _apart_and_fused(registry, rows, prompts, newcomers)
    fused = out["fused"]
    assert out["layout"].attended == 2  # both layers' attention went through fused_attention
    assert (fused[: len(rows)] - out["decoded"]).abs().max().item() < 1e-6
    for k, logits_alone in enumerate(out["alone"]):
        assert (fused[len(rows) + k] - logits_alone[0]).abs().max().item() < 1e-5, newcomers[k][0]
    for mine, theirs in zip(*(c.layers for c in out["caches"])):
        assert (mine.keys - theirs.keys).abs().max().item() < 1e-6


def test_prompt_and_prefix_rows_and_newcomers_fuse_with_their_fronts():
    """Prompt- and prefix-tuning rows already running have their virtual fronts in the batch's cache; their newcomers
    get them in the fused step itself (prompt tuning: virtual embeddings as the first tokens of the newcomer's part;
    prefix tuning: key/value columns in its fresh cache, attended before its tokens). Either way the fused step gives
    the decode step and each prefill apart, logits and cache columns alike, also beside an adapter on the input
    embeddings (the layer whose output the prompt-tuning embeddings replace)."""
    registry = _registry()
    for name, config in (("prompt", pk.PromptTuningConfig(num_virtual_tokens=3)),
                         ("prefix", pk.PrefixTuningConfig(num_virtual_tokens=2)),
                         ("emb", pk.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False))):
        pm = pk.get_peft_model(tiny_llama(seed=2), config, name)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        registry.attach(name, pm.peft_config[name], {n: t.clone() for n, t in pm.adapter_tensors(name).items()}, "mem")
    assert registry.can_fuse()
    assert [registry.front(n) for n in ("prompt", "prefix", "lora-qv", BASE)] == [(3, 0), (0, 2), (0, 0), (0, 0)]
    rows = ["prompt", "lora-qv", "prefix", BASE, "prompt", "houlsby", "emb"]
    prompts = [[5, 9, 11, 3, 7][: 2 + i % 4] for i in range(len(rows))]
    newcomers = [("prefix", [4, 8, 15, 16]), ("lora-all", [4, 8, 15, 16]), ("prompt", [3, 1, 4]), ("prefix", [6]),
                 ("prompt", [2]), ("ia3", [3, 1, 4]), ("emb", [7, 7])]
    out = _apart_and_fused(registry, rows, prompts, newcomers)
    fused, layout = out["fused"], out["layout"]
    assert layout.lengths == [4, 4, 6, 1, 4, 3, 2]  # prompt-tuning newcomers carry their 3 virtual tokens
    assert (fused[: len(rows)] - out["decoded"]).abs().max().item() < 1e-6
    for k, logits_alone in enumerate(out["alone"]):
        assert (fused[len(rows) + k] - logits_alone[0]).abs().max().item() < 1e-5, newcomers[k][0]
    with torch.inference_mode():  # each newcomer's cache holds what its prefill alone puts there, fronts included
        for (name, p), cache in zip(newcomers, layout.caches):
            alone_cache = registry.new_cache()
            registry.prefill(*left_pad([p], registry.pad_id), alone_cache, [name])
            for mine, theirs in zip(cache.layers, alone_cache.layers):
                assert mine.keys.shape == theirs.keys.shape, name
                assert (mine.keys - theirs.keys).abs().max().item() < 1e-5, name
                assert (mine.values - theirs.values).abs().max().item() < 1e-5, name
        # (the fronts really change these rows' outputs: else this test would prove little)
        plain, _ = registry.prefill(*left_pad(prompts, registry.pad_id), registry.new_cache(), [BASE] * len(rows))
        fresh = [registry.prefill(*left_pad([p], registry.pad_id), registry.new_cache(), [BASE])[0] for _, p in newcomers]
    for row in (0, 2):
        assert (out["prefill"][row] - plain[row]).abs().max().item() > 1e-3
    for k in (0, 2, 3, 4):
        assert (fused[len(rows) + k] - fresh[k][0]).abs().max().item() > 1e-3, newcomers[k][0]


def test_a_fused_step_without_adapters_is_the_plain_model_s():
    """No adapter loaded: the registry serves the plain model, and a fused step still gives the steps apart."""
    class Tok:
        eos_token_id, pad_token_id = 2, 0

    registry = AdapterRegistry(tiny_llama(), Tok(), "tiny")
    rows = [BASE, BASE]
    with torch.inference_mode():
        cache = registry.new_cache()
        logits, cache_mask = registry.prefill(*left_pad([[1, 2, 3], [4, 5]], registry.pad_id), cache, rows)
        batch = KVBatch(cache, cache_mask, cache_mask.sum(dim=1))
        apart = copy.deepcopy(batch)
        step = logits.argmax(dim=-1, keepdim=True)
        decoded = registry.forward(input_ids=step, cache=apart.cache, adapter_names=rows, **apart.step_inputs())
        alone, _ = registry.prefill(*left_pad([[7, 8, 9, 10]], registry.pad_id), registry.new_cache(), [BASE])
        layout = FusedLayout(2, batch.cache, batch.step_inputs()["attention_mask"], [4], [registry.new_cache()])
        fused = registry.fused_forward(torch.tensor([step[:, 0].tolist() + [7, 8, 9, 10]]),
                                       torch.cat([batch.lengths, torch.arange(4)])[None], layout, rows + [BASE] * 4,
                                       torch.tensor([0, 1, 5]))
    assert registry.peft is None and layout.attended == 2
    assert (fused[:2] - decoded).abs().max().item() < 1e-6 and (fused[2] - alone[0]).abs().max().item() < 1e-5


def _jobs():
    return [("a", "Once upon a time", 12), (BASE, "The capital of France", 5), ("b", "x", 9),
            ("c", "A much longer prompt than the others", 7), ("a", "Hi", 10)]


def _run(sched, tok, jobs) -> list:
    seqs = [_seq(tok, adapter, prompt_ids(tok, p), n)[0] for adapter, p, n in jobs]
    sched.submit(seqs[0], seqs[1])
    sched.step()  # no rows yet: the two prefilled together apart, then one decode step
    sched.step()
    sched.submit(seqs[2], seqs[3])
    sched.step()  # both into the running step's forward
    sched.submit(seqs[4])
    while sched.load["running"] or sched.load["waiting"]:
        sched.step()
    return seqs


def test_the_scheduler_fuses_newcomers_and_answers_equal_solo(adapters_dir, tok, solo):
    sched, _ = _scheduler(adapters_dir, tok, max_batch_size=8)
    jobs = _jobs()
    seqs = _run(sched, tok, jobs)
    for seq, (adapter, p, n) in zip(seqs, jobs):
        assert tuple(seq.output_ids) == solo(adapter, prompt_ids(tok, p), n), adapter
    assert sched.stats["fused"] == 3 and sched.stats["recoveries"] == 0


def test_a_failed_fused_step_sends_every_row_back_to_prefill(adapters_dir, tok, solo):
    sched, registry = _scheduler(adapters_dir, tok, max_batch_size=8)
    forward, calls = registry.peft.forward, []

    def failing_once(*args, **kwargs):  # inside the fused forward: the registry's gate sees the failure
        if kwargs.get("per_token"):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("transient")
        return forward(*args, **kwargs)

    registry.peft.forward = failing_once
    registry.fusion = FusionGate(pause=1)  # a transient failure: prefill apart once, then fuse again
    jobs = _jobs() + [("b", "Another one", 4)]
    seqs = [_seq(tok, adapter, prompt_ids(tok, p), n)[0] for adapter, p, n in jobs]
    sched.submit(seqs[0], seqs[1])
    sched.step()
    sched.step()
    sched.submit(seqs[2], seqs[3])
    sched.step()  # the fused step fails: every row goes back to prefill, together, apart from any decode step
    assert sched.stats["recoveries"] == 1 and registry.fusion.paused == 1
    sched.step()
    sched.submit(seqs[4])
    sched.step()  # fusion paused: prefilled apart
    sched.submit(seqs[5])
    sched.step()  # fused again
    while sched.load["running"] or sched.load["waiting"]:
        sched.step()
    for seq, (adapter, p, n) in zip(seqs, jobs):
        assert tuple(seq.output_ids) == solo(adapter, prompt_ids(tok, p), n), adapter
    assert len(calls) == 2 and sched.stats["recoveries"] == 1 and sched.stats["fused"] == 1 and registry.fusable


def test_the_fusion_gate_pauses_after_failures_and_shuts_after_lasting_ones():
    gate = FusionGate(pause=2, max_failures=3)
    gate.failed(RuntimeError("out of memory"))
    assert [gate.open() for _ in range(3)] == [False, False, True]  # paused for 2 candidate steps
    gate.failed(RuntimeError("again"))
    assert [gate.open() for _ in range(5)] == [False] * 4 + [True]  # twice as long for a second failure in a row
    gate.succeeded()
    gate.failed(RuntimeError("a later one"))  # a success in between: the count starts again
    assert gate.paused == 2 and not gate.off
    gate.failed(RuntimeError("2"))
    gate.failed(RuntimeError("3"))
    assert gate.off and not gate.open()  # max_failures in a row
    for lasting in (LayoutIgnored("attention ignored the layout"), TypeError("unexpected keyword argument 'fused'")):
        gate = FusionGate()
        gate.failed(lasting)
        assert gate.off and not gate.open()


def test_a_model_whose_attention_ignores_the_layout_is_never_fused(adapters_dir, tok, solo, monkeypatch):
    """If the model's attention did not go through fused_attention (another implementation, custom code), its logits
    would be computed over the wrong keys: the registry notices, refuses them and never fuses again."""
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, RAGGED,
                        lambda module, q, k, v, mask, fused=None, **kw: sdpa_attention_forward(module, q, k, v, None, **kw))
    sched, registry = _scheduler(adapters_dir, tok, max_batch_size=8)
    jobs = _jobs()
    seqs = _run(sched, tok, jobs)
    for seq, (adapter, p, n) in zip(seqs, jobs):
        assert tuple(seq.output_ids) == solo(adapter, prompt_ids(tok, p), n), adapter
    assert not registry.fusable and sched.stats["fused"] == 0 and sched.stats["recoveries"] == 1


def test_per_token_forward_refuses_prompt_tuning_and_counts_tokens():
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    pm.add_adapter("p", pk.PromptTuningConfig(num_virtual_tokens=2))
    pm.eval()
    x = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="per-token adapter_names cannot hold prompt or prefix tuning"):
        pm(input_ids=x, adapter_names=["a", "p", "a"], per_token=True)
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 tokens"):
        pm(input_ids=x, adapter_names=["a", "a"], per_token=True)
