# agentledger developer commands. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed


.PHONY: help install kafka browser demo test faults test-cluster bench test-unit test-integration lint format typecheck schemas up down status clean

help: ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-18s\033[0m %s\n", $$1, $$2}'

# constraints.txt pins every dependency to a set known to install and pass together: without it
# pip's resolver gave up ("resolution-too-deep") on a fresh venv once the framework and OTel
# extras joined. Refresh it with `.venv/bin/pip freeze --exclude-editable > constraints.txt`.
$(STAMP): pyproject.toml constraints.txt
	@echo ">> creating $(VENV) and installing agentledger[dev] (editable, pinned by constraints.txt)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check --progress-bar off -q --upgrade pip
	$(BIN)/pip install --disable-pip-version-check --progress-bar off -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv with everything, including .venv/bin/agentledger

kafka: install ## fetch the Kafka broker jars from Maven Central (once, cached)
	$(BIN)/python -c 'from agentledger.deploy import ensure_jars; ensure_jars()'

demo: install kafka ## start the local stack and run the demo workload (runaway agent stopped, then review)
	$(BIN)/agentledger demo

# The dashboard's browser test drives the system chromium through Playwright (never
# `playwright install`, which downloads a browser build of its own).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: ## install Debian's chromium for the dashboard browser test (once)
	@if [ -x /usr/bin/chromium ]; then \
		echo ">> /usr/bin/chromium is installed: $$(/usr/bin/chromium --version 2>/dev/null)"; \
	else \
		echo ">> installing Debian's chromium with apt-get (about 100 MB; progress follows)"; \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; \
	fi

test: install kafka browser ## unit + integration tests against a real broker and embedded ClickHouse
	$(BIN)/pytest

test-unit: install ## unit tests only (no broker)
	$(BIN)/pytest tests/unit

test-integration: install kafka ## integration tests only
	$(BIN)/pytest tests/integration

faults: install kafka ## fault injection: kill -9, broker and ClickHouse outages, rebalance (minutes)
	$(BIN)/pytest tests/faults -m faults -v -s

test-cluster: install kafka ## 3-broker cluster: a broker killed under load, and `up --brokers 3 --processors 2` (minutes)
	AGENTLEDGER_TEST_CLUSTER=1 $(BIN)/pytest tests/integration/test_cluster.py tests/integration/test_cluster_up.py -v

bench: install kafka ## run the benchmarks; writes bench/results.json and prints a table
	$(BIN)/python bench/run.py

lint: install ## read-only checks: ruff, format check, mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p agentledger

format: install ## rewrite files with ruff's fixes and formatter
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

schemas: install ## re-export the JSON Schema files (bump the model's version first)
	$(BIN)/python -c 'from agentledger.schemas.export import write_all; [print(p) for p in write_all()]'

up: install kafka ## start broker, processor and sink in the background
	$(BIN)/agentledger up

down: install ## stop the local stack
	$(BIN)/agentledger down

status: install ## show each component of the local stack
	$(BIN)/agentledger status

clean: ## remove the venv, the local state and caches
	rm -rf $(VENV) .agentledger .mypy_cache .ruff_cache .pytest_cache
