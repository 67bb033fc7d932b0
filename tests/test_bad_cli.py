"""Bad input on the command line (issue 15): every user error ends as one line ``peftkit VERB: error: ...`` with exit
status 2 (the command or its settings are wrong) or 1 (what it read or did failed), 130 for Ctrl-C; never a traceback.

Most cases run ``cli.main`` in this process and fail before any model loads; subprocesses only where a fresh
interpreter is the point (missing optional packages, signals, a closed pipe)."""

import csv
import errno
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import ALPACA_TINY

from peftkit import cli, strict_json
from peftkit.cli import errors as cli_errors

USAGE, FAILED, INTERRUPTED = 2, 1, 130


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``peftkit ARGV``; argparse's own errors (SystemExit) count as a status."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err, verb, *fragments):
    """No traceback; the error is one line starting with ``peftkit VERB:`` (argparse adds its usage lines above)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"peftkit {verb}:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train_args(tmp_path, *extra):
    return ["train", "--data", ALPACA_TINY, "--model", tmp_path / "never-loaded", "--out", tmp_path / "run", "--quiet", *extra]


# ---------------------------------------------------------------------------------------------------- settings (2)

NONSENSE = [  # (flags, what the message names): issue 15 finding 6 (negative warmup) and its class
    (["--warmup", "-1"], "--warmup (setting warmup) must be >= 0"),
    (["--warmup", "-0.05"], "--warmup (setting warmup) must be >= 0"),
    (["--lr", "0"], "--lr (setting lr) must be a positive number, got 0"),
    (["--lr", "-0.001"], "--lr (setting lr) must be a positive number"),
    (["--lr", "nan"], "--lr (setting lr) must be a positive number, got nan"),
    (["--lr", "inf"], "--lr (setting lr) must be a positive number, got inf"),
    (["--batch-size", "0"], "--batch-size (setting batch_size) must be at least 1, got 0"),
    (["--max-steps", "-1"], "--max-steps (setting max_steps) must be at least 1, got -1"),
    (["--epochs", "0"], "--epochs (setting epochs) must be a positive number"),
    (["--eval-fraction", "1.5"], "--eval-fraction (setting eval_fraction) must be between 0 and 1"),
    (["--eval-fraction", "0"], "--eval-fraction (setting eval_fraction) must be between 0 and 1"),
    (["--threads", "0"], "--threads (setting threads) must be at least 1"),
    (["--grad-accum", "0"], "--grad-accum (setting grad_accum) must be at least 1"),
    (["--max-length", "-5"], "--max-length (setting max_length) must be at least 1"),
    (["--weight-decay", "-0.1"], "--weight-decay (setting weight_decay) must be >= 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm (setting max_grad_norm) must be a positive number"),
    (["--dropout", "1"], "--dropout (setting dropout) must be in [0, 1)"),
    (["--eval-every", "-1"], "--eval-every (setting eval_every) must be >= 0"),
    (["--dist-timeout", "0"], "--dist-timeout (setting dist_timeout) must be a positive number of seconds"),
    (["--max-eval-examples", "0"], "--max-eval-examples (setting max_eval_examples) must be at least 1"),
]


@pytest.mark.parametrize("flags, message", NONSENSE, ids=[" ".join(f) for f, _ in NONSENSE])
def test_nonsensical_numbers_are_refused_before_anything_loads(tmp_path, capsys, flags, message):
    code, _, err = run_cli(capsys, *train_args(tmp_path, *flags))
    assert code == USAGE
    assert_one_line(err, "train", "error: " + message)
    assert not (tmp_path / "run").exists()  # refused before the run folder (or the model) was touched


METHOD_OPTIONS = [  # --method-option values of the wrong type: refused before the model loads (it is never built)
    ("lora_dropout=abc", "LoraConfig.lora_dropout must be a number, got 'abc'"),
    ("use_rslora=maybe", "LoraConfig.use_rslora must be true or false, got 'maybe'"),
    ("layers_to_transform=[0, x]", "LoraConfig.layers_to_transform must be"),
]


@pytest.mark.parametrize("option, message", METHOD_OPTIONS, ids=[o.split("=")[0] for o, _ in METHOD_OPTIONS])
def test_method_options_of_the_wrong_type(tmp_path, capsys, option, message):
    code, _, err = run_cli(capsys, *train_args(tmp_path, "--method-option", option))
    assert code == USAGE
    assert_one_line(err, "train", message, f"--method-option {option.split('=')[0]}=")


PARSE_ERRORS = [  # (argv, what argparse's error line says): refused at parse time, status 2
    (["train", "--target-modules", "q_proj("], "invalid regular expression 'q_proj('"),
    (["train", "--target-modules", "[a-"], "invalid regular expression '[a-'"),
    (["train", "--target-modules", ","], "no module name in ','"),
    (["train", "--labels", "pos"], "expected at least 2 non-empty labels"),
    (["train", "--labels", "a,b,a"], "a label is repeated"),
    (["eval", "--labels", "a,,b"], "expected at least 2 non-empty labels"),
    (["generate", "--max-new-tokens", "0"], "must be at least 1, got 0"),
    (["serve", "--port", "99999"], "a TCP port is 1-65535, got 99999"),
    (["serve", "--port", "0"], "a TCP port is 1-65535, got 0"),
    (["serve", "--port", "http"], "expected an integer, got 'http'"),
    (["serve", "--adapter", "no-equals-sign"], "takes NAME=PATH"),
    (["serve", "--adapter", "a=/no/such/adapter"], "has no adapter_config.json"),
    (["serve", "--max-batch-size", "0"], "must be >= 1"),
    (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("argv, message", PARSE_ERRORS, ids=[" ".join(a) for a, _ in PARSE_ERRORS])
def test_malformed_command_lines_are_usage_errors(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == USAGE
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"peftkit {argv[0]}: error: ") and message in err.strip().splitlines()[-1]


CONFIG_FILES = [  # (--config text, status, message): issue 15 finding 7 (bad YAML) and its class
    ("lr: [0.1\nmax_steps: 3\n", FAILED, "run.yaml, line 2: invalid YAML (expected ',' or ']', but got ':')"),
    ("- lr\n- 0.1\n", FAILED, "expected a mapping of settings (key: value lines), got list"),
    ("just words\n", FAILED, "expected a mapping of settings (key: value lines), got str"),
    ("lr: fast\n", USAGE, "lr must be a number or null, got 'fast'"),
    ("max_steps: 2.5\n", USAGE, "max_steps must be an integer or null, got 2.5"),
    ("learning_rate: 0.1\n", USAGE, "unknown setting(s) ['learning_rate']"),
    ("target_modules: 'q_proj('\n", USAGE, "target_modules: invalid regular expression 'q_proj('"),
    ("gradient_checkpointing: maybe\n", USAGE, "gradient_checkpointing must be true or false, got 'maybe'"),
    ("method_options: 3\n", USAGE, "method_options must be a mapping, got 3"),
]


@pytest.mark.parametrize("text, status, message", CONFIG_FILES, ids=[t.split(":")[0][:20] for t, _, _ in CONFIG_FILES])
def test_bad_config_files(tmp_path, capsys, text, status, message):
    (tmp_path / "run.yaml").write_text(text)
    code, _, err = run_cli(capsys, *train_args(tmp_path, "--config", tmp_path / "run.yaml"))
    assert code == status
    assert_one_line(err, "train", message)


def test_config_file_not_utf8_or_missing(tmp_path, capsys):
    (tmp_path / "run.yaml").write_bytes("lr: 0.1\nname: caf\xe9\n".encode("latin-1"))
    code, _, err = run_cli(capsys, *train_args(tmp_path, "--config", tmp_path / "run.yaml"))
    assert code == FAILED
    assert_one_line(err, "train", "run.yaml: not UTF-8 text")
    code, _, err = run_cli(capsys, *train_args(tmp_path, "--config", tmp_path / "none.yaml"))
    assert code == FAILED
    assert_one_line(err, "train", "--config", "none.yaml: no such file")


def _fake_run(folder: Path, config_text: str) -> Path:
    """A run folder as far as find_adapter / --resume look before reading config.yaml."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "config.yaml").write_text(config_text)
    return folder


@pytest.mark.parametrize("verb", ["eval", "resume", "merge", "generate", "inspect"])
def test_damaged_run_config_yaml(tmp_path, capsys, verb):
    """Issue 15 finding 7: a damaged run config.yaml is one line naming the file, for every verb that reads it."""
    run = _fake_run(tmp_path / "run", "model: m\nr: 8\nlr: [\n")
    argv = {"eval": ["eval", "--adapter", run], "resume": ["train", "--resume", run],
            "merge": ["merge", "--adapter", run, "--out", tmp_path / "merged"],
            "generate": ["generate", "--adapter", run, "--prompt", "hi"], "inspect": ["inspect", run]}[verb]
    code, _, err = run_cli(capsys, *argv)
    if verb == "inspect":  # inspect reads the adapter folder, not the run's settings: the empty adapter config is the error
        assert code == FAILED and "Traceback" not in err
        return
    assert code == FAILED
    assert_one_line(err, argv[0], "config.yaml, line 4: invalid YAML")


# ------------------------------------------------------------------------------------------------------ paths (1)


def test_out_under_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, *train_args(tmp_path)[:-3], "--out", tmp_path / "file" / "run", "--quiet")
    assert code == FAILED
    assert_one_line(err, "train", f"--out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a folder")
    code, _, err = run_cli(capsys, "merge", "--adapter", tmp_path / "any", "--out", tmp_path / "file" / "sub" / "merged")
    assert code == FAILED
    assert_one_line(err, "merge", f"{tmp_path / 'file'} is a file, not a folder; pick another --out")


def test_missing_paths(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    cases = [
        (["inspect", missing], "inspect", f"{missing}: no such folder; pass an embedded model"),
        (["eval", "--adapter", missing], "eval", "is neither an adapter folder"),
        (["generate", "--adapter", missing, "--prompt", "hi"], "generate", "is neither an adapter folder"),
        (["merge", "--adapter", missing, "--out", tmp_path / "m"], "merge", "is neither an adapter folder"),
        (["train", "--data", missing], "train", "no such file or folder"),
        (["train", "--resume", missing], "train", "no config.yaml there"),
    ]
    for argv, verb, message in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == FAILED, argv
        assert_one_line(err, verb, message)


def test_data_folder_without_train_tsv(tmp_path, capsys):
    code, _, err = run_cli(capsys, *train_args(tmp_path)[:1], "--data", tmp_path, "--quiet")
    assert code == FAILED
    assert_one_line(err, "train", "is a folder without train.tsv")


# ---------------------------------------------------------------------------------------------- the handler itself

def _wrapped(first: BaseException, then: BaseException) -> BaseException:
    """``then`` raised while handling ``first`` (as a library that turns an interrupted import into an ImportError)."""
    then.__context__ = first
    return then


EXCEPTIONS = [  # (what a verb raised, status, what the one line says): every broad class has its message
    (OSError(errno.ENOSPC, "No space left on device", "/tmp/x"), FAILED, "/tmp/x: No space left on device: the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/f"), FAILED, "/root/f: Permission denied: check its permissions"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/f/b"), FAILED, "a part of the path is a file, not a folder"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/d"), FAILED, "/d: Is a directory: expected a file, got a folder"),
    (ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn"), FAILED, "pip install 'peftkit[serve]'"),
    (ModuleNotFoundError("No module named 'bitsandbytes'", name="bitsandbytes"), FAILED, "pip install 'peftkit[quant]'"),
    (ModuleNotFoundError("No module named 'foo'", name="foo.bar"), FAILED, "the Python package 'foo' is not installed"),
    (ImportError("4-bit base models need bitsandbytes: pip install 'peftkit[quant]'"), FAILED, "error: 4-bit base models need bitsandbytes"),
    (yaml.YAMLError("mapping values are not allowed\n here"), FAILED, "invalid YAML: mapping values are not allowed here"),
    (csv.Error("field larger than field limit (131072)"), FAILED, "unreadable CSV/TSV: field larger than field limit"),
    (re.error("missing ), unterminated subpattern"), USAGE, "invalid regular expression: missing ), unterminated"),
    (OverflowError("port must be 0-65535."), FAILED, "a number is out of range (port must be 0-65535.)"),
    (UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"), FAILED, "not UTF-8 text"),
    (MemoryError(), FAILED, "out of memory: lower --batch-size"),
    (KeyboardInterrupt(), INTERRUPTED, "interrupted (Ctrl-C)"),
    (_wrapped(KeyboardInterrupt(), ImportError("Failed to import transformers.models.llama")), INTERRUPTED, "interrupted (Ctrl-C)"),
    (ModuleNotFoundError("Could not import module 'LlamaModel'"), FAILED, "error: Could not import module 'LlamaModel'"),
    (RuntimeError("size mismatch\nfor a.b"), FAILED, "internal error: RuntimeError: size mismatch for a.b (a bug in peftkit: rerun with --debug and report it)"),
    (KeyError("lora_A"), FAILED, "internal error: KeyError: 'lora_A'"),
    (ValueError("x.tsv, line 3: bad\nthing"), FAILED, "error: x.tsv, line 3: bad thing"),
]


@pytest.mark.parametrize("raised, status, message", EXCEPTIONS, ids=[type(e).__name__ + str(i) for i, (e, _, _) in enumerate(EXCEPTIONS)])
def test_every_kind_of_error_is_one_line(monkeypatch, capsys, raised, status, message):
    def verb(args):
        raise raised

    monkeypatch.setattr(cli.bench, "cmd_bench", verb)
    code, _, err = run_cli(capsys, "bench")
    assert code == status
    assert_one_line(err, "bench", message)
    assert len(err.strip().splitlines()) == 1


def test_safetensors_errors_are_named(monkeypatch, capsys):
    from safetensors import SafetensorError

    def verb(args):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")

    monkeypatch.setattr(cli.bench, "cmd_bench", verb)
    code, _, err = run_cli(capsys, "bench")
    assert code == FAILED
    assert_one_line(err, "bench", "a damaged or unreadable safetensors file (Error while deserializing header")


@pytest.mark.parametrize("how", ["--debug before the verb", "--debug after the verb", "PEFTKIT_DEBUG=1"])
def test_debug_shows_the_traceback(monkeypatch, capsys, how):
    def verb(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli.bench, "cmd_bench", verb)
    argv = {"--debug before the verb": ["--debug", "bench"], "--debug after the verb": ["bench", "--debug"],
            "PEFTKIT_DEBUG=1": ["bench"]}[how]
    if how.startswith("PEFTKIT"):
        monkeypatch.setenv("PEFTKIT_DEBUG", "1")
    code, _, err = run_cli(capsys, *argv)
    assert code == FAILED and "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1].startswith("peftkit bench: internal error: RuntimeError: boom")


# ---------------------------------------------------------------------------------------------------- strict JSON


def test_strict_json_turns_non_finite_numbers_into_null():
    value = {"loss": math.nan, "f1": math.inf, "nested": [1.5, -math.inf, {"x": math.nan}], "tokens": 3}
    text = strict_json.dumps(value)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "loss": None, "f1": None, "nested": [1.5, None, {"x": None}], "tokens": 3}
    assert strict_json.non_finite_keys(value) == ["loss", "f1"]


def test_eval_json_with_a_nan_loss_is_valid_json_and_an_error(monkeypatch, capsys, tmp_path):
    """Issue 15 finding 3 (the CLI half): --json prints strict JSON and a NaN loss exits 1 with one line."""
    import peftkit.train as T

    data = T.task_data.TaskData("sft", [], [{"input_ids": [1]}])
    config = T.TrainConfig(model="m", data="d.json", task="sft")
    monkeypatch.setattr(T, "evaluate_adapter", lambda *a, **k: ({"loss": math.nan, "tokens": 7}, config, data))
    code, out, err = run_cli(capsys, "eval", "--data", "d.json", "--json")
    assert code == FAILED
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {"loss": None, "tokens": 7}
    assert_one_line(err, "eval", "error: loss not finite (nan)")


# -------------------------------------------------------------------------------------- serve, before the model loads


def test_serve_refuses_duplicate_adapter_names_before_loading(tmp_path, capsys, monkeypatch):
    """Issue 15 finding 6: the same --adapter NAME twice (the second silently replaced the first)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    monkeypatch.setattr("peftkit.models.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    code, _, err = run_cli(capsys, "serve", "--model", "base", "--adapter", f"x={tmp_path / 'a'}", "--adapter", f"x={tmp_path / 'b'}")
    assert code == USAGE
    assert_one_line(err, "serve", f"--adapter x= is given twice ({tmp_path / 'a'} and {tmp_path / 'b'})")
    code, _, err = run_cli(capsys, "serve", "--model", "base", "--adapter", f"base={tmp_path / 'a'}")
    assert code == USAGE
    assert_one_line(err, "serve", "has the base model's name")


def test_serve_refuses_a_taken_port_and_bad_files_before_loading(tmp_path, capsys, monkeypatch):
    import socket

    monkeypatch.setattr("peftkit.models.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", "--port", port)
    assert code == FAILED
    assert_one_line(err, "serve", f"cannot listen on 127.0.0.1:{port}", "pick another --port")
    (tmp_path / "token").write_text("two words\n")
    code, _, err = run_cli(capsys, "serve", "--api-key-file", tmp_path / "token")
    assert code == USAGE
    assert_one_line(err, "serve", "must hold one token")
    code, _, err = run_cli(capsys, "serve", "--adapters-dir", tmp_path / "token")
    assert code == USAGE
    assert_one_line(err, "serve", "is not a directory")


# ------------------------------------------------------------------------------ fresh interpreters: extras, pipes

BLOCK_IMPORT = textwrap.dedent("""
    import importlib.abc, os, sys

    class _Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in os.environ["BLOCKED_MODULES"].split(","):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Missing())
""")


def _run_without(tmp_path, blocked, *argv, timeout=180):
    """``python -m peftkit.cli ARGV`` in a fresh interpreter where importing ``blocked`` fails as if not installed."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(BLOCK_IMPORT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]),
           "BLOCKED_MODULES": blocked}
    return subprocess.run([sys.executable, "-m", "peftkit.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_serve_without_the_serve_extra(tmp_path):
    done = _run_without(tmp_path, "uvicorn", "serve", "--port", "8123")
    assert done.returncode == FAILED, done.stderr
    assert_one_line(done.stderr, "serve", "optional package 'uvicorn', which is not installed: pip install 'peftkit[serve]'")


def test_quantization_without_the_quant_extra(tmp_path, tiny_lm):
    done = _run_without(tmp_path, "bitsandbytes", "train", "--model", tiny_lm, "--data", ALPACA_TINY, "--quantization",
                        "nf4", "--out", tmp_path / "run", "--max-steps", "1", "--quiet")
    assert done.returncode == FAILED, done.stderr
    assert_one_line(done.stderr, "train", "error: 4-bit/8-bit base models need bitsandbytes: pip install 'peftkit[quant]'")


def test_a_closed_pipe_is_quiet(tmp_path):
    """``peftkit bench | head -0``: the reader went away; no BrokenPipeError traceback, status 141 (as SIGPIPE)."""
    process = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.stdout.flush(); time.sleep(0)\n"
                                "from peftkit import cli; sys.exit(cli.main(['bench']))"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the child writes anything
    err = process.stderr.read()
    process.wait(timeout=120)
    assert process.returncode == cli_errors.EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err


# ---------------------------------------------------------------------------------------------- --resume conflicts


@pytest.fixture(scope="module")
def finished_run(tiny_lm, tmp_path_factory):
    run = tmp_path_factory.mktemp("sft") / "run"
    assert cli.main(["train", "--model", str(tiny_lm), "--data", str(ALPACA_TINY), "--out", str(run), "--max-steps", "2",
                     "--batch-size", "2", "--num-samples", "0", "--eval-every", "0", "--quiet"]) == 0
    return run


@pytest.mark.parametrize("flags, conflict", [
    (["--r", "16"], "--r 16 (the run's: 8)"),
    (["--target-modules", "all-linear"], "--target-modules all-linear (the run's: ['q_proj', 'v_proj'])"),
    (["--method", "ia3"], "--method ia3 (the run's: lora)"),
    (["--data", "../shared/data/glue/SST-2"], "--data ../shared/data/glue/SST-2 (the run's:"),
    (["--r", "4", "--alpha", "8"], "--r 4 (the run's: 8); --alpha 8.0 (the run's: 16"),
], ids=["r", "target-modules", "method", "data", "r and alpha"])
def test_resume_refuses_settings_that_shape_the_adapter(finished_run, capsys, flags, conflict):
    """Issue 15 finding 7: --resume with a conflicting --r was a torch size mismatch traceback."""
    code, _, err = run_cli(capsys, "train", "--resume", finished_run, "--max-steps", "4", *flags)
    assert code == USAGE
    assert_one_line(err, "train", f"--resume {finished_run}: {conflict}", "start a new run with --out")


def test_resume_accepts_the_same_values_and_schedule_changes(finished_run, capsys):
    code, _, err = run_cli(capsys, "train", "--resume", finished_run, "--r", "8", "--max-steps", "3", "--lr", "0.001", "--quiet")
    assert code == 0, err
    assert json.loads((finished_run / "summary.json").read_text())["steps"] == 3


# ------------------------------------------------------------------------------------------------------- signals


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line(tiny_lm, tmp_path):
    """Issue 15 finding 7: a second Ctrl-C during training was a 40-line traceback. Steps of 64 micro-batches (about
    a second each here) make sure the second signal lands inside the step the first one asked to finish."""
    import signal
    import time

    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "peftkit.cli", "train", "--model", str(tiny_lm), "--data", str(ALPACA_TINY), "--out",
         str(run), "--max-steps", "50", "--batch-size", "4", "--grad-accum", "64", "--save-every", "1", "--eval-every",
         "0", "--num-samples", "0", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run / "checkpoints" / "step-000001").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == INTERRUPTED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (line,) = err.strip().splitlines()
    assert re.fullmatch(re.escape(f"peftkit train: stopped at once by a second Ctrl-C, unsaved; the last checkpoint is "
                                  f"{run / 'checkpoints' / 'step-'}") + r"\d{6}" +
                        re.escape(f". Continue with: peftkit train --resume {run}"), line), line
    assert not (run / "adapter").exists()


def test_an_error_after_a_swallowed_ctrl_c_is_still_an_interrupt():
    """A Ctrl-C that lands inside a C extension's import can leave no KeyboardInterrupt at all, only a later
    ImportError ("cannot load module more than once per process"): the recorded signal decides."""
    from peftkit.cli import errors

    err = ImportError("cannot load module more than once per process")
    with errors.sigint_watch():
        assert errors.explain(err)[0] == FAILED
        errors._SigintSeen.seen = True  # what the handler records when the signal arrives
        assert errors.explain(err) == (INTERRUPTED, "interrupted (Ctrl-C)")
    with errors.sigint_watch():  # every command starts with a clean record
        assert errors.explain(err)[0] == FAILED
