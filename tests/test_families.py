"""Model families: an architecture peftkit has never seen (GPT-NeoX) becomes usable by one table entry, after which
LoRA, (IA)^3 and Houlsby adapters train on it with their defaults, from Python and from the command line; an
unknown model type fails with one line that says what to pass."""

import json
import shutil

import pytest
import torch
from conftest import ALPACA_TINY, adamw_steps
from safetensors import safe_open

import peftkit as pk
from peftkit import cli, families
from peftkit.families import Family, register_family

NEOX = Family(
    encoder=False, heads=("embed_out", "score"), classifier="score",
    layers="layers", attention_output="attention.dense", feedforward_output="mlp.dense_4h_to_h",
    lora_targets=("query_key_value",),
    ia3_targets=("query_key_value", "dense_4h_to_h"), ia3_feedforward=("dense_4h_to_h",),
)

CONFIGS = {"lora": pk.LoraConfig, "ia3": pk.IA3Config, "houlsby": pk.BottleneckConfig}
WRAPPED = {  # per layer, what each method's defaults must wrap
    "lora": ["attention.query_key_value"],
    "ia3": ["attention.query_key_value", "mlp.dense_4h_to_h"],
    "houlsby": ["attention.dense", "mlp.dense_4h_to_h"],
}


@pytest.fixture
def neox_family():
    assert "gpt_neox" not in families.FAMILIES  # absent from peftkit's table: the one entry below is all it gets
    register_family("gpt_neox", NEOX)
    yield
    del families.FAMILIES["gpt_neox"]


def tiny_neox(vocab_size: int = 128, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=vocab_size, max_position_embeddings=128)
    return GPTNeoXForCausalLM(config).eval()


def train_steps(pm: pk.PeftModel, ids: torch.Tensor, steps: int) -> list[float]:
    return adamw_steps(pm, steps, 5e-2, lambda _: {"input_ids": ids, "labels": ids})


@pytest.mark.parametrize("method", list(CONFIGS))
def test_a_new_family_trains_with_each_methods_defaults(neox_family, method, tmp_path):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (4, 16))
    pm = pk.get_peft_model(tiny_neox(), CONFIGS[method]())
    wrapped = [name for name, _ in pm.adapter_layers()]
    assert wrapped == [f"gpt_neox.layers.{i}.{m}" for i in range(2) for m in WRAPPED[method]]
    config = pm.peft_config["default"]
    if method == "lora":
        assert config.target_modules == ["query_key_value"]  # written into the file, as HF PEFT does
    if method == "ia3":
        assert (config.target_modules, config.feedforward_modules) == (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"])
        assert [layer.is_feedforward for _, layer in pm.adapter_layers()] == [False, True, False, True]

    losses = train_steps(pm, ids, steps=12)
    assert losses[0] == pytest.approx(4.86, abs=0.1)  # ln(128): the adapters start as the identity
    assert losses[-1] < losses[0] - 0.1 and max(losses[-3:]) < min(losses[:3]), losses

    pm.save_pretrained(tmp_path)
    loaded = pk.PeftModel.from_pretrained(tiny_neox(), tmp_path)
    assert [name for name, _ in loaded.adapter_layers()] == wrapped
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max().item() <= 1e-6


def test_a_new_family_in_the_command_line(neox_family, tiny_lm, tmp_path, capsys):
    model_dir = save_tiny_neox(tiny_lm, tmp_path / "neox")
    for method in CONFIGS:
        run = tmp_path / method
        assert cli.main(["train", "--model", str(model_dir), "--data", str(ALPACA_TINY), "--method", method,
                         "--max-steps", "2", "--batch-size", "2", "--eval-every", "0", "--save-every", "0",
                         "--num-samples", "0", "--out", str(run), "--quiet"]) == 0
        saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
        with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        expected = [f"gpt_neox.layers.{i}.{m}." for i in range(2) for m in WRAPPED[method]]
        assert all(any(e in k for k in keys) for e in expected) and all(any(e in k for e in expected) for k in keys)
        if method != "houlsby":
            assert saved["target_modules"] == list(getattr(NEOX, f"{method}_targets"))
    capsys.readouterr()


def save_tiny_neox(tokenizer_source, folder):
    """A tiny random GPT-NeoX saved with the tiny Llama's tokenizer: a model folder of a family peftkit lacks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    model = tiny_neox(vocab_size=len(tokenizer))
    model.config.eos_token_id, model.config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_source / name).exists():
            shutil.copy(tokenizer_source / name, folder / name)
    return folder


@pytest.mark.parametrize("method", list(CONFIGS))
def test_unknown_model_type_is_one_line_saying_what_to_pass(method):
    with pytest.raises(ValueError) as err:
        pk.get_peft_model(tiny_neox(), CONFIGS[method]())
    message = str(err.value)
    assert "\n" not in message and "model type 'gpt_neox'" in message
    assert "pass " in message and "target_modules" in message
    assert "register_family('gpt_neox', Family(...))" in message


def test_unknown_model_type_in_the_command_line(tiny_lm, tmp_path, capsys):
    model_dir = save_tiny_neox(tiny_lm, tmp_path / "neox")
    capsys.readouterr()
    assert cli.main(["train", "--model", str(model_dir), "--data", str(ALPACA_TINY), "--max-steps", "1",
                     "--out", str(tmp_path / "run"), "--quiet"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("peftkit train: error: peftkit has no default LoRA targets for model "
                                                   "type 'gpt_neox'")
    assert "pass target_modules" in lines[0]


def test_table_answers_for_heads_layers_and_encoders():
    assert families.head_names() == {"lm_head", "score", "classifier", "qa_outputs"}
    assert families.layer_containers() == ("layers", "h", "layer", "blocks")
    assert families.classifier_modules() == ["classifier", "score"]
    assert families.is_encoder("bert") and not families.is_encoder("llama") and not families.is_encoder(None)
    with pytest.raises(ValueError, match="ia3_feedforward"):
        Family(encoder=False, heads=(), classifier="score", ia3_targets=("q",), ia3_feedforward=("down",))


@pytest.mark.parametrize("model_type", sorted(families.FAMILIES))
def test_defaults_agree_with_hf_peft_where_it_has_them(model_type):
    """Every default that HF PEFT also defines is HF PEFT's, so a config written by either tool means the same."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as IA3_FF,
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3,
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA,
    )

    family = families.FAMILIES[model_type]
    for ours, theirs in ((family.lora_targets, LORA), (family.ia3_targets, IA3), (family.ia3_feedforward, IA3_FF)):
        if model_type in theirs:
            assert list(ours) == list(theirs[model_type])
