"""The prepared GPU check, rehearsed on the CPU: bench/gpu_check.sh --dry-run builds every model and runs one tiny
step of each comparison; the table and JSON carry the figures (they are timings of a tiny model, not results)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def test_table_reports_a_failed_part_and_the_others():
    results = {
        "train": {"part": "train", "error": "ran past its 170 s cap"},
        "decode": {"part": "decode", "rows": 32, "adapters": 32, "median_ms": {"base": 10.0, "peftkit": 11.0, "hf": 22.0},
                   "peftkit_over_base": 1.1, "hf_over_base": 2.2},
    }  # fmt: skip
    text = gpu_check.table(results)
    assert "| train | failed: ran past its 170 s cap | | |" in text
    assert "| (c) mixed decode 32 rows / 32 adapters, ms (base 10.00) | 11.00 (1.10x base) | 22.00 (2.20x base) | 0.50x |" in text


def test_the_caps_leave_the_tests_time_within_eight_minutes():
    assert 90 + sum(cap for cap, _, _ in gpu_check.PARTS.values()) <= 8 * 60


def test_without_a_gpu_the_real_run_stops_with_one_line():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "gpu_check: no CUDA device visible to torch; run with --dry-run for the CPU rehearsal")


@pytest.mark.slow
def test_dry_run_builds_and_steps_every_part(tmp_path):
    out_json = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--json", str(out_json)],
                         capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "dry run: skipping pytest -m cuda" in run.stdout
    report = json.loads(out_json.read_text())
    assert report["dry_run"] is True and report["machine"]["device"] == "cpu"
    assert set(report["results"]) == {"train", "qlora", "decode", "plan"}
    train, qlora, decode = (report["results"][k] for k in ("train", "qlora", "decode"))
    assert train["data"] == "alpaca_sample_1727.json as UTF-8 bytes"
    assert len(train["peftkit_step_s"]) == len(train["hf_step_s"]) == 2  # interleaved, one each per round
    # same initial adapters, same batches in the same order, same AdamW: the two trainings agree (fp32 on CPU)
    assert train["peftkit_held_out_loss"] == pytest.approx(train["hf_held_out_loss"], abs=1e-5)
    assert len(qlora["peftkit_step_s"]) == len(qlora["hf_step_s"]) == 2 and qlora["step_time_ratio"] > 0
    assert qlora["peftkit_peak_mib"] is None  # no CUDA: no allocator peak to read
    assert decode["rows"] == decode["adapters"] == 32 and set(decode["median_ms"]) == {"base", "peftkit", "hf"}
    plan = report["results"]["plan"]  # the planner against this step's measured peak, a shape it was not tuned on
    assert abs(plan["relative_error"]) < 0.15 and plan["measured_peak_mib"] > 0
    assert report["table"] in run.stdout
