# The two commands: `make demo` runs the pipeline on the demo data, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# Scratch venv of `make lock`, removed when the lock is written.
LOCK_VENV := .venv-lock

.PHONY: demo test install lock clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The exact versions of requirements.lock, so a fresh clone gets the set the tests passed
# on even after a new release upstream. -c (not -r): the lock only pins what pyproject
# pulls in, so the CUDA wheels it lists are ignored where torch does not need them. A
# refreshed lock reinstalls.
$(VENV)/.installed: $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[test]'
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

# Refreshes requirements.lock: a fresh venv without the lock gets the newest versions
# pyproject's ranges allow, and its freeze becomes the lock. Then `make test` (which
# reinstalls .venv from the new lock) and commit the lock if it passes.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet -e '.[test]'
	{ echo "# Exact versions of everything \`pip install -e '.[test]'\` installs, tested by \`make test\`."; \
	  echo "# Made by \`make lock\`: pip freeze --exclude-editable of a fresh venv without this lock"; \
	  echo "# (the newest versions pyproject.toml allows), on $$($(LOCK_VENV)/bin/python -c 'import platform as p; print(p.python_implementation(), p.python_version(), p.system(), p.machine())')."; \
	  echo "# Install with: pip install -c requirements.lock -e '.[test]'   (make install does)"; \
	  echo "# Refresh: make lock, then make test, then commit this file."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable; } > $(LOCK_VENV)/lock.txt
	mv $(LOCK_VENV)/lock.txt $(LOCK)
	rm -rf $(LOCK_VENV)

clean-demo:
	rm -rf data/demo models/tiny features runs reports
