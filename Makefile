# `make test` and `make run` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the suite runs against for real: the Fashion-MNIST IDX files, Prometheus
# (promtool and a live server for the monitoring test) and docker-compose (`config` checks).
DEB_PACKAGES := dataset-fashion-mnist prometheus docker-compose haproxy wrk
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test run lint format bench clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall when the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[all,test]'
	touch $(STAMP)

# Installs only what is missing, so a machine that has them pays nothing.
system-deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: system-deps $(STAMP) lint
	$(BIN)/python -m pytest -q

# Serves the default models in models/ on http://127.0.0.1:8000 (MONDEQ_* variables apply).
run: $(STAMP)
	$(BIN)/mondeq serve --model-dir models

bench: $(STAMP)
	$(BIN)/mondeq bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
