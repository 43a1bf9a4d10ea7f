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

# the fast tier (every test not marked slow); CI runs it and the slow tier. Each tier ends with its 15 slowest
# cases: the fast tier must stay under 5 minutes on an idle 2-core machine (move a case that grows to the slow tier)
test: install
	$(BIN)/python -m pytest -m "not gpu and not slow" -q --durations=15

test-slow: install
	$(BIN)/python -m pytest -m "slow and not gpu" -q --durations=15

test-all: install
	$(BIN)/python -m pytest -m "not gpu" -q

test-fast: test

demo: install
	$(BIN)/python -m sdq_lightning.train experiment=digits_demo

bench: install
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf outputs multirun .pytest_cache
