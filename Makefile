# The two commands a new user needs: `make run` (the main job) and `make test`.
PY ?= python3
export HF_HUB_OFFLINE = 1
DATA ?= ../shared/data

.PHONY: setup run test test-fast

setup:
	bash scripts/setup.sh

# Fine-tune LoRA on the embedded SmolLM2 with the Alpaca sample and show the result (loss, plot, samples).
run: setup
	peftkit train --data $(DATA)/instruct/alpaca_tiny_100.json --max-steps 40

# The full suite, slow end-to-end tests included (what CI runs).
test: setup
	$(PY) -m pytest -q

# Without the slow end-to-end tests.
test-fast:
	$(PY) -m pytest -q -m "not slow"
