"""The peftkit command: help texts, config precedence, every verb end to end, resume after kill -9 and Ctrl-C."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ALPACA_TINY

import peftkit
from peftkit import cli
from peftkit import train as T

VERBS = ("train", "eval", "generate", "merge", "export", "inspect", "analyze", "bench", "plan")


def _subparser(verb):
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "verb").choices[verb]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb):
    text = _subparser(verb).format_help()
    assert "example" in text and f"peftkit {verb}" in text


def test_config_file_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.003\nmax-steps: 7\nmethod_options: {use_rslora: true}\nmodel: m1\n")
    args = cli.build_parser().parse_args([
        "train", "--config", str(tmp_path / "run.yaml"), "--lr", "0.01", "--target-modules", "q_proj,v_proj",
        "--method-option", "init_lora_weights=gaussian", "--data", "d.json",
    ])
    config = T.TrainConfig.from_dict(cli.train._train_settings(args))
    assert (config.lr, config.max_steps, config.model, config.data) == (0.01, 7, "m1", "d.json")
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.method_options == {"use_rslora": True, "init_lora_weights": "gaussian"}
    assert config.batch_size is None and config.seed == 0  # untouched: defaults
    assert cli.common.target_modules("all-linear") == "all-linear"
    assert cli.common.target_modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    with pytest.raises(ValueError, match="unknown setting"):
        T.TrainConfig.from_dict({"learning_rate": 1})


def test_user_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "missing.json")]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("peftkit train: error: --data") and "no such file" in err and "Traceback" not in err


def _train(tiny_lm, out, *extra):
    return cli.main(["train", "--model", str(tiny_lm), "--data", str(ALPACA_TINY), "--out", str(out), "--quiet", *extra])


@pytest.mark.slow
def test_train_then_eval_generate_merge_inspect(tiny_lm, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_lm, run, "--max-steps", "6", "--lr", "0.05", "--target-modules", "all-linear",
                  "--num-samples", "1", "--sample-tokens", "4") == 0
    out = capsys.readouterr().out
    assert f"run folder: {run}" in out and "eval loss" in out
    summary = json.loads((run / "summary.json").read_text())
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == cli.EXIT_ERROR
    assert "finished all 6 steps" in capsys.readouterr().err

    # eval of the run folder = the run's held-out split, scored exactly as during training
    assert cli.main(["eval", "--adapter", str(run), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["loss"] == pytest.approx(summary["eval_final"]["loss"], abs=1e-6)
    assert scores["tokens"] == summary["eval_final"]["tokens"]

    # generate: base and two adapters in one mixed batch give what each gives alone
    assert cli.main(["generate", "--adapter", str(run), "--adapter", str(run / "adapter"), "--prompt", "Say hi",
                     "--prompt", "Name a color", "--max-new-tokens", "6", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Say hi", "Name a color"]
    base, tokenizer = peftkit.load_model(str(tiny_lm))
    alone = peftkit.PeftModel.from_pretrained(base, run / "adapter")
    from peftkit.data import render_prompt

    texts = [render_prompt({"instruction": r["prompt"]}) for r in rows]
    expected = T.generate_texts(alone, tokenizer, texts, 6)
    assert [r[str(run)] for r in rows] == expected == [r[str(run / "adapter")] for r in rows]
    with alone.disable_adapter():
        assert [r["base"] for r in rows] == T.generate_texts(alone, tokenizer, texts, 6)

    # merge: a plain transformers folder with the adapter folded in
    assert cli.main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").eos_token == tokenizer.eos_token
    ids = tokenizer(texts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, alone(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert cli.main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == cli.EXIT_ERROR  # exists

    # inspect: the adapter, then the model's targetable modules
    capsys.readouterr()
    assert cli.main(["inspect", str(run)]) == 0
    text = capsys.readouterr().out
    trainable = summary["trainable_parameters"]
    assert "method       LORA" in text and f"parameters   {trainable:,} in " in text
    assert "model.layers.*.mlp.down_proj x2" in text
    assert cli.main(["inspect", str(tiny_lm)]) == 0
    assert "q_proj (Linear) x2" in capsys.readouterr().out


def _spawn_train(tiny_lm, out, *extra):
    command = [sys.executable, "-m", "peftkit.cli", "train", "--model", str(tiny_lm), "--data", str(ALPACA_TINY),
               "--out", str(out), "--quiet", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended before {path} appeared: {process.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def _adapter(run):
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


RESUME_ARGS = ("--max-steps", "40", "--batch-size", "2", "--save-every", "5", "--eval-every", "20",
               "--num-samples", "0", "--dropout", "0.2", "--lr", "0.01")


@pytest.fixture(scope="module")
def uninterrupted(tiny_lm, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    assert _train(tiny_lm, run, *RESUME_ARGS) == 0
    return run


def _same_run(resumed, reference):
    a, b = _adapter(resumed), _adapter(reference)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    steps = lambda run: [(m["type"], m["step"]) for m in T.read_metrics(run / T.METRICS_FILE)]  # noqa: E731
    assert steps(resumed) == steps(reference)  # lines written after the last checkpoint were dropped, then redone
    losses = lambda run: [m["loss"] for m in T.read_metrics(run / T.METRICS_FILE)]  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-6)


@pytest.mark.slow
def test_resume_after_kill_9_ends_with_the_same_adapter(tiny_lm, tmp_path, uninterrupted):
    run = tmp_path / "run"
    process = _spawn_train(tiny_lm, run, *RESUME_ARGS)
    _wait_for(run / "checkpoints" / "step-000010", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (run / "adapter").exists()
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0
    _same_run(run, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same(tiny_lm, tmp_path, uninterrupted):
    run = tmp_path / "run"
    process = _spawn_train(tiny_lm, run, *RESUME_ARGS)
    _wait_for(run / "checkpoints" / "step-000005", process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == cli.EXIT_INTERRUPTED, err
    assert "Continue with: peftkit train --resume" in err
    stopped_at = int(T.list_checkpoints(run)[-1].name.split("-")[1])
    last_logged = max(m["step"] for m in T.read_metrics(run / T.METRICS_FILE))
    assert 5 <= last_logged == stopped_at < 40  # saved at the step where Ctrl-C landed: no finished step is lost
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0
    _same_run(run, uninterrupted)
