"""The README's examples run as written: every ```python and ```bash block preceded by ``<!-- runnable -->`` is
executed, in a scratch folder, with two training steps instead of the README's count (``--max-steps N`` rewritten)
and the data and scripts paths pointed at this checkout."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- runnable -->\s*\n```(python|bash)\n(.*?)```", re.S)


def runnable_blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "README.md").read_text())


def test_the_readme_marks_its_examples():
    kinds = [kind for kind, _ in runnable_blocks()]
    assert kinds.count("python") >= 1 and kinds.count("bash") >= 2


def adapt(code: str) -> str:
    """Small step counts and this checkout's paths; nothing else changes."""
    code = re.sub(r"--max-steps \d+", "--max-steps 2 --eval-every 2 --max-eval-examples 8", code)
    code = code.replace("../shared/data", str(DATA)).replace("python scripts/", f"{sys.executable} {ROOT}/scripts/")
    return code.replace("python -m peftkit", f"{sys.executable} -m peftkit")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_readme_block_runs(index, tmp_path):
    kind, code = runnable_blocks()[index]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    if kind == "python":
        cmd = [sys.executable, "-c", code]
    else:
        cmd = ["bash", "-euo", "pipefail", "-c", adapt(code)]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"README block {index} ({kind}) failed:\n{code}\n--- stderr:\n{done.stderr[-3000:]}"
