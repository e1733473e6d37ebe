# dmlkern: `make test` and `make bench` do all set-up on a fresh machine:
# create .venv if missing, install the pinned dependencies, build the extension
# (incrementally), then test or benchmark.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.deps-installed
JOBS ?= 2
# pytest workers (pytest-xdist; 0: one process). Most tests are single-threaded Python (the Triton
# interpreter, small parity cases), so two workers on two cores take ~2/3 of one's time; each
# worker's torch gets its share of the cores (tests/conftest.py).
TEST_WORKERS ?= $(JOBS)
# Without a GPU, Triton kernels run under the interpreter on CPU tensors.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifneq ($(HAS_GPU),1)
export TRITON_INTERPRET ?= 1
endif
export MAX_JOBS ?= $(JOBS)

.PHONY: test bench build deps pytest cmake-test clean help

help:
	@echo "make test   - set up .venv, build, run the whole test suite (pytest + C++ ctest)"
	@echo "make bench  - set up .venv, build, run the default large-batch benchmark sweep"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements.txt | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install -r requirements.txt
	touch $@

deps: $(DEPS_STAMP)

# pip's editable build reuses ./build/temp (see setup.py), so only changed sources recompile.
build: deps
	$(PIP) install --no-build-isolation --no-deps -e .
	$(PY) -c "import dmlkern, json; print(json.dumps(dmlkern.build_info(), indent=1))"

pytest: build
	$(PY) -m pytest tests -ra --durations=15 -n $(TEST_WORKERS) --dist loadgroup

# The libtorch build for C++ users (CMakeLists.txt) and its ctest.
cmake-test: deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ./scripts/cmake_test.sh

test: pytest cmake-test

bench: build
	$(PY) -m dmlkern.bench

clean:
	rm -rf build build-cmake dist *.egg-info dmlkern/*.so
