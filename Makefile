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

test: $(STAMP)
	$(PY) -m pytest -q tests

.PHONY: demo test

# The Docker image built and run (tools/docker_check.sh; needs Docker, so not part of `make test`)
docker-check:
	tools/docker_check.sh

.PHONY: docker-check
