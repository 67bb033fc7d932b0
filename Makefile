# The two commands a new user needs: `make run` (the main job) and `make test`. Both install into a virtual
# environment, .venv, with the exact versions of constraints.txt (scripts/setup.sh); activate it to use the
# `peftkit` command yourself: `source .venv/bin/activate`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE = 1
DATA ?= ../shared/data

.PHONY: setup run test test-fast test-latest

setup:
	VENV=$(VENV) bash scripts/setup.sh

# Fine-tune LoRA on the embedded SmolLM2 with the Alpaca sample and show the result (loss, plot, samples).
run: setup
	$(VENV)/bin/peftkit train --data $(DATA)/instruct/alpaca_tiny_100.json --max-steps 40

# The full suite, slow end-to-end tests included (what CI runs, in a freshly built .venv).
test: setup
	$(PY) -m pytest -q

# Without the slow end-to-end tests.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Drift check, not part of CI: the suite against the newest transformers and peft, in a scratch environment.
test-latest:
	VENV=.venv-latest FRESH=1 LATEST=1 bash scripts/setup.sh
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider
