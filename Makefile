# The two commands: `make demo` runs the pipeline on the demo data, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: $(VENV)/.installed
	$(BIN)/python -m pytest

clean-demo:
	rm -rf data/demo models/tiny features runs
