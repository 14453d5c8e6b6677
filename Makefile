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

# Stage commands (msvse-*) run from the venv, so it goes first on PATH. The last step
# scores the saved test predictions again, as a table (runs/demo/metrics.json has them
# all, reports/ has the pictures).
demo: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@echo "Test scores of the best checkpoint (runs/demo/predictions/test.txt):"
	@$(BIN)/msvse-eval data/demo/test.txt runs/demo/predictions/test.txt

test: $(VENV)/.installed
	$(BIN)/python -m pytest

clean-demo:
	rm -rf data/demo models/tiny features runs reports
