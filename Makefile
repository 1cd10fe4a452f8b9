# luo-orchestrator: every target builds the virtualenv it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STATE  ?= $(CURDIR)/.state

.PHONY: venv demo test lint e2e bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { \
	  echo "python3-venv is missing; installing it with apt-get"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,fleet]'
	@touch $@

## demo: a whole-host live update on the simulated kernel
demo: venv
	$(VENV)/bin/liveupdate demo

## test: lint, type-check and run the test suite (simulated kernel)
test: venv lint
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## e2e: build the LUO test kernel and run the suite through real kexecs in QEMU
e2e: venv
	$(PY) -m tests.vm.e2e

bench: venv
	$(PY) -m bench

## clean: stop the demo's workloads (left by 'liveupdate demo --keep'), delete what was built
clean:
	@if [ -x $(PY) ] && [ -d $(STATE)/demo/workloads ]; then \
	  $(PY) -m orchestrator.demo.kv --registry $(STATE)/demo/workloads --stop; fi
	rm -rf $(VENV) $(STATE) .mypy_cache .ruff_cache .pytest_cache
