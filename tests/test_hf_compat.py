"""Adapter files move both ways between peftkit and Hugging Face PEFT, with the same outputs (<= 1e-5)."""

import copy
import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from test_lora import randomize_b

import peftkit as pk

peft = pytest.importorskip("peft", reason="Hugging Face peft is a dev dependency: pip install -e .[dev]")

X = torch.randint(1, 120, (2, 10), generator=torch.Generator().manual_seed(0))


def minilm_classifier():
    model, _ = pk.load_model("minilm-l6", task="seq-cls", num_labels=2)
    return model


CASES = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "llama-all-linear-rslora": (tiny_llama, dict(r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear")),
    "gpt2-conv1d": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "minilm-seq-cls": (minilm_classifier, dict(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")),
}


def out(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def perturb_head(pm: pk.PeftModel) -> None:
    """Make the saved classifier copy differ from the base one, so loading it is actually tested."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05)


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_file_loads_in_hf(tmp_path, case):
    factory, kwargs = CASES[case]
    model = factory()
    pm = pk.get_peft_model(copy.deepcopy(model), pk.LoraConfig(**kwargs))
    randomize_b(pm, "default")
    perturb_head(pm)
    pm.eval()
    ours = out(pm, X)
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert (out(hf, X) - ours).abs().max().item() <= 1e-5
    assert not torch.allclose(ours, out(model.eval(), X))  # the adapter really changes the output


@pytest.mark.parametrize("case", list(CASES))
def test_hf_file_loads_in_peftkit(tmp_path, case):
    factory, kwargs = CASES[case]
    model = factory()
    hf = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name or "modules_to_save" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    hf.eval()
    theirs = out(hf, X)
    hf.save_pretrained(tmp_path)
    pm = pk.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert (out(pm, X) - theirs).abs().max().item() <= 1e-5


def test_same_keys_shapes_and_config_fields(tmp_path):
    model = tiny_llama()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pk.get_peft_model(copy.deepcopy(model), pk.LoraConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "hf")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    hf_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert set(our_config) <= set(hf_config)
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "fan_in_fan_out", "inference_mode"):
        assert our_config[key] == hf_config[key], key


def test_non_default_adapters_in_subfolders_both_ways(tmp_path):
    model = tiny_llama()
    pm = pk.get_peft_model(copy.deepcopy(model), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.add_adapter("sql", pk.LoraConfig(r=2, target_modules=["v_proj"]))
    randomize_b(pm, "sql", 5)
    pm.set_adapter("sql")
    ours = out(pm.eval(), X)
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "sql" / "adapter_model.safetensors").exists()
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    hf.load_adapter(tmp_path / "sql", adapter_name="sql")
    hf.set_adapter("sql")
    assert (out(hf.eval(), X) - ours).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_real_smollm2_trained_adapter_both_ways(tmp_path, smollm2):
    """Train a few steps on real text so the adapter is non-trivial, then cross-load in both directions."""
    model, tok = smollm2
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lines = (pytest.importorskip("conftest").DATA / "text" / "tinyshakespeare.txt").read_text().splitlines()[:64]
    batch = tok(" ".join(lines)[:2000], return_tensors="pt").input_ids[:, :64]
    pm = pk.get_peft_model(model, pk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    pm.train()
    losses = []
    for _ in range(3):
        loss = pm(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    pm.eval()
    ours = out(pm, batch[:, :32])
    pm.save_pretrained(tmp_path)
    plain = pm.unload()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in base_state.items())
    hf = peft.PeftModel.from_pretrained(plain, tmp_path).eval()
    assert (out(hf, batch[:, :32]) - ours).abs().max().item() <= 1e-5
    hf.save_pretrained(tmp_path / "hf")
    plain = hf.unload()
    back = pk.PeftModel.from_pretrained(plain, tmp_path / "hf")
    assert (out(back, batch[:, :32]) - ours).abs().max().item() <= 1e-5
    back.unload()
