# The two commands a new user needs: `make run` (the main job) and `make test`. Both install into a virtual
# environment, .venv, with the exact versions of constraints.txt (scripts/setup.sh); activate it to use the
# `peftkit` command yourself: `source .venv/bin/activate`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE = 1
DATA ?= ../shared/data

.PHONY: setup run run-alpaca test test-fast test-latest

setup:
	VENV=$(VENV) bash scripts/setup.sh

# The main job: teach the embedded SmolLM2 to answer SST-2's sentiment question with one word ("positive" /
# "negative"), as chat conversations with loss on the answer only; shows held-out accuracy before -> after (200 dev
# sentences never trained on), sample answers before and after, the plot and runs/sst2-chat-*/report.html.
RUN_OUT ?= runs/sst2-chat-$(shell date +%Y%m%d-%H%M%S)
run: setup
	$(PY) scripts/glue_chat.py --glue $(DATA)/glue/SST-2 --out runs/data --train 1000 --dev 200
	$(VENV)/bin/peftkit train --data runs/data/sst2_train.jsonl --eval-data runs/data/sst2_dev.jsonl \
		--max-steps 40 --batch-size 8 --lr 2e-3 --eval-every 40 --num-samples 4 --sample-tokens 8 --out $(RUN_OUT)
	@echo; cat $(RUN_OUT)/samples.md; echo; echo "open $(RUN_OUT)/report.html (plot: $(RUN_OUT)/metrics.png)"

# The earlier demo: LoRA instruction tuning on 100 Alpaca records (loss only moves a little in 40 steps).
run-alpaca: setup
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
