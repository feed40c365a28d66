# Two entry points: `make demo` and `make test`. Both build .venv on first use (torch 2.13.0 first,
# so pip never pulls a CUDA build, then the project with its extras) and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,deepspeed]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m megatron_dta demo

# Lint and format are part of the test: a tree that `ruff format` would rewrite does not pass.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q --durations=15 tests

# The developer loop: everything but the tests marked slow (torchrun, kill-and-resume, planning at
# 1024 GPUs): ~3 min on 2 cores against ~16 for `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# The Docker image built and run (tools/docker_check.sh; needs Docker, so not part of `make test`)
docker-check:
	tools/docker_check.sh

.PHONY: demo lint test test-fast docker-check
