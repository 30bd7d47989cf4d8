# fewstep: the two commands a new user needs.
#   make run    set up .venv (CPU torch + pinned deps) and run the pipeline (`dvc repro`)
#   make test   set up .venv and run the test suite
# PROFILE=gpu writes params.yaml merged with profiles/gpu.yaml (DVC tracks it), then runs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?=
TORCH := 2.13.0
export DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1

.PHONY: setup run test test-unit test-integration bench clean

# torch: a venv whose torch already imports (a GPU box with its own build) keeps it; otherwise the
# pinned CPU build, or a clear failure (never an unpinned torch: that pulls a multi-GB CUDA build).
$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH) || \
	  { echo 'make: cannot install torch==$(TORCH) (the CPU build). Install a torch build into $(VENV) yourself (e.g. the CUDA one for your GPU), then rerun make.' >&2; exit 1; }
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/.installed

run: setup
	test -d .git || (git init -q && git add -A && git -c user.name=fewstep -c user.email=fewstep@localhost commit -qm "init")
	test -d .dvc || ($(BIN)/dvc init -q && $(BIN)/dvc config core.check_update false)
	test -z "$(PROFILE)" || $(BIN)/python -m stages.profile $(PROFILE)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

test-unit: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests/unit

test-integration: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests/integration

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf data models checkpoints dvc_plots
