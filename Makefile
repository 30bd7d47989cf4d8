# fewstep: the two commands a new user needs.
#   make run    set up .venv (CPU torch + pinned deps) and run the pipeline (`dvc repro`)
#   make test   set up .venv and run the test suite
# PROFILE=gpu writes params.yaml merged with profiles/gpu.yaml (DVC tracks it), then runs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?=
export DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1

.PHONY: setup run test test-unit test-integration bench clean

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch   # CPU wheel on this disk; GPU boxes keep their own
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

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf data models checkpoints dvc_plots
