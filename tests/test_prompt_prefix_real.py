"""Prompt and prefix tuning on the real models: trainable parameter counts against HF PEFT's, and learning real data
(SmolLM2 on Shakespeare, MiniLM on SST-2) with files that reload to the same outputs."""

import json
import statistics
from contextlib import contextmanager

import pytest
import torch
from conftest import DATA, assert_learns_and_reloads
from test_prompt_prefix import logits

import peftkit as pk
from peftkit.tuners.prefix import PrefixTuningConfig
from peftkit.tuners.prompt import PromptTuningConfig


@contextmanager
def borrowed(model: torch.nn.Module, config):
    """A PeftModel on a shared model, handed back unchanged (structure, requires_grad, eval mode) afterwards."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    pm = pk.get_peft_model(model, config)
    try:
        yield pm
    finally:
        pm.unload()
        model.eval()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


@pytest.mark.slow
def test_trainable_parameter_counts_on_the_real_models(smollm2, minilm):
    counts = {}
    for name, model in (("smollm2", smollm2[0]), ("minilm", minilm[0])):
        for method, config in (("prompt", PromptTuningConfig(num_virtual_tokens=20)), ("prefix", PrefixTuningConfig(num_virtual_tokens=20))):
            with borrowed(model, config) as pm:
                counts[name, method] = pm.get_nb_trainable_parameters()[0]
    assert counts == {
        ("smollm2", "prompt"): 20 * 576,  # 11,520
        ("smollm2", "prefix"): 20 * 30 * 2 * 3 * 64,  # 30 layers, keys and values, 3 KV heads of 64: 230,400
        ("minilm", "prompt"): 20 * 384,  # 7,680
        ("minilm", "prefix"): 20 * 6 * 2 * 384,  # 92,160
    }


@pytest.mark.slow
def test_prompt_tuning_learns_shakespeare_on_smollm2_and_reloads(tmp_path, smollm2):
    """Text-initialised prompt tuning on SmolLM2, fitting one batch of two 16-token Shakespeare chunks: the mean loss
    of the last 5 of 10 steps falls below 0.9 x the first 5, and the saved adapter reloads to the trained model's
    logits (<= 1e-6)."""
    model, tokenizer = smollm2
    ids = tokenizer((DATA / "text" / "tinyshakespeare.txt").read_text()[:1000])["input_ids"]
    batch = torch.tensor([ids[:16], ids[16:32]])
    config = PromptTuningConfig(
        num_virtual_tokens=8, prompt_tuning_init="text", prompt_tuning_init_text="A scene from a play by Shakespeare:",
        tokenizer=tokenizer, task_type="CAUSAL_LM",
    )
    with borrowed(model, config) as pm:
        optimizer = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
        pm.train()
        losses = []
        for _ in range(10):
            loss = pm(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        pm.eval()
        assert statistics.mean(losses[-5:]) < 0.9 * statistics.mean(losses[:5]), losses
        trained = logits(pm, input_ids=batch)
        pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["tokenizer_name_or_path"]
    loaded = pk.PeftModel.from_pretrained(model, tmp_path)
    try:
        assert (logits(loaded, input_ids=batch) - trained).abs().max().item() <= 1e-6
    finally:
        loaded.unload()


@pytest.mark.slow
def test_prefix_tuning_learns_sst2_on_minilm_and_reloads(tmp_path, minilm):
    """10 virtual tokens (46,080 parameters) fitting one batch of 16 SST-2 sentences through the frozen head."""
    assert_learns_and_reloads(tmp_path, minilm, PrefixTuningConfig(num_virtual_tokens=10), lr=1e-1, balanced=False, sentences=16)
