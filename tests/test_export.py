"""GGUF export mechanics, checked against the embedded SmolLM2's own GGUF file (what llama.cpp loads), and the
portability report. That llama.cpp itself agrees is tests/test_llama_cpp.py."""

import copy
import json
import math

import gguf
import numpy as np
import pytest
import torch

import peftkit as pk
from peftkit import cli
from peftkit.export import export_lora_gguf, read_gguf_base, write_merged_gguf
from peftkit.export.gguf_base import dequantized_tensors, gguf_name, permute_rows
from peftkit.export.portable import portability
from peftkit.models import embedded_gguf

from conftest import tiny_gpt2, tiny_llama

SMOL_GGUF = embedded_gguf("smollm2-135m")


@pytest.fixture(scope="module")
def smol_gguf_tensors():
    return dequantized_tensors(SMOL_GGUF)


def lora_folder(smollm2, tmp_path, name="a", seed=0, **kwargs):
    torch.manual_seed(seed)
    pm = pk.get_peft_model(copy.deepcopy(smollm2[0]), pk.LoraConfig(init_lora_weights=False, **kwargs))
    pm.save_pretrained(tmp_path / name)
    return tmp_path / name, pm


def gguf_fields(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def test_name_table_and_permutation_match_the_embedded_gguf(smollm2, smol_gguf_tensors):
    """Every HF weight of SmolLM2, mapped by the table and (q, k) permuted, equals the dequantized GGUF tensor bit
    for bit (transformers built the HF model from this very file by undoing the permutation)."""
    base = read_gguf_base(SMOL_GGUF)
    assert (base.architecture, base.n_head, base.n_head_kv, len(base.shapes)) == ("llama", 9, 3, 272)
    state = smollm2[0].state_dict()
    checked = 0
    for key, value in state.items():
        module = key.rsplit(".", 1)[0]
        name = gguf_name(module)
        if name is None or f"{name}.weight" not in smol_gguf_tensors:
            continue
        expected = torch.from_numpy(smol_gguf_tensors[f"{name}.weight"])
        assert torch.equal(base.permute_rows(f"{name}.weight", value), expected), key
        checked += 1
    assert checked == 272  # every tensor of the file (lm_head is tied: no output.weight)
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(permute_rows(q, 9), q) and torch.equal(permute_rows(permute_rows(q, 9), 9, inverse=True), q)


@pytest.mark.parametrize("kwargs, written_alpha", [
    (dict(r=8, lora_alpha=16), 16.0),                                   # alpha / r
    (dict(r=8, lora_alpha=16, use_rslora=True), 16 * math.sqrt(8)),    # alpha / sqrt(r) = (alpha sqrt(r)) / r
    (dict(r=8, lora_alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={"k_proj": 4}), 16.0),
])
def test_lora_gguf_layout_and_scale(smollm2, tmp_path, kwargs, written_alpha):
    """llama.cpp adds (adapter.lora.alpha / r) B_gguf A_gguf x with r read from B; that must equal peftkit's
    update, permuted for q and k, for every module, whatever the scale rule."""
    folder, pm = lora_folder(smollm2, tmp_path, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], **kwargs)
    done = export_lora_gguf(folder, tmp_path / "a.gguf")
    fields, tensors = gguf_fields(tmp_path / "a.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["general.base_model.0.name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert fields["adapter.lora.alpha"] == pytest.approx(written_alpha, rel=1e-6) and done.alpha == pytest.approx(written_alpha)
    assert len(tensors) == 2 * 4 * 30
    base = read_gguf_base(SMOL_GGUF)
    worst = 0.0
    for layer in (0, 17, 29):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("mlp.down_proj", "ffn_down")):
            module = pm.base_model.get_submodule(f"model.layers.{layer}.{hf}")
            want = base.permute_rows(f"blk.{layer}.{gg}.weight", module.delta_weight("default"))
            a, b = tensors[f"blk.{layer}.{gg}.weight.lora_a"], tensors[f"blk.{layer}.{gg}.weight.lora_b"]
            r = int(b.shape[0])  # ne[0] of B: the rank llama.cpp divides by
            assert int(a.shape[0]) == module.in_features and int(b.shape[1]) == module.out_features
            got = torch.from_numpy(np.array(b.data)) @ torch.from_numpy(np.array(a.data)) * (fields["adapter.lora.alpha"] / r)
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    assert worst < 1e-5
    # k_proj (alpha 4, r 8) needs B rescaled x 30 layers; v_proj (alpha 16, r 4) does not: llama.cpp divides by its own r
    assert done.rescaled == (30 if kwargs.get("alpha_pattern") else 0)


@pytest.mark.slow  # writes a 135M-parameter GGUF
def test_merged_gguf_f32_is_the_merged_model_with_the_base_metadata(smollm2, tmp_path):
    folder, pm = lora_folder(smollm2, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"])
    merged = pm.merge_and_unload()
    done = write_merged_gguf(merged, read_gguf_base(SMOL_GGUF), tmp_path / "m.gguf", "f32")
    assert done.tensors == 272
    fields, _ = gguf_fields(tmp_path / "m.gguf")
    base_fields, _ = gguf_fields(SMOL_GGUF)
    assert fields["general.file_type"] == 0 and "merged" in fields["general.name"]
    for key in base_fields:
        if key not in ("general.file_type", "general.name"):
            assert fields[key] == base_fields[key], key  # tokenizer, chat template, hyper-parameters
    back = dequantized_tensors(tmp_path / "m.gguf")
    base = read_gguf_base(SMOL_GGUF)
    state = merged.state_dict()
    for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.up_proj", "ffn_up"), ("self_attn.v_proj", "attn_v")):
        name = f"blk.5.{gg}.weight"
        assert torch.equal(base.unpermute_rows(name, torch.from_numpy(back[name])), state[f"model.layers.5.{hf}.weight"])


@pytest.mark.slow  # writes a 135M-parameter GGUF
def test_merged_gguf_q8_0_within_half_a_step(smollm2, tmp_path):
    """Q8_0: 32 weights share one scale d = max|w| / 127 stored as f16 (d16), q = round(w / d), so each weight is
    off by at most |w - q d| + |q| |d - d16| <= d / 2 + 127 |d - d16|."""
    merged = copy.deepcopy(smollm2[0])
    write_merged_gguf(merged, read_gguf_base(SMOL_GGUF), tmp_path / "q.gguf", "q8_0")
    fields, tensors = gguf_fields(tmp_path / "q.gguf")
    assert fields["general.file_type"] == 7
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    back = dequantized_tensors(tmp_path / "q.gguf")["blk.3.ffn_down.weight"]
    w = merged.state_dict()["model.layers.3.mlp.down_proj.weight"].numpy()
    d = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    bound = d / 2 + 127 * np.abs(d - d.astype(np.float16).astype(np.float32)) + 1e-7
    err = np.abs(back.reshape(-1, 32) - w.reshape(-1, 32))
    assert (err <= bound).all() and err.mean() < 0.3 * d.mean()


def write_fake_gguf(path, arch):
    writer = gguf.GGUFWriter(path, arch)
    writer.add_type("model")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_export_errors_name_the_mismatch(smollm2, tmp_path):
    out = tmp_path / "x.gguf"
    # another base: a tiny Llama's adapter against SmolLM2's GGUF
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match=r"^module model\.layers\.0\.self_attn\.q_proj: the adapter's update is 64 x 64 but "
                                         r"the base's blk\.0\.attn_q\.weight is 576 x 576 .*trained on another base model$"):
        export_lora_gguf(tmp_path / "tiny", out, base_gguf=SMOL_GGUF)
    # another architecture: GPT-2 module names, and a GPT-2 GGUF base
    pm = pk.get_peft_model(tiny_gpt2(), pk.LoraConfig(r=2, target_modules=["c_attn"]))
    pm.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"^module transformer\.h\.0\.attn\.c_attn has no llama\.cpp tensor name"):
        export_lora_gguf(tmp_path / "gpt2", out, base_gguf=SMOL_GGUF)
    write_fake_gguf(tmp_path / "gpt2.gguf", "gpt2")
    with pytest.raises(ValueError, match=r"is a 'gpt2' model; peftkit exports GGUF for the llama family only"):
        export_lora_gguf(tmp_path / "gpt2", out, base_gguf=tmp_path / "gpt2.gguf")
    # methods and parts a llama.cpp adapter cannot hold
    pm = pk.get_peft_model(copy.deepcopy(smollm2[0]), pk.IA3Config())
    pm.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match=r"^cannot export a IA3 adapter to a llama.cpp adapter: \(IA\)\^3 .*merge it first"):
        export_lora_gguf(tmp_path / "ia3", out)
    pm = pk.get_peft_model(copy.deepcopy(smollm2[0]), pk.BottleneckConfig())
    pm.save_pretrained(tmp_path / "bn")
    with pytest.raises(ValueError, match="llama.cpp has no such layer and they cannot be merged; serve them with peftkit"):
        export_lora_gguf(tmp_path / "bn", out)
    lora_folder(smollm2, tmp_path, "head", r=2, target_modules=["lm_head"])
    with pytest.raises(ValueError, match=r"maps to output\.weight, which the base .* does not have \(this base ties lm_head"):
        export_lora_gguf(tmp_path / "head", out)
    lora_folder(smollm2, tmp_path, "mts", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match=r"modules_to_save \['lm_head'\] are whole trained modules"):
        export_lora_gguf(tmp_path / "mts", out)
    assert not out.exists()
    # the command line: one line, exit status 1
    assert cli.main(["export", str(tmp_path / "ia3"), "-o", str(out)]) == cli.EXIT_ERROR


def test_cli_error_is_one_line(smollm2, tmp_path, capsys):
    pm = pk.get_peft_model(copy.deepcopy(smollm2[0]), pk.IA3Config())
    pm.save_pretrained(tmp_path / "ia3")
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "ia3"), "-o", str(tmp_path / "x.gguf")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("peftkit export: error: cannot export a IA3 adapter")


def verdicts(folder, **kw):
    return {v.runtime: v for v in portability(folder, **kw)}


def test_portable_report(smollm2, tmp_path, capsys):
    folder, _ = lora_folder(smollm2, tmp_path, "ok", r=32, target_modules=["q_proj", "v_proj"])
    v = verdicts(folder)
    assert all(x.loads for x in v.values())
    assert "start vLLM with --max-lora-rank 32" in v["vLLM"].why
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    pm = pk.get_peft_model(copy.deepcopy(smollm2[0]), pk.IA3Config())
    pm.save_pretrained(tmp_path / "ia3")
    v = verdicts(tmp_path / "ia3")
    assert not v["llama.cpp / Ollama"].loads and "merge it first" in v["llama.cpp / Ollama"].why
    assert v["merged GGUF"].loads and not v["vLLM"].loads and v["HF PEFT"].loads

    pm = pk.get_peft_model(copy.deepcopy(smollm2[0]), pk.BottleneckConfig())
    pm.save_pretrained(tmp_path / "bn")
    v = verdicts(tmp_path / "bn")
    assert [x.loads for x in v.values()] == [True, False, False, False, False]
    assert "llama.cpp has no such layer" in v["llama.cpp / Ollama"].why and "serve it with peftkit" in v["merged GGUF"].why

    lora_folder(smollm2, tmp_path, "mts", r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    v = verdicts(tmp_path / "mts")
    assert not v["vLLM"].loads and "vLLM refuses it" in v["vLLM"].why and v["merged GGUF"].loads

    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/home/alice/models/smol"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    v = verdicts(folder, base_gguf=SMOL_GGUF)
    assert not v["base model"].loads and "absolute or local base path /home/alice/models/smol" in v["base model"].why
    assert "set --base-name" in v["base model"].why
    # the fix: a copy that records a hub id
    assert cli.main(["export", str(folder), "--to", "peft", "-o", str(tmp_path / "fixed"), "--base-name", "org/smol"]) == 0
    assert verdicts(tmp_path / "fixed", base_gguf=SMOL_GGUF)["base model"].why == "org/smol"
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "ia3"), "--portable"]) == 0
    out = capsys.readouterr().out
    assert "llama.cpp / Ollama   NO" in out and "merged GGUF          ok" in out


@pytest.mark.slow  # writes a 135M-parameter GGUF
def test_cli_merge_to_gguf_f16(smollm2, tmp_path, capsys):
    """`peftkit merge --to gguf --outtype f16`: the adapter's base (recorded as the hub id) resolves to the embedded
    model and its GGUF; matrices are the merged weights rounded to f16, norms stay f32."""
    folder, pm = lora_folder(smollm2, tmp_path, r=4, lora_alpha=8, target_modules=["v_proj"])
    merged = pm.merge_and_unload().state_dict()["model.layers.2.self_attn.v_proj.weight"]
    assert cli.main(["merge", "--adapter", str(folder), "--to", "gguf", "--outtype", "f16", "--out", str(tmp_path / "m.gguf")]) == 0
    assert "GGUF f16, 272 tensors" in capsys.readouterr().out
    fields, tensors = gguf_fields(tmp_path / "m.gguf")
    assert fields["general.file_type"] == 1 and tensors["blk.2.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert torch.equal(torch.from_numpy(np.array(tensors["blk.2.attn_v.weight"].data)), merged.half())
    assert cli.main(["merge", "--adapter", str(folder), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == cli.EXIT_ERROR
