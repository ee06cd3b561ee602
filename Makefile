# The two commands a newcomer runs (see README.md). Both set everything up first.
VENV ?= .venv
PYTEST_ARGS ?=
# Two workers: the SGLang-server tests on one (tests/conftest.py groups them), the rest on the other.
TEST_WORKERS ?= 2

.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/rksc-sgl demo

test: setup
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python benchmarks/bench_engine.py
