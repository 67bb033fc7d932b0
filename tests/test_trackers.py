"""--report-to: the metrics.jsonl scalars, the config and the summary reach TensorBoard and MLflow, read back with each
library's own reader; a missing extra is one line naming it."""

import json
import subprocess
import sys

import pytest

from conftest import ALPACA_TINY
from peftkit.train.trackers import Tracker


def train_tiny(tmp_path, tiny_lm, report_to, env=None):
    out = tmp_path / f"run-{report_to}"
    cmd = [sys.executable, "-m", "peftkit", "train", "--model", str(tiny_lm), "--data", str(ALPACA_TINY),
           "--max-steps", "3", "--eval-every", "2", "--num-samples", "0", "--max-eval-examples", "4", "--quiet",
           "--report-to", report_to, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    page = (out / "report.html").read_text()  # every run ends with its report
    assert f"peftkit run {out.name}" in page and page.count('class="series"') == 2  # train and eval loss
    return out, records


def expected(records, kind, key):
    return [(r["step"], r[key]) for r in records if r["type"] == kind]


def assert_same_series(got, want):
    """Same steps, same values (TensorBoard stores float32)."""
    assert [s for s, _ in got] == [s for s, _ in want] and len(want) > 0
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


def test_tensorboard_event_files_hold_the_metrics(tmp_path, tiny_lm):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records = train_tiny(tmp_path, tiny_lm, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for kind, key in (("train", "loss"), ("train", "lr"), ("train", "grad_norm"), ("eval", "loss")):
        assert_same_series([(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")], expected(records, kind, key))
    summary = json.loads((out / "summary.json").read_text())
    assert events.Scalars("summary/eval_final_loss")[0].value == pytest.approx(summary["eval_final"]["loss"], rel=1e-6)
    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert any('"max_steps": 3' in text for text in texts.values())  # the resolved config


def test_mlflow_file_store_holds_params_and_metrics(tmp_path, tiny_lm, monkeypatch):
    import os

    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    # MLflow 3 keeps its file store in maintenance mode behind this switch; skinny MLflow has no SQL store
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "peftkit-test", "MLFLOW_ALLOW_FILE_STORE": "true"}
    out, records = train_tiny(tmp_path, tiny_lm, "mlflow", env=env)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's client too
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("peftkit-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == out.name and run.info.status == "FINISHED"
    assert run.data.params["max_steps"] == "3" and run.data.params["method"] == "lora"
    for kind, key in (("train", "loss"), ("eval", "loss")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"{kind}/{key}"))
        assert_same_series(history, expected(records, kind, key))
    summary = json.loads((out / "summary.json").read_text())
    assert run.data.metrics["summary/train_loss"] == pytest.approx(summary["train_loss"], rel=1e-6)


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "trackio"])
def test_a_missing_extra_is_named_in_one_line(name, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, name, None)  # what Python does when the package is absent: import raises
    with pytest.raises(ImportError) as err:
        Tracker(name, tmp_path)
    assert str(err.value) == f"--report-to {name} needs the {name} library: pip install 'peftkit[{name}]'"


def test_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--report-to must be one of none, tensorboard, mlflow, trackio, got 'wandb'"):
        Tracker("wandb", tmp_path)


def test_trackio_local_store_holds_config_and_metrics(tmp_path, tiny_lm, monkeypatch):
    import os

    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "TRACKIO_PROJECT": "peftkit-test"}
    out, records = train_tiny(tmp_path, tiny_lm, "trackio", env=env)
    monkeypatch.setenv("TRACKIO_DIR", env["TRACKIO_DIR"])
    code = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps({'logs': S.get_logs('peftkit-test', %r), 'config': S.get_run_config('peftkit-test', %r)}, default=str))"
            % (out.name, out.name))
    # a fresh interpreter: trackio reads TRACKIO_DIR when it is imported
    read = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert read.returncode == 0, read.stderr
    stored = json.loads(read.stdout.strip().splitlines()[-1])
    assert stored["config"]["max_steps"] == 3 and stored["config"]["method"] == "lora"
    got = [(log["step"], log["train/loss"]) for log in stored["logs"] if "train/loss" in log]
    assert_same_series(got, expected(records, "train", "loss"))
    assert any(log.get("summary/eval_final_loss") is not None for log in stored["logs"])
