PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-all test-fast demo bench clean

# Idempotent: a second `make install` only re-checks the stamp against pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,export,sweep]'
	touch $(STAMP)

install: $(STAMP)

# the fast tier (every test not marked slow); CI runs it and the slow tier
test: install
	$(BIN)/python -m pytest -m "not gpu and not slow" -q

test-slow: install
	$(BIN)/python -m pytest -m "slow and not gpu" -q

test-all: install
	$(BIN)/python -m pytest -m "not gpu" -q

test-fast: test

demo: install
	$(BIN)/python -m sdq_lightning.train experiment=digits_demo

bench: install
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf outputs multirun .pytest_cache
