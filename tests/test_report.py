"""Run reports: the self-contained HTML page, opened in a real headless browser (Debian's chromium).

The page's inline script marks ``<body data-report="ready">`` and counts the chart lines once it ran; the test reads
the DOM after scripts ran (``--dump-dom``), checks the browser logged no script error, and that the screenshot shows
the charts' line colours. Run folders here are written by hand (mechanics); real runs write report.html at their
end (tests/test_trackers.py checks it is there).
"""

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from peftkit.report import COLORS, render_report, read_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it: apt-get install -y chromium)")


def make_run(folder, final_accuracy, steps=10):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": "lora", "model": "smollm2-135m", "task": "sft", "lr": 0.002}))
    lines = [{"type": "train", "step": s, "loss": 2.0 / s, "lr": 0.002} for s in range(1, steps + 1)]
    lines += [{"type": "eval", "step": s, "loss": 1.5 - 0.1 * s, "accuracy": 0.2 + (final_accuracy - 0.2) * s / steps} for s in (0, 5, 10)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "summary.json").write_text(json.dumps({
        "steps": steps, "total_steps": steps, "train_seconds": 12.5, "trainable_parameters": 460800, "total_parameters": 134975808,
        "eval_initial": {"loss": 1.5, "accuracy": 0.2}, "eval_final": {"loss": 0.5, "accuracy": final_accuracy}}))
    (folder / "samples.json").write_text(json.dumps({"samples": [
        {"prompt": "Review: <b>great</b> & fun", "reference": "positive", "before": "The review is", "after": "positive"}]}))
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 2048)
    return folder


def browse(page, tmp_path):
    """(the DOM after scripts ran, the browser's log, the screenshot's RGB pixels) of ``page``."""
    from PIL import Image

    common = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,1000"]
    dom = subprocess.run(common + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shot = tmp_path / "shot.png"
    taken = subprocess.run(common + [f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists(), taken.stderr[-2000:]
    return dom.stdout, dom.stderr + taken.stderr, Image.open(shot).convert("RGB")


def script_errors(log):
    return [line for line in log.splitlines() if "CONSOLE" in line and re.search(r"error|Uncaught", line, re.I)]


def test_page_is_self_contained_and_escapes_text(tmp_path):
    page = render_report([read_run(make_run(tmp_path / "a", 0.9))])
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert "Review: &lt;b&gt;great&lt;/b&gt; &amp; fun" in page and "<b>great</b>" not in page
    assert "460,800 of 134,975,808" in page and "2.0 KiB" in page  # parameters and adapter size
    assert "0.2 &rarr; <b>0.9</b>" in page  # accuracy before -> after


@needs_chromium
def test_one_run_renders_its_charts_in_a_browser(tmp_path):
    run = make_run(tmp_path / "run", 0.9)
    done = subprocess.run([sys.executable, "-m", "peftkit", "report", str(run)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    dom, log, image = browse(run / "report.html", tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-report="ready"' in body and 'data-charts="3"' in body  # train loss, eval loss, accuracy
    assert 'data-points="16"' in body  # 10 train + 3 eval loss + 3 accuracy points get hover read-outs
    assert script_errors(log) == []
    colour = tuple(int(COLORS[0][i : i + 2], 16) for i in (1, 3, 5))
    assert sum(1 for pixel in image.getdata() if pixel == colour) > 200  # the drawn lines are on screen


@needs_chromium
def test_several_runs_side_by_side(tmp_path):
    runs = [make_run(tmp_path / name, acc) for name, acc in (("lr-high", 0.9), ("lr-low", 0.6), ("r16", 0.8))]
    out = tmp_path / "compare.html"
    done = subprocess.run([sys.executable, "-m", "peftkit", "report", *map(str, runs), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == str(out), done.stderr
    dom, log, _ = browse(out, tmp_path)
    assert 'data-charts="9"' in re.search(r"<body[^>]*>", dom).group(0)  # 3 charts x 3 runs
    assert dom.count("class=\"run\"") == 3 and all(name in dom for name in ("lr-high", "lr-low", "r16"))
    assert script_errors(log) == []


def test_not_a_run_folder_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "peftkit", "report", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"peftkit report: error: {tmp_path} is not a peftkit run folder: it has no config.yaml"
