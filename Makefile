# `make demo`: set up and run the main job. `make test`: set up and run every test.
# The environment lives outside the checkout, keyed by the requirements, so reruns reuse it.
PYTHON ?= python3
REQ_HASH := $(shell sha256sum requirements-dev.txt | cut -c1-12)
VENV ?= $(HOME)/.cache/beitfast/venv-$(REQ_HASH)
BIN := $(VENV)/bin
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
PYTEST_ARGS ?=

.PHONY: env install test demo bench clean

env: $(VENV)/.ready

$(VENV)/.ready: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -r requirements-dev.txt
	touch $@

install: env
	$(BIN)/pip install --no-build-isolation --no-deps -e .

test: install
	$(BIN)/pytest -n 2 tests $(PYTEST_ARGS)

demo: install
	$(BIN)/beitfast pretrain --demo

bench: install
	$(BIN)/pytest benchmarks

clean:
	rm -rf build *.egg-info beitfast/_C*.so
