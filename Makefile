# Every target creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export NETS_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: run test test-x64 lint gradcheck xor clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m experiments.lecture

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q

test-x64: $(VENV)/.installed
	$(PY) -m pytest -q -m x64

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check nets training experiments tests

gradcheck: $(VENV)/.installed
	$(PY) -m experiments.gradcheck

xor: $(VENV)/.installed
	$(PY) -m experiments.xor_restarts

clean:
	rm -rf $(VENV) *.egg-info runs .pytest_cache
