# forgeline — `make quickstart` runs the whole path; `make test` runs the CPU suite.
# Both set up .venv on first use (torch CPU wheel by default; TORCH=torch for a CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-forgeline
PYTEST_ARGS ?=
EXTRAS ?= dev,deepspeed,postgres,redis,k8s,s3,eval

.PHONY: setup quickstart test test-fast test-gpu test-conformance lint bench clean-state

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/forgeline quickstart recipes/quickstart.yaml

# The whole CPU suite (what CI runs). GPU tests are marked `gpu` and skip without one.
# The slowest tests are listed at the end, so a CI log shows where the suite's time goes.
test: $(STAMP)
	$(PY) -m pytest -m "not gpu" -q -ra --durations=30 $(PYTEST_ARGS)

# Fast loop: unit tests only (seconds).
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -q -x $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu -q -ra $(PYTEST_ARGS)

# Every model family x method x adapter through every stage (~25 min on 2 cores); `make test` runs a subset.
test-conformance: $(STAMP)
	$(PY) -m pytest tests/integration/conformance -m "conformance_full or not conformance_full" -q -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

# The LiteLLM proxy (the gateway comparison) and py-spy (profiles) in their own venv:
# litellm's pins (huggingface_hub, rich) conflict with ours.
BENCH_TOOLS := bench/.venv-litellm/.installed
LITELLM ?= litellm[proxy]==1.108.7

# Benchmarks (~10 min on an idle 2-core machine, ~20 on a busy one): JSON to bench/results/,
# tables and plots to BENCHMARKS.md. BENCH_TIME_SCALE=2 gives a busy machine time for every round.
bench: $(STAMP) $(BENCH_TOOLS)
	$(PY) -m bench

$(BENCH_TOOLS):
	$(PYTHON) -m venv bench/.venv-litellm
	bench/.venv-litellm/bin/pip install -q --upgrade pip
	bench/.venv-litellm/bin/pip install -q "$(LITELLM)" py-spy
	touch $@

clean-state:
	rm -rf $${FORGELINE_HOME:-$$HOME/.forgeline}
