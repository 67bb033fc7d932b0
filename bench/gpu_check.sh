#!/usr/bin/env bash
# The prepared GPU check: peftkit's CUDA tests, then three comparisons with HF PEFT on the same GPU (LoRA training
# tokens/s in bf16 vs Trainer, QLoRA peak memory and step time vs bitsandbytes + HF PEFT, mixed-adapter decode of
# 32 rows over 32 adapters vs the base and HF PEFT), and peftkit plan's peak vs the measured one. One table on
# stdout, the figures in bench/results/gpu_check.json.
#
# Needs: one NVIDIA GPU, python with torch (>= 2.11, CUDA build), transformers 5.x, peft, pytest; no network.
# peftkit itself is installed from this checkout without network; missing bitsandbytes / fastapi / uvicorn wheels
# can be given in a folder. Under 8 minutes in all: the tests get 90 s, the parts 150 + 110 + 80 + 40 s (bench/gpu_check.py).
#
#   bash bench/gpu_check.sh [--wheels DIR] [--python PY] [--dry-run] [any bench/gpu_check.py option, e.g. --json PATH]
#
# --dry-run: the CPU rehearsal (tiny model, one or two steps of each part; the CUDA tests are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
WHEELS=""
DRY=0
PASS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --dry-run) DRY=1; PASS+=("$1"); shift ;;
    *) PASS+=("$1"); shift ;;
  esac
done

# 1. peftkit (and any missing small package) without network
if ! "$PY" -c "import peftkit" 2>/dev/null; then
  if ! "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . >/dev/null; then
    echo "pip could not install peftkit offline (no setuptools?): using it from src/ through PYTHONPATH"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
if [ -n "$WHEELS" ]; then
  for pkg in bitsandbytes fastapi uvicorn; do
    "$PY" -c "import $pkg" 2>/dev/null || "$PY" -m pip install --no-index --find-links "$WHEELS" "$pkg" >/dev/null
  done
fi
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| cuda', torch.cuda.is_available())"

# 2. the suite's CUDA-marked tests ("no tests collected", exit 5, is fine: the marker may have no tests yet)
if [ "$DRY" = 1 ]; then
  echo "dry run: skipping pytest -m cuda"
else
  set +e
  # a test module whose optional dependency is missing must not stop the CUDA tests of the others
  timeout 90 "$PY" -m pytest -q -m cuda -p no:warnings -p no:cacheprovider --continue-on-collection-errors tests
  rc=$?
  set -e
  case $rc in
    0) echo "cuda tests: passed" ;;
    5) echo "cuda tests: none collected" ;;
    124) echo "cuda tests: ran past 90 s (continuing)" ;;
    *) echo "cuda tests: FAILED (exit $rc; continuing with the comparisons)" ;;
  esac
fi

# 3. the comparisons (each part in its own process under its own time cap)
exec "$PY" bench/gpu_check.py ${PASS[@]+"${PASS[@]}"}
