# `make demo`: set up and run the main job. `make test`: set up and run every test.
# The environment lives outside the checkout, keyed by the requirements, so reruns reuse it.
PYTHON ?= python3
REQ_HASH := $(shell sha256sum requirements-dev.txt | cut -c1-12)
VENV ?= $(HOME)/.cache/beitfast/venv-$(REQ_HASH)
BIN := $(VENV)/bin
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
PYTEST_ARGS ?=
# triton 3.6 (the GPU machines' version) beside the environment's 3.8, for the compile gate only.
TRITON36 ?= $(HOME)/.cache/beitfast/triton-3.6.0
GATE := $(BIN)/python benchmarks/compile_gate.py

.PHONY: env install triton36 test demo bench compile-gate compile-report clean

env: $(VENV)/.ready

$(VENV)/.ready: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -r requirements-dev.txt
	touch $@

install: env
	$(BIN)/pip install --no-build-isolation --no-deps -e .

triton36: $(TRITON36)/.ready

$(TRITON36)/.ready: $(VENV)/.ready
	$(BIN)/pip install -q --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

test: install triton36
	BEITFAST_TRITON36=$(TRITON36) $(BIN)/pytest -n 2 tests $(PYTEST_ARGS)

# The compile gate alone, triton 3.8 then 3.6; reports in benchmarks/results/compile_*.json.
compile-gate: install triton36
	$(GATE) $(GATE_ARGS)
	PYTHONPATH=$(TRITON36) $(GATE) $(GATE_ARGS)

compile-report:
	$(GATE) --report

demo: install
	$(BIN)/beitfast pretrain --demo

bench: install
	$(BIN)/pytest benchmarks

clean:
	rm -rf build *.egg-info beitfast/_C*.so
