# The README's commands. Each creates the environment first when needed.
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test bench lint lock clean

setup:
	@bash scripts/setup.sh

repro: setup
	dvc repro

# The formatter and the linter first: CI runs `make test`, so it checks them too.
test: setup
	ruff check . && ruff format --check .
	python -m pytest

BASELINE_VENV := .venv-bench-pillow

# The baseline of bench/prepare.py is stock Pillow, in a side environment made here.
$(BASELINE_VENV)/bin/python:
	python3 -m venv $(BASELINE_VENV) && $(BASELINE_VENV)/bin/pip install --quiet pillow

bench: setup $(BASELINE_VENV)/bin/python
	python bench/prepare.py --baseline-python $(BASELINE_VENV)/bin/python
	python bench/prepare_rerun.py
	python bench/store.py
	python bench/index.py
	python bench/model.py
	python bench/train.py
	python bench/evaluate.py
	python bench/predict.py
	python bench/neighbours.py
	python bench/tasks.py
	python bench/server.py
	python bench/gpu.py --cpu
	python bench/scale.py

lint: setup
	ruff check . && ruff format --check .

# Every package's version, for every platform and Python >= 3.11, resolved from
# pyproject.toml's ranges: setup installs within it. Run after changing pyproject.toml.
lock: setup
	uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--custom-compile-command "make lock" --quiet -o requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
