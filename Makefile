PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

# Idempotent: a second `make install` only re-checks the stamp against pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,export,sweep]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -m "not gpu" -q

test-fast: install
	$(BIN)/python -m pytest -m "not gpu and not slow" -q

demo: install
	$(BIN)/python -m sdq_lightning.train experiment=digits_demo

bench: install
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf outputs multirun .pytest_cache
