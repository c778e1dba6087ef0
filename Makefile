# Newcomer entry points (see README):
#   make demo   -- create/refresh the cached virtual environment, build, run the demo
#   make demo-text -- the same, then the text testbed (all-MiniLM-L6-v2, seven text experts)
#   make test   -- create/refresh the cached virtual environment, build (CPU + CUDA sources), run the tests
#
# The virtual environment lives outside the clone, keyed by the hash of requirements/base.txt and the
# Python version, so repeated runs on one machine do not reinstall torch (5.5 GB for the CUDA build).
PYTHON      ?= python3
REQ         := requirements/base.txt
REQ_HASH    := $(shell cat $(REQ) | sha256sum | cut -c1-12)
PY_TAG      := $(shell $(PYTHON) -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
CACHE_DIR   ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mergekernels
VENV        ?= $(CACHE_DIR)/venv-$(PY_TAG)-$(REQ_HASH)
VPY         := $(VENV)/bin/python
# Parallel compile jobs for torch's ninja build.
export MAX_JOBS ?= $(shell nproc)

.PHONY: venv build demo demo-text test lint bench clean mergekit-venv

# No prerequisite on $(REQ): its hash is in the directory name, and a fresh clone's mtimes would
# otherwise trigger a reinstall.
$(VENV)/.complete:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip wheel setuptools
	$(VPY) -m pip install -r $(REQ)
	touch $@

venv: $(VENV)/.complete

# --- mergekit oracle (tests/mergekit_oracle.py) -----------------------------------------------------
# mergekit (LGPL) in its own cached virtual environment with a CPU torch, keyed like $(VENV) by the
# hash of requirements/mergekit.txt: tests/test_mergekit_oracle.py runs it as a separate program and
# compares its merges with ours; nothing of it is imported into the project. Its sdist is kept in
# $(MERGEKIT_VENV)/sdist for the tests that read mergekit's example configs (a failed download only
# skips those). `make test` tries to build it but never fails when that fails: the oracle tests skip.
MERGEKIT_REQ      := requirements/mergekit.txt
MERGEKIT_REQ_HASH := $(shell cat $(MERGEKIT_REQ) | sha256sum | cut -c1-12)
MERGEKIT_VENV     ?= $(CACHE_DIR)/mergekit-venv-$(PY_TAG)-$(MERGEKIT_REQ_HASH)
MERGEKIT_VERSION  := $(shell sed -n 's/^mergekit==//p' $(MERGEKIT_REQ))

$(MERGEKIT_VENV)/.complete:
	$(PYTHON) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/python -m pip install --upgrade pip wheel setuptools
	$(MERGEKIT_VENV)/bin/python -m pip install -r $(MERGEKIT_REQ)
	$(MERGEKIT_VENV)/bin/python -m pip download --no-deps --no-binary :all: -d $(MERGEKIT_VENV)/sdist \
		mergekit==$(MERGEKIT_VERSION) || echo "mergekit sdist not downloaded: the example-config tests will skip"
	$(MERGEKIT_VENV)/bin/python -c 'import mergekit.merge, mergekit.scripts.run_yaml'
	touch $@

mergekit-venv: $(MERGEKIT_VENV)/.complete
# --- end mergekit oracle ----------------------------------------------------------------------------

build: venv
	@mkdir -p build
	@echo "building mergekernels._C (MK_CUDA=$${MK_CUDA:-auto}); log in build/build.log"
	@$(VPY) -m pip install --no-build-isolation --no-deps -e . -v > build/build.log 2>&1 \
		|| (tail -n 80 build/build.log; echo "build failed: see build/build.log"; exit 1)
	@$(VPY) -m mergekernels info

demo: build
	$(VPY) -m mergekernels demo

demo-text: build
	$(VPY) -m mergekernels demo --text

test: build
	@$(MAKE) --no-print-directory mergekit-venv \
		|| echo "mergekit oracle environment not built: tests/test_mergekit_oracle.py will skip"
	$(VPY) -m ruff check mergekernels tests benchmarks
	$(VPY) -m pytest

bench: build
	$(VPY) -m mergekernels bench --json benchmarks/bench_cpu.json
	$(VPY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf build *.egg-info mergekernels/_C*.so
