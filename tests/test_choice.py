"""Multiple choice by rank classification and the T-Few recipe: data readers, the collator's layout, the scores and
losses against a hand computation from full forwards, and the command line end to end on a tiny model."""

import copy
import json

import pytest
import torch
from conftest import DATA

import peftkit as pk
from peftkit import cli
from peftkit.data import ChoiceCollator, load_choices, tokenize_choices
from peftkit.train import TrainConfig
from peftkit.train.choice_task import MultipleChoiceTask, parse_losses

QUESTIONS = [
    {"prompt": "The sky is", "choices": [" blue", " green and yellow"], "answer": " blue"},
    {"question": "Two plus two is", "choices": [" five", " four", " three"], "answer": 1},
    {"prompt": "Fire is", "choices": [" hot", " cold"], "label": 0},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_readers_take_our_jsonl_and_glue_phrased_as_questions(tmp_path):
    rows = QUESTIONS + [{"prompt": "x", "choices": [" a", " b"], "answer": " c"}, {"prompt": "y", "choices": [" a"], "answer": 0}]
    records, bad = load_choices(_write_jsonl(tmp_path / "q.jsonl", rows))
    assert [r["label"] for r in records] == [0, 1, 0] and records[1]["prompt"] == "Two plus two is"
    assert bad.count == 2 and "answer ' c' is not one of the choices" in str(bad) and "at least two" in str(bad)
    with pytest.raises(ValueError, match="line 4.*not one of the choices"):
        load_choices(tmp_path / "q.jsonl", on_bad_row="error")
    rte, _ = load_choices(DATA / "glue" / "RTE", "dev")
    assert len(rte) == 277 and rte[0]["choices"] == [" True", " False"]
    assert rte[0]["prompt"].endswith("True or False?\nAnswer:") and {r["label"] for r in rte} == {0, 1}
    with pytest.raises(ValueError, match="no multiple-choice phrasing for GLUE task"):
        load_choices(tmp_path)


def test_collator_layout_by_hand():
    examples = [{"prompt_ids": [5, 6, 7], "choice_ids": [[8], [9, 10]], "label": 1},
                {"prompt_ids": [11], "choice_ids": [[12, 13], [14]], "label": 0}]
    batch = ChoiceCollator(pad_token_id=0)(examples)
    assert batch["prompt_ids"].tolist() == [[5, 6, 7], [11, 0, 0]] and batch["prompt_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["prompt_lengths"].tolist() == [3, 1]
    assert batch["choice_labels"].tolist() == [[[8, -100], [9, 10]], [[12, 13], [14, -100]]]
    # read by a forward: each prompt once and each choice but its last token
    assert batch["labels"].tolist() == [1, 0] and int(batch["num_real_tokens"]) == 3 + 1 + (0 + 1) + (1 + 0)
    with pytest.raises(ValueError, match="different numbers of choices"):
        ChoiceCollator(0)([examples[0], {"prompt_ids": [1], "choice_ids": [[2], [3], [4]], "label": 0}])


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), AutoTokenizer.from_pretrained(tiny_lm)


def _by_hand(model, example):
    """Per choice: summed log p of its tokens, token count, and sum of -log(1 - p), from one full forward each."""
    out = []
    for ids in example["choice_ids"]:
        row = torch.tensor([example["prompt_ids"] + ids])
        logp = model(input_ids=row).logits[0].double().log_softmax(-1)
        start = len(example["prompt_ids"]) - 1
        token_logp = torch.stack([logp[start + t, tok] for t, tok in enumerate(ids)])
        out.append((token_logp.sum().item(), len(ids), (-torch.log1p(-token_logp.exp())).sum().item()))
    return out


@pytest.mark.parametrize("method", ["none", "ia3", "prompt"])
def test_scores_and_losses_equal_a_hand_computation(tiny, method):
    model, tokenizer = tiny
    model = copy.deepcopy(model)  # wrapping injects layers in place: keep the module's fixture clean
    torch.manual_seed(0)
    if method == "ia3":
        model = pk.get_peft_model(model, pk.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.uniform_(0.5, 1.5)
    elif method == "prompt":
        model = pk.get_peft_model(model, pk.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    records = [{**q, "prompt": q.get("prompt", q.get("question")), "label": i % 2} for i, q in enumerate(QUESTIONS[:1] + QUESTIONS[2:])]
    examples = tokenize_choices(records, tokenizer, max_length=64)
    task = MultipleChoiceTask(model, tokenizer, ("lm", "ul", "ln"))
    with torch.no_grad():
        losses, ll, n = task.losses_of(task.collate(examples))
        hand = [_by_hand(model if method != "prompt" else _prompted(model), e) for e in examples]
    assert torch.allclose(ll.double(), torch.tensor([[c[0] for c in h] for h in hand], dtype=torch.float64), atol=1e-4)
    assert n.tolist() == [[c[1] for c in h] for h in hand]
    labels = [e["label"] for e in examples]
    right = [(h[y][0], h[y][1]) for h, y in zip(hand, labels)]
    assert losses["lm"].item() == pytest.approx(-sum(r[0] for r in right) / sum(r[1] for r in right), abs=1e-4)
    wrong = [(c[2], c[1]) for h, y in zip(hand, labels) for k, c in enumerate(h) if k != y]
    assert losses["ul"].item() == pytest.approx(sum(w[0] for w in wrong) / sum(w[1] for w in wrong), abs=1e-4)
    ln = [-(torch.tensor([c[0] / c[1] for c in h]).log_softmax(0)[y]).item() for h, y in zip(hand, labels)]
    assert losses["ln"].item() == pytest.approx(sum(ln) / len(ln), abs=1e-4)
    scores = task.evaluate(examples, batch_size=2)
    raw = [max(range(len(h)), key=lambda k: h[k][0]) for h in hand]
    normed = [max(range(len(h)), key=lambda k: h[k][0] / h[k][1]) for h in hand]
    assert scores["accuracy"] == pytest.approx(sum(p == y for p, y in zip(raw, labels)) / len(labels))
    assert scores["accuracy_norm"] == pytest.approx(sum(p == y for p, y in zip(normed, labels)) / len(labels))


def test_the_prompt_is_read_once_with_the_same_losses_and_gradients_as_one_row_per_choice(tiny):
    """Training through the shared prompt (its cache repeated per choice) gives the gradients of one full row per
    choice (the path gradient checkpointing takes), and reads each prompt once."""
    model, tokenizer = tiny
    model = pk.get_peft_model(copy.deepcopy(model), pk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    records = [{"prompt": "The sky is a colour and it is", "choices": [" blue", " green and yellow"], "label": 0},
               {"prompt": "Fire is", "choices": [" hot", " very very cold"], "label": 1}]
    task = MultipleChoiceTask(model.train(), tokenizer, ("lm", "ul", "ln"))
    examples = tokenize_choices(records, tokenizer, max_length=64)
    batch = task.collate(examples)
    read = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: read.append(read.pop() + args[0].numel()))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        read.append(0)
        loss = task.loss_sum(batch)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    hook.remove()
    (shared_loss, shared), (full_loss, full) = grads
    assert shared_loss == pytest.approx(full_loss, rel=1e-5) and shared.keys() == full.keys() and len(shared) == 8
    for name in shared:
        assert torch.allclose(shared[name], full[name], atol=1e-5, rtol=1e-4), name
    prompt_width, longest = batch["prompt_ids"].shape[1], batch["choice_labels"].shape[2]
    assert read[0] == 2 * prompt_width + 4 * (longest - 1)  # prompts once, then every choice but its last token
    assert read[1] == 4 * max(len(e["prompt_ids"]) + len(c) for e in examples for c in e["choice_ids"])  # one row per choice


def _prompted(peft_model):
    """A callable that runs the prompt-tuned model like a plain one: logits of the real tokens only."""
    class Wrapped(torch.nn.Module):
        def forward(self, input_ids):
            out = peft_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            out.logits = out.logits[:, -input_ids.shape[1]:]
            return out
    return Wrapped()


def test_recipe_and_losses_settings():
    config = TrainConfig.from_dict({"recipe": "t-few", "data": "x.jsonl", "lr": 1e-3})
    assert (config.method, config.task, config.choice_losses, config.lr, config.max_steps) == ("ia3", "multiple-choice", "lm,ul,ln", 1e-3, 1000)
    assert parse_losses("lm, ul") == ("lm", "ul")
    with pytest.raises(ValueError, match="subset of lm, ul, ln"):
        TrainConfig.from_dict({"task": "multiple-choice", "choice_losses": "lm,xx"}).resolved("multiple-choice")
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        TrainConfig.from_dict({"recipe": "nope"})


def test_t_few_recipe_from_the_command_line(tiny_lm, tmp_path, capsys):
    rows = [{"prompt": f"Question {i}: is {i} even? Answer:", "choices": [" yes", " no"], "answer": i % 2} for i in range(40)]
    data = _write_jsonl(tmp_path / "even.jsonl", rows)
    out = tmp_path / "run"
    assert cli.main(["train", "--recipe", "t-few", "--model", str(tiny_lm), "--data", str(data), "--max-steps", "4",
                     "--batch-size", "4", "--eval-fraction", "0.25", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["eval_final"]["accuracy"] <= 1 and 0 <= summary["eval_final"]["accuracy_norm"] <= 1
    recorded = (out / "config.yaml").read_text()
    assert "method: ia3" in recorded and "choice_losses: lm,ul,ln" in recorded and "task: multiple-choice" in recorded
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(out), "--data", str(data), "--task", "multiple-choice", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"loss", "accuracy", "accuracy_norm"} and scores["loss"] > 0
