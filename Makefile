# Outgate: two commands on a fresh machine.
#   make run   - create .venv, install, start the proxy on the embedded default config
#   make test  - install test dependencies, run lint, types and the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Installs are redone only when pyproject.toml changes.
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
ARGS ?=

.PHONY: run test lint typecheck pytest install install-test clean fuzz

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@command -v curl >/dev/null || (apt-get update -qq && apt-get install -y -qq curl)
	@command -v unshare >/dev/null && command -v ip >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq util-linux iproute2)
	touch $(RUN_STAMP) $@

install: $(RUN_STAMP)
install-test: $(TEST_STAMP)

run: $(RUN_STAMP)
	$(BIN)/outgate run $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests

typecheck: $(TEST_STAMP)
	$(BIN)/mypy --strict proxy

pytest: $(TEST_STAMP)
	$(BIN)/python -m pytest $(ARGS)

test: lint typecheck pytest

# The property tests of tests/fuzz with a long budget (make test runs them briefly).
fuzz: $(TEST_STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/fuzz -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
