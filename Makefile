# Two commands for a newcomer: `make demo` (the main job, embedded, no extra services)
# and `make test` (lint + the whole test suite). Both set up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-deps openapi clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU wheel; any other torch spec pulls a multi-GB CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,text]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tda demo

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

# reference libraries for benchmarks/: --no-deps so they never replace the pinned CPU torch
bench-deps: install
	$(PIP) install -q --no-deps traker captum
	$(PIP) install -q -e '.[bench]'

bench: bench-deps
	$(PY) benchmarks/engine_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
