# The README's commands. Each creates the environment first when needed.
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test bench lint clean

setup:
	@bash scripts/setup.sh

repro: setup
	dvc repro

test: setup
	python -m pytest

bench: setup
	python bench/prepare.py

lint: setup
	ruff check . && ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
