"""Bad adapter files: non-finite and non-float weights, damaged bytes, torn and leftover folders, what inspect and
eval say about them. Every case asserts the refusal (exception type and message) or the exact recovered state."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ALPACA_TINY, tiny_bert_classifier, tiny_llama
from safetensors.torch import load_file, save_file
from test_lora import randomize_b

import peftkit as pk
from peftkit import atomic, checkpoint
from peftkit.describe import describe_adapter
from peftkit.train.evaluation import adapter_task, find_adapter

X = torch.randint(1, 120, (2, 8), generator=torch.Generator().manual_seed(0))
KEY = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"


def saved(folder, seed: int = 1, r: int = 4) -> pk.PeftModel:
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    randomize_b(pm, "default", seed=seed)
    pm.save_pretrained(folder)
    return pm


def rewrite(folder, key: str, value: torch.Tensor) -> None:
    """Replace one tensor of a saved folder (written without a checksum, as another tool would)."""
    path = folder / checkpoint.WEIGHTS_NAME
    tensors = load_file(path)
    tensors[key] = value
    save_file(tensors, path)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


# ----------------------------------------------------------------------------------------------------------------
# Values: every load path refuses non-finite and non-float weights, naming the key


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_with_the_key(tmp_path, bad):
    saved(tmp_path)
    value = torch.full((64, 4), 0.1)
    value[3, 2] = bad
    rewrite(tmp_path, KEY, value)
    model = tiny_llama()
    before = logits(model)
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: tensor {KEY} holds 1 NaN/Inf value\(s\) of 256: "
                                         "the adapter is numerically broken"):
        pk.PeftModel.from_pretrained(model, tmp_path)
    assert torch.equal(logits(model), before)  # handed back unchanged


def test_huge_but_finite_weights_load(tmp_path):
    """The finiteness check looks at every tensor's norm first; a norm that overflows float32 from finite values
    (near its limit) must not refuse the file: those tensors are checked value by value."""
    saved(tmp_path)
    rewrite(tmp_path, KEY, torch.full((64, 4), 3e38))
    pm = pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(pm.adapter_tensors("default")[KEY], torch.full((64, 4), 3e38))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_non_float_weights_are_refused_not_cast(tmp_path, dtype):
    saved(tmp_path)
    rewrite(tmp_path, KEY, torch.ones(64, 4, dtype=dtype))
    name = str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match=rf"tensor {KEY} is {name}, not floating point: adapter weights are float32"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_load_adapter_with_nan_leaves_the_peft_model_unchanged(tmp_path):
    pm = saved(tmp_path / "good")
    saved(tmp_path / "bad", seed=2)
    rewrite(tmp_path / "bad", KEY, torch.full((64, 4), float("nan")))
    before = logits(pm.eval())
    with pytest.raises(ValueError, match="holds 256 NaN/Inf"):
        pm.load_adapter(tmp_path / "bad", "second")
    assert list(pm.peft_config) == ["default"] and torch.equal(logits(pm), before)


def test_tensors_given_through_the_api_are_checked_too():
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tensors = {k: v.detach().clone() for k, v in pm.adapter_tensors("default").items()}
    tensors[KEY] = torch.full((64, 4), float("inf"))
    with pytest.raises(ValueError, match=rf"^tensors: tensor {KEY} holds 256 NaN/Inf"):
        pm.add_adapter_from_tensors("x", pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tensors)
    tensors[KEY] = torch.zeros(64, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="is int64, not floating point"):
        pm.add_adapter_from_tensors("x", pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tensors)
    assert list(pm.peft_config) == ["default"]


def test_values_that_overflow_the_model_dtype_are_refused(tmp_path):
    saved(tmp_path)
    rewrite(tmp_path, KEY, torch.full((64, 4), 1e6))  # finite in float32, inf in float16
    with pytest.raises(ValueError, match=f"tensor {KEY} overflows the model's float16"):
        pk.PeftModel.from_pretrained(tiny_llama().half(), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Bytes: the checksum catches damage that leaves the header intact


def test_overwritten_bytes_with_an_intact_header_are_refused(tmp_path):
    saved(tmp_path)
    path = tmp_path / checkpoint.WEIGHTS_NAME
    raw = bytearray(path.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header + 100 : 8 + header + 108] = b"\xff" * 8  # garbage floats where weights were: -1e38 logits before
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: its tensor data does not match the SHA-256 "
                                         "recorded when it was saved"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_the_checksum_lives_in_the_header_and_files_without_one_still_load(tmp_path):
    pm = saved(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / checkpoint.WEIGHTS_NAME), "pt") as f:
        assert len(f.metadata()[checkpoint.SHA256_KEY]) == 64 and f.metadata()["format"] == "pt"
    save_file(load_file(tmp_path / checkpoint.WEIGHTS_NAME), tmp_path / checkpoint.WEIGHTS_NAME)  # as HF PEFT writes
    assert torch.equal(logits(pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)), logits(pm.eval()))


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-10], "not a readable safetensors file"),  # truncated data
    (lambda raw: raw[:5], "not a readable safetensors file"),  # not even the length prefix
    (lambda raw: b"", "not a readable safetensors file"),
    (lambda raw: (10**9).to_bytes(8, "little") + raw[8:], "not a readable safetensors file"),  # length beyond the file
    (lambda raw: raw[:8] + b"\x00" * (len(raw) - 8), "not a readable safetensors file"),
    (lambda raw: raw[:8] + b"[" + raw[9:], "not a readable safetensors file"),
])
def test_damaged_files_name_the_file(tmp_path, damage, message):
    saved(tmp_path)
    path = tmp_path / checkpoint.WEIGHTS_NAME
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as err:
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert str(path) in str(err.value)


def test_a_damaged_training_checkpoint_is_refused_by_name(tmp_path):
    from peftkit.train.run_folder import load_checkpoint, save_checkpoint

    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad])
    save_checkpoint(tmp_path / "step-000001", pm, optimizer, {"step": 1})
    path = tmp_path / "step-000001" / "training_state.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-4:] = b"\x00\x00\xc0\x7f"  # a NaN where a value was
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="training_state.safetensors: its tensor data does not match the SHA-256"):
        load_checkpoint(tmp_path / "step-000001", pm, optimizer)


# ----------------------------------------------------------------------------------------------------------------
# Folders: torn states and leftovers


def test_a_folder_missing_after_a_kill_between_renames_is_recovered_by_load(tmp_path):
    pm = saved(tmp_path / "adapter")
    os.rename(tmp_path / "adapter", tmp_path / ".adapter.peftkit-ready-0badf00d")  # the fallback protocol's window
    loaded = pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(pm.eval()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    os.rename(tmp_path / "adapter", tmp_path / ".adapter.peftkit-ready-0badf00d")
    assert find_adapter(tmp_path / "adapter") == (tmp_path / "adapter", None)  # what eval, merge and inspect call


def test_an_unfinished_staging_folder_is_ignored_by_loads_and_cleaned_by_the_next_save(tmp_path):
    saved(tmp_path / "adapter")
    os.rename(tmp_path / "adapter", tmp_path / ".adapter.peftkit-tmp-0badf00d")  # killed while building a new folder
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in .*adapter: is this an adapter folder"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    pm = saved(tmp_path / "adapter", seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert torch.equal(logits(pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")), logits(pm.eval()))


def test_leftovers_next_to_a_good_folder_do_not_change_what_loads(tmp_path):
    pm = saved(tmp_path / "adapter")
    for kind in ("tmp", "ready", "old"):
        saved(tmp_path / f".adapter.peftkit-{kind}-1234abcd", seed=5, r=8)  # another version in every leftover
    assert len(atomic.leftovers(tmp_path / "adapter")) == 3
    assert torch.equal(logits(pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")), logits(pm.eval()))
    saved(tmp_path / "adapter")
    assert atomic.leftovers(tmp_path / "adapter") == []


def test_a_failed_save_leaves_the_old_folder_and_no_staging(tmp_path):
    pm = saved(tmp_path / "adapter")

    def crash(staging):
        (staging / checkpoint.CONFIG_NAME).write_text("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.replace_folder(tmp_path / "adapter", crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert torch.equal(logits(pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")), logits(pm.eval()))


def test_a_save_keeps_files_and_adapters_it_does_not_write(tmp_path):
    pm = saved(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / ".adapter_model.safetensors.ab12cd.tmp").write_bytes(b"half")  # the old protocol's stray file
    pm.add_adapter("b", pk.LoraConfig(r=2, target_modules=["k_proj"]))
    pm.save_pretrained(tmp_path, selected_adapters=["b"])  # writes b/ only
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "b", "tokenizer.json"]
    assert checkpoint.read_config(tmp_path).r == 4 and checkpoint.read_config(tmp_path / "b").r == 2


def test_concurrent_saves_of_one_folder_take_turns_and_the_last_wins(tmp_path):
    import threading

    models = [pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=r, target_modules=["q_proj"])) for r in (2, 4, 8)]
    errors = []

    def save_often(pm):
        try:
            for _ in range(5):
                pm.save_pretrained(tmp_path / "adapter")
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=save_often, args=(pm,)) for pm in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and atomic.leftovers(tmp_path / "adapter") == []
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME]
    config = checkpoint.read_config(tmp_path / "adapter")
    assert config.r in (2, 4, 8)
    pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")  # weights and config of the same save


def test_saving_where_a_file_is_refused(tmp_path):
    (tmp_path / "adapter").write_text("not a folder")
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(FileExistsError, match="adapter exists and is a file; an adapter is saved as a folder"):
        pm.save_pretrained(tmp_path / "adapter")


def test_saving_over_the_working_directory_or_a_mount_point_is_refused(tmp_path, monkeypatch):
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    (tmp_path / "inside").mkdir()
    for cwd, target in ((tmp_path, "."), (tmp_path / "inside", tmp_path)):
        monkeypatch.chdir(cwd)
        with pytest.raises(ValueError, match="is, or holds, the current working directory; .*Save into a subfolder"):
            pm.save_pretrained(target)
    pm.save_pretrained("adapter")  # a subfolder of the working directory is fine
    assert (tmp_path / "inside" / "adapter" / checkpoint.CONFIG_NAME).exists()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(tmp_path / "inside"))  # a volume's root
    with pytest.raises(ValueError, match="inside is a mount point; .* Save into a subfolder"):
        pm.save_pretrained(tmp_path / "inside")


def test_a_save_through_a_symlink_writes_where_it_points(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    saved(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / checkpoint.CONFIG_NAME).exists()


def test_config_without_weights_names_the_missing_file(tmp_path):
    saved(tmp_path)
    (tmp_path / checkpoint.WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no adapter weights at .*adapter_model.safetensors"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("text, message", [("{half", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                                           ("\udcff".encode("utf-8", "surrogateescape"), "is not valid JSON")])
def test_unreadable_configs_are_named(tmp_path, text, message):
    saved(tmp_path)
    path = tmp_path / checkpoint.CONFIG_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# inspect and eval report the same problems


def test_inspect_reports_unusable_tensors_and_the_checksum(tmp_path):
    saved(tmp_path)
    assert "checksum     sha256 ok" in describe_adapter(tmp_path) and "UNUSABLE" not in describe_adapter(tmp_path)
    tensors = load_file(tmp_path / checkpoint.WEIGHTS_NAME)
    tensors[KEY] = torch.full((64, 4), float("nan"))
    other = KEY.replace("layers.1", "layers.0")
    tensors[other] = tensors[other].long()
    save_file(tensors, tmp_path / checkpoint.WEIGHTS_NAME)
    report = describe_adapter(tmp_path)
    assert "checksum     none recorded (not saved by peftkit)" in report
    assert "UNUSABLE     2 tensor(s) a load refuses" in report
    assert f"  {KEY} holds 256 NaN/Inf value(s) of 256" in report and f"  {other} is int64, not floating point" in report
    checkpoint.save_tensors(tmp_path / checkpoint.WEIGHTS_NAME, load_file(tmp_path / checkpoint.WEIGHTS_NAME))
    path = tmp_path / checkpoint.WEIGHTS_NAME
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    assert "checksum     MISMATCH: the tensor data changed after saving" in describe_adapter(tmp_path)


def test_eval_of_a_damaged_classification_adapter_names_the_file(tmp_path):
    pm = pk.get_peft_model(tiny_bert_classifier(), pk.LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    pm.save_pretrained(tmp_path)
    assert adapter_task(tmp_path) == ("seq-cls", 2)
    path = tmp_path / checkpoint.WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        adapter_task(tmp_path)


def test_eval_of_a_nan_adapter_is_refused_not_scored_nan(tmp_path, tiny_lm):
    from peftkit.train.evaluation import evaluate_adapter

    saved(tmp_path)
    rewrite(tmp_path, KEY, torch.full((64, 4), float("nan")))
    with pytest.raises(ValueError, match=f"tensor {KEY} holds 256 NaN/Inf"):
        evaluate_adapter(adapter=tmp_path, data=str(ALPACA_TINY), model=str(tiny_lm))


def test_resume_from_a_checkpoint_with_nan_parameters_is_refused(tmp_path):
    from peftkit.train.run_folder import load_checkpoint, save_checkpoint

    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad])
    with torch.no_grad():
        next(p for p in pm.parameters() if p.requires_grad).fill_(float("nan"))
    save_checkpoint(tmp_path / "step-000001", pm, optimizer, {"step": 1})
    with pytest.raises(ValueError, match=r"training_state.safetensors: tensor param\..*lora_A.default.weight holds"):
        load_checkpoint(tmp_path / "step-000001", pm, optimizer)


def test_an_adapter_config_with_a_bad_value_is_refused_when_loading(tmp_path):
    saved(tmp_path)
    path = tmp_path / checkpoint.CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_alpha": 0}))
    with pytest.raises(ValueError, match=r"LoraConfig.lora_alpha must be a finite number > 0 \(the update is scaled"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)
