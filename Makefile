# Quick start: `make demo` and `make test`; both bootstrap .venv from nothing (pip only).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# `make demo` needs only the package itself (no TensorFlow, test or plotting extras): a faster
# bootstrap on a fresh machine; `make test` adds the extras.
DEMO_STAMP := $(VENV)/.demo-stamp
EXTRAS := dev,tfds,fedjax,tensorboard,report
DATA ?= data
# Pytest workers: the suite is compile-bound, two processes use both cores.
TEST_WORKERS ?= 2

.PHONY: demo test venv bench clean

venv: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/fedprune demo --data $(DATA) --workdir runs/demo

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

bench: $(STAMP)
	$(VENV)/bin/fedprune bench step
	$(VENV)/bin/fedprune bench prune
	$(VENV)/bin/fedprune bench engine

clean:
	rm -rf $(VENV) runs build *.egg-info
