# Two commands set up a fresh machine: `make matrix` runs the CI matrix, `make test` the tests.
VENV := .venv
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: venv matrix test lint format
venv:
	@scripts/setup-venv

matrix: venv
	$(PY) -m compat run --matrix matrix/ci.toml --jobs $(JOBS) --output results.json

test: venv
	$(PY) -m ruff check compat tests conftest.py examples
	$(PY) -m pytest -n $(JOBS) --dist loadgroup --compat-results results.json --compat-fuzz ci
	cd examples/downstream && ../../$(PY) -m pytest -n $(JOBS) -p no:cacheprovider

lint: venv
	$(PY) -m ruff check compat tests conftest.py examples
	$(PY) -m ruff format --check compat tests conftest.py examples

format: venv
	$(PY) -m ruff format compat tests conftest.py examples
	$(PY) -m ruff check --fix compat tests conftest.py examples
