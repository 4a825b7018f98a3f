# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install the pinned versions (constraints.txt) first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench install

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/adsync demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

test: $(STAMP)
	bash scripts/ensure-services.sh
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/simulator.py
	$(BIN)/python bench/single_account.py
	$(BIN)/python bench/startup.py
