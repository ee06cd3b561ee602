# The two commands a newcomer runs (see README.md). Both set everything up first.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/rksc-sgl demo

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python benchmarks/bench_engine.py
