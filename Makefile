# moeplex: `make serve` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# One stamp per need: `serve` installs what serving needs once, `test` adds its extras once.
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP := $(VENV)/.installed-test
# The CPU build of torch lies on local disk; pinning it first keeps pip from pulling
# a multi-GB CUDA build when the package's looser `torch>=2.11` is resolved.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=
# Options of the app as key=value, e.g. make serve ARGS="max_loras=8 device=cpu";
# `python -m deployments --help` lists them.
ARGS ?=

.PHONY: setup setup-test serve test test-gpu clean

setup: $(SERVE_STAMP)

setup-test: $(TEST_STAMP)

$(SERVE_STAMP): pyproject.toml
	@echo "==> [1/3] virtual environment $(VENV) and a current pip"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@echo "==> [2/3] $(TORCH_CPU), CPU build (~190 MB download, ~750 MB installed)"
	$(PIP) install $(TORCH_CPU)
	@echo "==> [3/3] moeplex and what serving needs: ray[serve], transformers, triton, boto3 ..."
	@echo "    (~2 GB installed, triton alone ~1 GB; a few minutes on a fresh machine)"
	$(PIP) install -e .
	touch $@

$(TEST_STAMP): $(SERVE_STAMP)
	@echo "==> test and benchmark extras: pytest, peft, moto, openai, httpx, psutil (~200 MB)"
	$(PIP) install -e '.[test,bench]'
	touch $@

# The options are checked first (a second, no Ray): a typo is one line, not a traceback.
serve: $(SERVE_STAMP)
	$(PY) -m deployments --check $(ARGS)
	$(VENV)/bin/serve run deployments.app:build_app $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-gpu: $(TEST_STAMP)
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
