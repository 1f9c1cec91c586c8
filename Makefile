# `make test` and `make run` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test run lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall when the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

run: $(STAMP)
	@echo "make run: the HTTP service is not built yet (see the service issue)."
	@echo "Meanwhile: $(BIN)/mondeq --help"
	@exit 1

bench: $(STAMP)
	$(BIN)/mondeq bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
