"""peftkit plan: shapes against real configs, the activation count against autograd's saved tensors, the peaks
against measured ones (bench/plan_validate.py), the QLoRA 65B case against hand computation, the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.cli import main
from peftkit.models import resolve_model_path
from peftkit.plan import Recipe, layer_activation_elements, make_plan, _targets
from peftkit.plan_shapes import PRESETS, parse_memory, shape_from_config

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "bench" / "results" / "plan_validate.json"
GiB = 2**30


def hf_model(name: str, layers: int | None = None, device: str = "meta"):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(resolve_model_path(name))
    if layers:
        config.num_hidden_layers = layers
    config._attn_implementation = "sdpa"
    cls = AutoModelForSequenceClassification if name == "minilm-l6" else AutoModelForCausalLM
    with torch.device(device):
        torch.manual_seed(0)
        return cls.from_config(config)


# ------------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ["smollm2-135m", "minilm-l6"])
def test_embedded_presets_equal_their_config_and_parameter_count(name):
    from_config = shape_from_config(resolve_model_path(name), name)
    assert from_config == PRESETS[name]
    model = hf_model(name)
    assert PRESETS[name].total_params() == sum(p.numel() for p in model.parameters())


def test_llama_presets_have_the_published_parameter_counts():
    counts = {name: PRESETS[name].total_params() for name in ("llama-7b", "llama-13b", "llama-65b", "llama2-70b", "llama3-8b")}
    assert counts == {"llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-65b": 65_285_660_672,
                      "llama2-70b": 68_976_648_192, "llama3-8b": 8_030_261_248}  # fmt: skip


# ---------------------------------------------------------------------------------- activations, tensor by tensor


def saved_per_token(model, x, labels, layer_index: int = 1) -> float:
    """Bytes autograd saves inside one layer per token: storages saved there that are neither parameters nor
    shared with another layer (rotary cos/sin are computed once per forward)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = [m for n, m in model.named_modules() if n.endswith(("layers.0", "layer.0", "layers.1", "layer.1"))]
    current = [None]
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *a, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda *a: current.__setitem__(0, None))
    seen: dict[int, dict[int, int]] = {0: {}, 1: {}}

    def pack(t):
        if current[0] is not None:
            seen[current[0]][t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=labels)
    mine = {k: v for k, v in seen[layer_index].items() if k not in params and k not in seen[1 - layer_index]}
    return sum(mine.values()) / x.numel()


@pytest.mark.parametrize("name", ["smollm2-135m", "minilm-l6"])
@pytest.mark.parametrize("method", ["lora", "full", "lora-all"])
def test_layer_activation_count_equals_autograd_saved_tensors(name, method):
    import peftkit as pk

    model = hf_model(name, layers=2, device="cpu")
    encoder = name == "minilm-l6"
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        targets = "all-linear" if method == "lora-all" else None
        model = pk.get_peft_model(model, pk.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                       task_type="SEQ_CLS" if encoder else "CAUSAL_LM"))  # fmt: skip
    model.train()
    x = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1]) if encoder else x
    measured = saved_per_token(model, x, labels)
    recipe = Recipe(method="lora" if method != "full" else "full", targets=("all-linear",) if method == "lora-all" else (),
                    seq=64, batch=2, dtype="float32", device="cpu")  # fmt: skip
    shape = PRESETS[name]
    wide, masks = layer_activation_elements(shape, recipe, _targets(shape, recipe), 64)
    assert measured == 4 * (wide + masks)  # fp32 everywhere on CPU, dropout masks included


# ------------------------------------------------------------------------------------ peaks measured on this CPU


def recipe_for(row: dict) -> Recipe:
    return Recipe(method=row["method"], quantization=row["quantization"] or "none", batch=row["batch"], seq=row["seq"],
                  gradient_checkpointing=row["gradient_checkpointing"], dtype=row["dtype"],
                  adapter_dtype=row["adapter_dtype"], device="cpu")  # fmt: skip


def test_planner_is_within_15_percent_of_the_measured_peaks():
    rows = json.loads(MEASURED.read_text())
    assert {r["case"] for r in rows} == {"smollm2 lora", "smollm2 lora bf16", "smollm2 qlora", "smollm2 qlora + checkpointing", "smollm2 full",
                                         "minilm lora", "minilm qlora", "minilm full"}  # fmt: skip
    errors = {}
    for row in rows:
        plan = make_plan(PRESETS[row["model"]], recipe_for(row))
        assert plan.params_trainable == row["trainable_params"]
        # what is alive before the step (weights, adapters, optimizer state) is counted exactly, to 1%
        fixed = plan.base_weight_bytes + plan.trainable_bytes + plan.optimizer_bytes
        assert fixed == pytest.approx(row["start_bytes"], rel=0.01), row["case"]
        errors[row["case"]] = plan.peak_bytes / row["peak_bytes"] - 1
    assert max(abs(e) for e in errors.values()) < 0.15, errors
    assert max(abs(e) for e in errors.values()) < 0.05, errors  # what it achieves today (BENCHMARKS.md)


@pytest.mark.slow
def test_a_fresh_measurement_agrees_with_the_recorded_one():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "plan_validate.py"), "--child", "minilm lora"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    recorded = next(r for r in json.loads(MEASURED.read_text()) if r["case"] == "minilm lora")
    assert fresh["peak_bytes"] == pytest.approx(recorded["peak_bytes"], rel=0.01)
    plan = make_plan(PRESETS["minilm-l6"], recipe_for(fresh))
    assert abs(plan.peak_bytes / fresh["peak_bytes"] - 1) < 0.15


# ------------------------------------------------------------------------------------ QLoRA: 65B in 48 GB


QLORA_65B = Recipe(method="lora", targets=("all-linear",), r=64, quantization="nf4", double_quant=True, batch=1, seq=512,
                   gradient_checkpointing=True, optimizer="paged_adamw_32bit", dtype="bfloat16", adapter_dtype="bfloat16")  # fmt: skip


def test_qlora_65b_split_matches_hand_computation():
    plan = make_plan(PRESETS["llama-65b"], QLORA_65B)
    h, inter, layers, vocab = 8192, 22016, 80, 32000
    linear = layers * (4 * h * h + 3 * h * inter)  # q, k, v, o and gate, up, down in every layer
    assert linear == 64_760_053_760
    # NF4: 4 bits; double quantization: one uint8 absmax per 64 weights and one fp32 constant per 256 blocks
    bits = 4 + 8 / 64 + 32 / (64 * 256)
    assert round(bits, 3) == 4.127
    assert plan.quantized_bits_per_param == pytest.approx(bits, abs=1e-4)  # + one code table per layer
    rest = 2 * vocab * h + (2 * layers + 1) * h  # embeddings, untied head, RMSNorm weights: bf16
    assert plan.base_weight_bytes == pytest.approx(linear * bits / 8 + 2 * rest, rel=1e-5)
    lora = layers * 64 * (4 * (h + h) + 3 * (h + inter))  # r x (in + out) per adapted matrix
    assert plan.params_trainable == lora == 799_539_200
    assert plan.trainable_bytes == plan.gradient_bytes == 2 * lora  # bf16 adapters, as the paper's code
    assert plan.optimizer_bytes == 8 * lora and plan.optimizer_pageable  # paged AdamW: two fp32 moments
    # checkpointing: each layer's input (bf16) + one layer recomputed; the head: logits + fp32 copy, log-softmax, grad
    assert plan.activation_bytes > layers * 512 * h * 2
    assert plan.head_bytes == 512 * vocab * (2 + 4 + 8)
    assert 41 * GiB < plan.peak_bytes < 43 * GiB
    assert plan.peak_bytes + GiB < parse_memory("48GB")[1]


def test_qlora_65b_command_line_prints_the_split_and_fits(capsys):
    assert main(["plan", "llama-65b", "--quantization", "nf4", "--r", "64", "--target-modules", "all-linear",
                 "--batch-size", "1", "--seq-len", "512", "--gradient-checkpointing", "--optim", "paged_adamw_32bit",
                 "--adapter-dtype", "bfloat16", "--gpu-memory", "48GB"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "base weights               32.09 GiB (4.127 bits per quantized weight)" in out
    assert "optimizer state             5.96 GiB  (pageable to CPU RAM)" in out
    assert "fits in 48GB" in out and "799,539,200 trainable" in out
    # without quantization the same recipe does not fit (bf16 weights alone are 121.6 GiB)
    assert main(["plan", "llama-65b", "--r", "64", "--gradient-checkpointing", "--gpu-memory", "48GB"]) == 0
    assert "does NOT fit in 48GB" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ speed, CLI, errors


def test_flops_per_token_formula():
    shape = PRESETS["llama-7b"]
    n = shape.matmul_params()
    attention = 32 * 512 * 4096 * 2
    lora = make_plan(shape, Recipe(seq=512))
    assert lora.flops_per_token == 4 * (n + attention) + 2 * attention + 2 * lora.params_trainable
    full = make_plan(shape, Recipe(method="full", seq=512))
    assert full.flops_per_token == 6 * n + 6 * attention  # the classic 6N, attention included
    checkpointed = make_plan(shape, Recipe(seq=512, gradient_checkpointing=True))
    assert checkpointed.flops_per_token - lora.flops_per_token == 2 * (n + attention)
    assert full.tokens_per_second(1000, 0.5) == pytest.approx(1000e12 * 0.5 / full.flops_per_token)


def test_fsdp_divides_the_states_and_json_output(capsys):
    ddp = make_plan(PRESETS["llama3-8b"], Recipe(method="full", world_size=8))
    fsdp = make_plan(PRESETS["llama3-8b"], Recipe(method="full", world_size=8, strategy="fsdp"))
    assert fsdp.optimizer_bytes == ddp.optimizer_bytes // 8 and fsdp.activation_bytes == ddp.activation_bytes
    assert main(["plan", "smollm2-135m", "--json", "--gpu-memory", "a100-40gb", "--kv-context", "2048", "--kv-batch", "8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["memory"]["fits"] is True and data["memory"]["bytes"] == 40960 * 2**20
    assert data["kv_cache_bytes"] == 2 * 30 * 3 * 64 * 2048 * 8 * 2  # 2 x layers x kv_dim x context x batch x bf16
    assert data["throughput"]["tflops"] == 312.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope"], "unknown model 'nope': use a preset"),
        (["llama-7b", "--target-modules", "q_proj,qkv"], "unknown target module(s) ['qkv'] for llama-7b"),
        (["llama-7b", "--target-modules", ".*proj"], "the planner takes module names (q_proj,v_proj) or all-linear, not a regex"),
        (["llama-7b", "--gpu-memory", "big"], "--gpu-memory 'big': give a size such as 48GB"),
        (["llama-7b", "--method", "full", "--quantization", "nf4"], "full fine-tuning trains every weight"),
        (["llama-7b", "--method", "bitfit"], "llama-7b has no bias terms"),
        (["llama-7b", "--optim", "paged_adamw_8bit", "--device", "cpu"], "paged_adamw_8bit pages CUDA memory"),
        (["llama-7b", "--batch-size", "0"], "batch must be at least 1, got 0"),
    ],
)
def test_bad_input_gets_one_line(argv, message, capsys):
    assert main(["plan", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_config_json_input(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000}))  # fmt: skip
    assert shape_from_config(tmp_path).total_params() == PRESETS["mistral-7b"].total_params() == 7_241_732_096
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert main(["plan", str(tmp_path)]) == 1
    assert "model_type 't5' is not one the planner knows" in capsys.readouterr().err
