# The two commands a new machine needs: `make demo` and `make test`.
# `make demo` keeps stdout for the demo's own output (`make demo | jq .` works): its recipes are
# silent (@) and the one-time set-up reports on stderr.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit clean

$(STAMP): pyproject.toml
	@echo "make: installing xcloudd and its test tools into $(VENV)" >&2
	@$(PYTHON) -m venv $(VENV) >&2
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]' >&2
	@touch $(STAMP)

demo: $(STAMP)
	@$(BIN)/xcloudd demo

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build dist
