# forgeline — `make quickstart` runs the whole path; `make test` runs the CPU suite.
# Both set up .venv on first use (torch CPU wheel by default; TORCH=torch for a CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-forgeline
PYTEST_ARGS ?=

.PHONY: setup quickstart test test-fast test-gpu lint bench clean-state

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,deepspeed]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/forgeline quickstart recipes/quickstart.yaml

# The whole CPU suite (what CI runs). GPU tests are marked `gpu` and skip without one.
test: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q -ra $(PYTEST_ARGS)

# Fast loop: unit tests only (seconds).
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -q -x $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu -q -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m bench

clean-state:
	rm -rf $${FORGELINE_HOME:-$$HOME/.forgeline}
