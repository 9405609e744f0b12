# `make test` and `make demo` each build .venv from scratch when it is missing or
# older than pyproject.toml/constraints.txt; constraints.txt pins every version.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: test test-isa demo lint bench clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "treeopt needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.test-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[test]'
	touch $@

$(VENV)/.demo-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[demo]'
	touch $@

test: $(VENV)/.test-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n 2 tests

# The numerical tests under other XLA:CPU instruction sets: XLA vectorizes sums
# by the host's instruction set, so float32 results differ in the last bits from
# one CPU to another, and the tests' tolerances must hold on every one.
# `make test-isa ISAS=SSE4_2` runs one; "default" is the machine's own.
ISAS ?= SSE4_2 AVX AVX2 default
NOT_NUMERIC := tests/test_bench.py tests/test_cli.py tests/test_examples.py \
	tests/test_packaging.py tests/test_readme.py
NUMERIC_TESTS := $(filter-out $(NOT_NUMERIC),$(sort $(wildcard tests/test_*.py)))

test-isa: $(VENV)/.test-installed
	@set -e; for isa in $(ISAS); do \
	  if [ "$$isa" = default ]; then flags="$$XLA_FLAGS"; \
	  else flags="$$XLA_FLAGS --xla_cpu_max_isa=$$isa"; fi; \
	  echo "== instruction set: $$isa (XLA_FLAGS=$$flags)"; \
	  start=$$(date +%s); \
	  XLA_FLAGS="$$flags" $(BIN)/python -m pytest -n 2 $(NUMERIC_TESTS); \
	  echo "== $$isa: passed in $$(( $$(date +%s) - start )) s"; \
	done

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

demo: $(VENV)/.demo-installed
	$(BIN)/treeopt demo

bench: $(VENV)/.test-installed
	mkdir -p benchmarks/out
	$(BIN)/treeopt bench --json benchmarks/out/cpu.json

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
