# `make demo`: set up and run the main job. `make test`: set up and run every test.
# The environments live outside the checkout, keyed by their pinned requirements, so reruns reuse them.
PYTHON ?= python3
REQ_HASH := $(shell sha256sum requirements-lock.txt | cut -c1-12)
VENV ?= $(HOME)/.cache/beitfast/venv-$(REQ_HASH)
BIN := $(VENV)/bin
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
PYTEST_ARGS ?=
# triton 3.6 (the GPU machines' version) beside the environment's 3.8, for the compile gate only.
TRITON36 ?= $(HOME)/.cache/beitfast/triton-3.6.0
GATE := $(BIN)/python benchmarks/compile_gate.py
# The oldest supported torch (the GPU machines' software: Python 3.12, torch 2.11, triton 3.6), pinned in
# requirements-torch211.txt: the CUDA sources compile against its headers and the compiler tests run on it.
PYTHON312 ?= $(firstword $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.12*/bin/python3.12) python3.12)
OLDEST_HASH := $(shell sha256sum requirements-torch211.txt | cut -c1-12)
OLDEST_VENV ?= $(HOME)/.cache/beitfast/venv-torch211-$(OLDEST_HASH)
# triton 3.6's interpreter (CPU tests only) converts 1-element arrays to scalars, which numpy 2.5 refuses:
# the tests on the oldest torch put numpy 2.3 first on the path. The GPU machines compile the kernels.
OLDEST_NUMPY ?= $(HOME)/.cache/beitfast/numpy-2.3.5-py312
# The stand-in of the GPU machine for `make gpu-preflight`: the same environment, run offline.
STANDIN_VENV ?= $(OLDEST_VENV)
# The newest releases of everything requirements-dev.txt names (`make test-latest`, `make lock`).
LATEST_VENV ?= $(HOME)/.cache/beitfast/venv-latest

.PHONY: env install triton36 oldest test test-oldest test-latest lock demo bench compile-gate \
	compile-report clean

env: $(VENV)/.ready

# The environments are named by the hash of their pins, so a fresh clone (whose files are all newer than
# any .ready) reuses a finished one; an unfinished one, or a stale link, is replaced whole.
$(VENV)/.ready:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $$(grep '^pip==' requirements-lock.txt)
	$(BIN)/pip install --no-deps -r requirements-lock.txt
	$(BIN)/pip check
	touch $@

install: env
	$(BIN)/pip install --no-build-isolation --no-deps -e .

triton36: $(TRITON36)/.ready

$(TRITON36)/.ready: | $(VENV)/.ready
	rm -rf $(TRITON36)
	$(BIN)/pip install -q --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

test: install triton36 test-oldest
	BEITFAST_TRITON36=$(TRITON36) $(BIN)/pytest -n 2 tests $(PYTEST_ARGS)

oldest: $(OLDEST_VENV)/.ready

$(OLDEST_VENV)/.ready:
	rm -rf $(OLDEST_VENV) $(OLDEST_NUMPY)
	$(PYTHON312) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q $$(grep '^pip==' requirements-torch211.txt)
	$(OLDEST_VENV)/bin/pip install -q --no-deps -r requirements-torch211.txt
	$(OLDEST_VENV)/bin/pip check
	$(OLDEST_VENV)/bin/pip install -q --no-deps --target $(OLDEST_NUMPY) numpy==2.3.5
	touch $@

# On the oldest supported torch: the extension (CUDA sources included, one architecture: compile only)
# builds against its headers and loads, and the tests of torch's compiler and op registration pass.
test-oldest: oldest
	BEITFAST_CUDA_ARCHS=90a $(OLDEST_VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	PYTHONPATH=$(OLDEST_NUMPY) $(OLDEST_VENV)/bin/pytest -n 2 -m compiler tests $(PYTEST_ARGS)

# The suite on the newest releases of requirements-dev.txt (torch stays at the pinned build), for
# whoever updates the pins: if it passes, `make lock` writes them to requirements-lock.txt.
test-latest: triton36
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q --upgrade -r requirements-dev.txt
	$(LATEST_VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	BEITFAST_TRITON36=$(TRITON36) $(LATEST_VENV)/bin/pytest -n 2 tests $(PYTEST_ARGS)

lock:
	test -x $(LATEST_VENV)/bin/pip || { echo "run make test-latest first"; exit 2; }
	{ sed -n '1,2p' requirements-lock.txt; $(LATEST_VENV)/bin/pip freeze --all --exclude-editable; } > requirements-lock.txt.new
	mv requirements-lock.txt.new requirements-lock.txt

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

# -- GPU checks (DEVELOPERS.md, "GPU checks") ------------------------------------------------------------
# The peers the GPU machine lacks, as wheels for its Python 3.12, in .whl/ (ignored; the device call
# carries it), with the commit of this checkout (its .git does not travel).
GPU_WHEELS ?= liger-kernel==0.8.5 cut-cross-entropy==25.1.1 torchao==0.18.0
PREFLIGHT ?= /tmp/beitfast-gpu-preflight
# The commit the rows will carry (-dirty: tracked files differ from it), rewritten before every use.
GPU_STAMP = { git rev-parse HEAD | tr -d "\n"; git diff --quiet HEAD || printf -- -dirty; echo; } >.whl/COMMIT
GPU_OUT ?=

.PHONY: gpu-wheels gpu-preflight record-gpu record-cpu

gpu-wheels:
	rm -rf .whl && mkdir .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(GPU_STAMP)
	ls -l .whl

# The whole of gpu_check.sh in CPU mode (benchmarks in --smoke) on the stand-in, offline, in a copy of
# the tree as the device call sends it (the build writes into the tree it builds): run it before
# spending device time. The stand-in's packages reach a venv of its Python through a .pth file, so
# the editable install of the copy leaves the stand-in itself untouched; setup.py looks for the CUDA
# library headers of pip's nvidia wheels in the interpreter's own site-packages, hence the link.
gpu-preflight:
	test -x $(STANDIN_VENV)/bin/python || { echo "STANDIN_VENV=$(STANDIN_VENV): no environment"; exit 2; }
	rm -rf $(PREFLIGHT)/tree $(PREFLIGHT)/out $(PREFLIGHT)/python && mkdir -p $(PREFLIGHT)/tree
	git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - \
		| tar -xf - -C $(PREFLIGHT)/tree
	mkdir -p .whl && $(GPU_STAMP) && cp -r .whl $(PREFLIGHT)/tree/
	$(STANDIN_VENV)/bin/python -m venv --without-pip $(PREFLIGHT)/python
	standin=$$($(STANDIN_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])') && \
		own=$$($(PREFLIGHT)/python/bin/python3 -c 'import site; print(site.getsitepackages()[0])') && \
		echo $$standin > $$own/standin.pth && ln -s $$standin/nvidia $$own/nvidia
	cd $(PREFLIGHT)/tree && unshare -n env -u PYTHONPATH PATH=$(PREFLIGHT)/python/bin:$$PATH \
		OUT=$(PREFLIGHT)/out GPU_CHECK_DRY_RUN=1 GPU_CHECK_WORK=$(PREFLIGHT)/work GPU_CHECK_FRESH=1 \
		bash benchmarks/gpu_check.sh; status=$$?; ls -l $(PREFLIGHT)/out; \
		$(PREFLIGHT)/python/bin/python3 benchmarks/gpu_out.py check $(PREFLIGHT)/out && exit $$status

# After a device call: merge the GPU rows it brought back (GPU_OUT: the folder its files came to) into
# benchmarks/results and regenerate the README's tables from them; commit both.
record-gpu: install
	test -n "$(GPU_OUT)" || { echo "GPU_OUT=<the folder the device call's files came to> is required"; exit 2; }
	$(BIN)/python benchmarks/gpu_out.py record $(GPU_OUT)
	$(BIN)/python benchmarks/make_tables.py

# The genuine CPU benchmarks, recorded on purpose into benchmarks/results (a plain run writes to scratch).
record-cpu: install
	$(BIN)/pytest benchmarks/test_masking_bench.py::test_masking_cpu \
		benchmarks/test_input_bench.py::test_input_paths_cpu benchmarks/test_cpu_step_bench.py \
		--results-dir benchmarks/results
