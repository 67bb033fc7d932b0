"""The training loop: schedule, metrics, data splits, packed attention, checkpoints, end-to-end runs, HF Trainer."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import ALPACA_TINY, DATA, save_tiny_lm, tiny_llama

import peftkit
from peftkit import train as T
from peftkit.data import PackedCollator, pack_examples
from peftkit.losses import causal_lm_loss
from peftkit.train import tasks as train_tasks
from peftkit.device import Precision
from peftkit.train.attention import PACKED_ATTENTION, attention_implementation, packed_attention, packed_bounds
from peftkit.train.task_data import BatchOrder

def save_tiny_classifier(folder: Path) -> Path:
    """A tiny random BERT classifier with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    from peftkit.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=len(tokenizer), max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_learning_rate_warmup_then_cosine_or_linear_decay():
    # 10 steps, 2 warmup: steps 0, 1 ramp to the peak; then p = (s - 2) / 8
    assert T.learning_rate(0, 10, 1.0, 2) == 0.5
    assert T.learning_rate(1, 10, 1.0, 2) == 1.0
    assert T.learning_rate(2, 10, 1.0, 2) == 1.0
    assert T.learning_rate(6, 10, 1.0, 2) == pytest.approx(0.5)  # cos(pi/2)
    assert T.learning_rate(9, 10, 1.0, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert T.learning_rate(6, 10, 2.0, 2, "linear") == pytest.approx(1.0)
    assert T.learning_rate(9, 10, 2.0, 0, "constant") == 2.0


def test_classification_metrics_match_hand_computed_values():
    predictions, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]  # TP 2, FP 1, FN 1, TN 2
    scores = T.classification_metrics(predictions, labels)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert scores["matthews_corrcoef"] == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert T.classification_metrics([0, 0, 0], [0, 1, 0])["matthews_corrcoef"] == 0.0  # constant prediction


def test_holdout_split_is_seeded_disjoint_and_never_empty():
    train, held = T.split_holdout(100, 0.05, seed=3)
    assert len(held) == 5 and sorted(train + held) == list(range(100))
    assert T.split_holdout(100, 0.05, seed=3) == (train, held)
    assert T.split_holdout(100, 0.05, seed=4)[1] != held
    assert len(T.split_holdout(10, 0.01, seed=0)[1]) == 1
    assert len(T.split_holdout(1000, 0.5, seed=0, limit=7)[1]) == 7


def test_batch_order_reshuffles_each_epoch_from_the_seed_alone():
    order = BatchOrder(10, 4, seed=1)
    epoch0 = [order(k) for k in range(3)]
    assert sorted(i for b in epoch0 for i in b) == list(range(10)) and [len(b) for b in epoch0] == [4, 4, 2]
    assert order(3) != epoch0[0]
    assert BatchOrder(10, 4, seed=1)(4) == order(4)  # a fresh object at a later position: same batch


def test_batch_order_groups_lengths_within_megabatches():
    lengths = [(i * 37) % 101 for i in range(400)]
    order = BatchOrder(400, 4, seed=0, lengths=lengths)
    batches = [order(k) for k in range(100)]
    assert sorted(i for b in batches for i in b) == list(range(400))
    plain = BatchOrder(400, 4, seed=0)
    for m in range(2):  # megabatch m = the same 200 examples as the ungrouped order, sorted longest first
        grouped = [i for b in batches[50 * m : 50 * (m + 1)] for i in b]
        assert sorted(grouped) == sorted(i for k in range(50 * m, 50 * (m + 1)) for i in plain(k))
        assert [lengths[i] for i in grouped] == sorted((lengths[i] for i in grouped), reverse=True)


def test_task_inferred_from_data():
    assert T.infer_task(DATA / "glue" / "SST-2") == "seq-cls"
    assert T.infer_task(DATA / "instruct" / "alpaca_sample_1727.json") == "sft"
    assert T.infer_task(DATA / "text" / "tinyshakespeare.txt") == "text"
    assert T.infer_task(DATA / "glue" / "RTE" / "dev.tsv") == "seq-cls"


@pytest.mark.parametrize("varlen", [True, False])
def test_packed_loss_equals_separate_sequences(varlen):
    """Packing with per-sequence attention (or the 4-D mask fallback) gives each sequence's own loss."""
    model = tiny_llama(vocab_size=128)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, prompt in ((9, 4), (6, 2), (12, 5)):
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    task = T.LMTask(pm, type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})(), max_length=16,
                    device=torch.device("cpu"), precision=Precision(torch.float32, "test"))
    task.varlen = varlen
    with torch.no_grad():
        batch = task.collate(examples)
        # one unpadded row; or rows of at most max_length, [12] and [9 + 6], padded to 15
        assert batch["input_ids"].shape == ((1, 27) if varlen else (2, 15))
        packed = task.loss_sum(batch) / task.count(batch)
        total, count = 0.0, 0
        for e in examples:
            ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
            logits = pm(input_ids=ids).logits
            total += float(causal_lm_loss(logits, torch.nn.Identity(), labels, reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    assert float(packed) == pytest.approx(total / count, abs=1e-5)


def test_packed_attention_is_used_and_matches_the_block_mask():
    model = tiny_llama(vocab_size=128)
    rows = pack_examples([{"input_ids": list(range(1, 8)), "labels": list(range(1, 8))},
                          {"input_ids": list(range(20, 25)), "labels": list(range(20, 25))}], 12)
    batch = PackedCollator()(rows)
    calls = []
    original = packed_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, counting)
    try:
        with torch.no_grad():
            masked = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).last_hidden_state
            with attention_implementation(model, PACKED_ATTENTION):
                bounds = packed_bounds([r["seq_lens"] for r in rows], batch["input_ids"].shape[1])
                varlen = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], packed_bounds=bounds).last_hidden_state
    finally:
        AttentionInterface.register(PACKED_ATTENTION, original)
    assert len(calls) == model.config.num_hidden_layers
    assert model.config._attn_implementation != PACKED_ATTENTION  # restored
    torch.testing.assert_close(varlen, masked, atol=1e-5, rtol=1e-5)


def _lora_model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = tiny_llama(vocab_size=128)
    torch.manual_seed(seed)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, lora_dropout=0.3, target_modules=["q_proj", "v_proj"]))
    pm.train()
    params = list(T.trainable_parameters(pm).values())
    return pm, torch.optim.AdamW(params, lr=1e-2)


def _steps(pm, optimizer, n, data_seed):
    g = torch.Generator().manual_seed(data_seed)
    for _ in range(n):
        ids = torch.randint(0, 128, (2, 10), generator=g)
        pm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_checkpoint_restores_parameters_optimizer_and_rng_exactly(tmp_path):
    pm, opt = _lora_model_and_optimizer()
    _steps(pm, opt, 2, data_seed=1)
    T.save_checkpoint(tmp_path / "step-2", pm, opt, {"step": 2})
    _steps(pm, opt, 3, data_seed=2)
    expected = {k: v.clone() for k, v in T.trainable_parameters(pm).items()}

    pm2, opt2 = _lora_model_and_optimizer(seed=5)  # different initial values: all must come from the checkpoint
    random.random()  # and different RNG streams: dropout masks must come from the checkpoint too
    torch.rand(3)
    state = T.load_checkpoint(tmp_path / "step-2", pm2, opt2)
    assert state["step"] == 2
    _steps(pm2, opt2, 3, data_seed=2)
    for name, value in T.trainable_parameters(pm2).items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0)
    files = sorted(p.name for p in (tmp_path / "step-2").iterdir())
    assert files == ["adapter", "trainer_state.json", "training_state.safetensors"]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_sft_run_lowers_eval_loss_and_writes_the_run_folder(tiny_lm, tmp_path):
    config = T.TrainConfig(data=str(ALPACA_TINY), model=str(tiny_lm), max_steps=12, batch_size=4, lr=3e-2,
                           warmup=0, eval_every=6, save_every=4, keep_checkpoints=2, out=str(tmp_path / "run"),
                           num_samples=2, sample_tokens=8, target_modules="all-linear")
    run = T.TrainingRun(config, progress=False)
    result = run.fit()
    folder = tmp_path / "run"
    assert result.steps == 12 and result.mode == "packed"
    assert result.eval_final["loss"] < result.eval_initial["loss"] - 0.1  # 5.96 -> 5.83, deterministic
    metrics = T.read_metrics(folder / T.METRICS_FILE)
    assert [m["step"] for m in metrics if m["type"] == "eval"] == [0, 6, 12]
    assert [m["step"] for m in metrics if m["type"] == "train"] == list(range(1, 13))
    assert [p.name for p in T.list_checkpoints(folder)] == ["step-000008", "step-000012"]
    assert {"adapter", "config.yaml", "metrics.jsonl", "metrics.png", "samples.md", "summary.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "samples.md").read_text().count("| before training (base model) | after training | reference |") == 2
    import yaml

    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["task"] == "sft" and saved["r"] == 8 and saved["lr"] == 3e-2 and saved["max_length"] == 512
    assert T.TrainConfig.from_dict(saved).resolved("sft") == T.TrainConfig.from_dict(saved)

    # the saved adapter reproduces the trained model exactly
    ids = torch.tensor([run.data.eval[0]["input_ids"]])
    run.model.eval()
    loaded = peftkit.PeftModel.from_pretrained(peftkit.load_model(str(tiny_lm))[0], folder / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, run.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_lm, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = causal_lm_loss

    def poisoned(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():  # training, not evaluation
            calls["n"] += 1
            if calls["n"] == 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_tasks, "causal_lm_loss", poisoned)  # the name LMTask calls
    config = T.TrainConfig(data=str(ALPACA_TINY), model=str(tiny_lm), max_steps=8, batch_size=2, save_every=2,
                           eval_every=100, out=str(tmp_path / "run"), num_samples=0)
    with pytest.raises(T.NonFiniteLossError) as err:
        T.train(config, progress=False)
    assert "nan at step 5" in str(err.value) and "step-000004" in str(err.value)
    assert [p.name for p in T.list_checkpoints(tmp_path / "run")] == ["step-000002", "step-000004"]
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
def test_seq_cls_run_reports_accuracy_f1_and_mcc(tmp_path):
    model_dir = save_tiny_classifier(tmp_path / "bert")
    glue = tmp_path / "SST-2"
    glue.mkdir()
    for split, n in (("train", 97), ("dev", 41)):
        lines = (DATA / "glue" / "SST-2" / f"{split}.tsv").read_text().splitlines()[: n + 1]
        (glue / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    config = T.TrainConfig(data=str(glue), model=str(model_dir), max_steps=4, batch_size=16,
                           out=str(tmp_path / "run"), target_modules=["query", "value"])
    result = T.train(config, progress=False)
    assert result.mode == "padded"
    final = result.eval_final
    assert set(final) == {"loss", "accuracy", "f1", "matthews_corrcoef"}
    assert final["accuracy"] * 41 == pytest.approx(round(final["accuracy"] * 41))  # a count over 41 dev rows
    evals = [m for m in T.read_metrics(tmp_path / "run" / T.METRICS_FILE) if m["type"] == "eval"]
    assert [m["step"] for m in evals] == [0, 1, 2, 3, 4]
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["classifier"]


def test_peft_model_trains_inside_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(vocab_size=128)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        ids = torch.randint(0, 128, (16,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        save_strategy="no", logging_steps=1, use_cpu=True,
        remove_unused_columns=False,  # PeftModel.forward takes **kwargs: nothing to learn from its signature
    )
    trainer = Trainer(model=pm, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    changed = {n for n, p in pm.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all(".lora_A." in n or ".lora_B." in n for n in changed)
    assert changed == {n for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "ia3", "houlsby", "pfeiffer", "prompt", "prefix"])
def test_every_method_trains_and_saves_a_loadable_adapter(method, tiny_lm, tmp_path):
    config = T.TrainConfig(data=str(ALPACA_TINY), model=str(tiny_lm), method=method, max_steps=3, batch_size=2,
                           lr=5e-2, eval_every=0, save_every=0, num_samples=0, out=str(tmp_path / "run"))
    run = T.TrainingRun(config, progress=False)
    before = {k: v.detach().clone() for k, v in T.trainable_parameters(run.model).items()}
    run.fit()
    assert run.task.mode == ("padded" if method in ("prompt", "prefix") else "packed")
    after = T.trainable_parameters(run.model)
    assert before and all(not torch.equal(before[k], after[k]) for k in before)  # every trainable tensor learned
    run.model.eval()
    ids = torch.tensor([run.data.eval[0]["input_ids"]])
    loaded = peftkit.PeftModel.from_pretrained(peftkit.load_model(str(tiny_lm))[0], tmp_path / "run" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, run.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_bitfit_on_a_classifier_and_nf4_quantized_base(tmp_path):
    model_dir = save_tiny_classifier(tmp_path / "bert")
    config = T.TrainConfig(data=str(DATA / "glue" / "RTE"), model=str(model_dir), method="bitfit", max_steps=2,
                           batch_size=4, max_length=32, eval_every=0, save_every=0, out=str(tmp_path / "bitfit"))
    run = T.TrainingRun(config, progress=False)
    names = list(T.trainable_parameters(run.model))
    assert names and all(n.endswith("bias") or ".classifier." in n for n in names)
    run.fit()

    lm = save_tiny_lm(tmp_path / "lm")
    config = T.TrainConfig(data=str(ALPACA_TINY), model=str(lm), quantization="nf4", max_steps=2, batch_size=2,
                           eval_every=0, save_every=0, num_samples=0, out=str(tmp_path / "qlora"))
    run = T.TrainingRun(config, progress=False)
    kinds = {type(m).__name__ for m in run.model.modules()}
    assert "Linear4bit" in kinds
    before = {k: v.detach().clone() for k, v in T.trainable_parameters(run.model).items()}
    run.fit()
    assert all(not torch.equal(before[k], v) for k, v in T.trainable_parameters(run.model).items() if ".lora_A." in k)


def test_building_a_run_leaves_the_process_random_state_and_threads_alone(tmp_path, tiny_lm):
    """TrainingRun(config) seeds its own stream for initialisation; the caller's random state and thread count are
    untouched until fit(), which restores the thread count when it returns."""
    torch.manual_seed(1234)
    random.seed(1234)
    expected_torch, expected_py = torch.rand(3), random.random()
    torch.manual_seed(1234)
    random.seed(1234)
    threads = torch.get_num_threads()
    config = T.TrainConfig(model=str(tiny_lm), data=str(ALPACA_TINY), max_steps=1, batch_size=2, out=str(tmp_path / "run"),
                         eval_every=0, threads=1, seed=7)
    run = T.TrainingRun(config, progress=False)
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py
    assert torch.get_num_threads() == threads
    run.fit()
    assert torch.get_num_threads() == threads
