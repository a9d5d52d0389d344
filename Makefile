# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch that lies on this disk; with it installed, `torch>=2.4` adds nothing.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv install install-test demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

install: $(PY)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[plot]'

install-test: install
	$(PIP) install -q -e '.[test]'

demo: install
	$(VENV)/bin/distill demo

test: install-test
	$(VENV)/bin/ruff check --select F,E9 src tests benchmarks recipes
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
