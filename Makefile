# `make demo` and `make test` work on a fresh machine with Python 3.11 and make.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Exact versions the suite was run with (Python 3.11); `make lock` refreshes it.
LOCK := requirements/lock-py311.txt

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-fast lint bench clean lock docs

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found: set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml $(LOCK)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[test]"
	touch $(STAMP)

# Re-resolve the lock file from setup.cfg's ranges (pip-tools, in its own venv),
# then reinstall and run `make test` before committing it.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet pip-tools
	.venv-lock/bin/pip-compile --quiet --upgrade --extra test --strip-extras \
		--no-emit-index-url --no-emit-find-links --output-file $(LOCK) setup.cfg

demo: $(STAMP)
	$(BIN)/lipdp demo --output-dir runs/demo

# The whole suite, slow statistical tests included, on every core (pytest-xdist;
# each test reseeds itself, so results do not depend on the worker). Exit 5 (no
# test collected) fails. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/ruff check deel_lipdp_ext tests examples benchmarks
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10 -n $(PYTEST_WORKERS) --dist worksteal

# The documentation site (mkdocs + mkdocstrings API reference) into site/;
# tests/test_docs.py builds it too, so a broken reference fails `make test`.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check deel_lipdp_ext tests examples benchmarks
	$(BIN)/ruff format --check deel_lipdp_ext tests examples benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) .venv-lock runs build *.egg-info
