# moeplex: `make serve` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The CPU build of torch lies on local disk; pinning it first keeps pip from pulling
# a multi-GB CUDA build when the package's looser `torch>=2.11` is resolved.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup serve test test-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e '.[test,bench]'
	touch $(STAMP)

serve: setup
	$(VENV)/bin/serve run deployments.app:build_app

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
