# `make test` and `make demo` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test install demo

install: $(STAMP)

# Re-install only when setup.py changes.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

DEMO_DIR ?= workdirs/demo

# Tiny MAE pretraining on the embedded photographs, on CPU (a few minutes).
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) train.py --config configs/pretrain.py:tiny --workdir $(DEMO_DIR)
