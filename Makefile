# Two commands set up a fresh machine: `make matrix` runs the CI matrix, `make test` the tests.
VENV := .venv
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: venv serving-env matrix test lint format typecheck
venv:
	@scripts/setup-venv

# The pinned environment of each serving engine the CPU cells use (matrix/serving/, .gate/; cached), and
# verl's, whose config the memory cells take (matrix/frameworks/verl.toml).
serving-env: venv
	$(PY) -m compat.serving vllm cpu
	$(PY) -m compat.serving.frameworks verl --answers

matrix: venv serving-env
	$(PY) -m compat run --matrix matrix/ci.toml --jobs $(JOBS) --output results.json

test: venv serving-env typecheck
	$(PY) -m ruff check compat tests conftest.py examples
	$(PY) -m pytest -n $(JOBS) --dist loadgroup --compat-results results.json --compat-fuzz ci
	cd examples/downstream && ../../$(PY) -m pytest -n $(JOBS) -p no:cacheprovider
	$(PY) examples/verl/run --jobs $(JOBS)

# mypy over compat/ ([tool.mypy] in pyproject.toml; pinned in requirements/cpu.lock).
typecheck: venv
	$(PY) -m mypy

lint: venv
	$(PY) -m ruff check compat tests conftest.py examples
	$(PY) -m ruff format --check compat tests conftest.py examples

format: venv
	$(PY) -m ruff format compat tests conftest.py examples
	$(PY) -m ruff check --fix compat tests conftest.py examples
