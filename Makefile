# `make demo` and `make test` set everything up on a fresh machine, in .venv.
# The demo installs only what it needs (mae_jax[data,viz]); the tests install
# mae_jax[test], a superset, into the same venv. Each install runs again only
# when setup.py changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_LOG := $(VENV)/pip-install.log
DEMO_DIR ?= workdirs/demo
DEMO_EXTRAS := [data,viz]

.PHONY: help demo test

help:
	@echo "make demo   # install mae_jax[data,viz] in $(VENV), pretrain a tiny MAE on CPU"
	@echo "make test   # install mae_jax[test] (and libtpu apart) in $(VENV), run the test suite"

# pip stays quiet (-q) but keeps a full log; a failed install says where it is.
define pip_install
	@echo "installing mae_jax$(1) into $(VENV) (the first time takes minutes)"
	@$(PY) -m pip install -q --log $(PIP_LOG) -e '.$(1)' \
	  || { echo "pip install -e '.$(1)' failed; full log: $(PIP_LOG)" >&2; exit 1; }
endef

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "mae_jax needs Python >= 3.11; run make PYTHON=python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }
	@$(PY) -m pip install -q --upgrade pip

$(VENV)/.demo-installed: setup.py | $(PY)
	$(call pip_install,$(DEMO_EXTRAS))
	@touch $@

# [test] includes [data,viz], so it also marks the demo's install done.
$(VENV)/.test-installed: setup.py | $(PY)
	$(call pip_install,[test])
	@touch $@ $(VENV)/.demo-installed

# libtpu, for the TPU compile tests (tests/test_tpu_aot.py), in its own folder
# rather than the venv's site-packages: installed there, JAX probes for a TPU
# at every start (seconds, and warnings) even with none present. The version
# is the one jax's own [tpu] extra asks for.
LIBTPU_DIR := $(VENV)/libtpu
LIBTPU_REQ = $$($(PY) -c 'import importlib.metadata as m; print(next(r.split(";")[0] for r in m.requires("jax") if r.startswith("libtpu")))')

$(LIBTPU_DIR)/.installed: $(VENV)/.test-installed
	@echo "installing libtpu into $(LIBTPU_DIR) (compiles for TPU in the tests)"
	@$(PY) -m pip install -q --log $(PIP_LOG) --no-deps --upgrade --target $(LIBTPU_DIR) "$(LIBTPU_REQ)" \
	  || { echo "pip install libtpu failed; full log: $(PIP_LOG)" >&2; exit 1; }
	@mkdir -p $(LIBTPU_DIR) && touch $@

# Two pytest-xdist workers, each taking whole files (a module's fixtures
# are built once): one process leaves much of a second core idle.
# TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2

test: $(VENV)/.test-installed $(LIBTPU_DIR)/.installed
	TPU_LIBRARY_PATH=$(CURDIR)/$(LIBTPU_DIR)/libtpu/libtpu.so $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Tiny MAE pretraining on the embedded photographs, on CPU (minutes).
demo: $(VENV)/.demo-installed
	JAX_PLATFORMS=cpu $(PY) train.py --config configs/pretrain.py:tiny --workdir $(DEMO_DIR)
