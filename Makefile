# `make train` and `make test` set everything up on a fresh machine:
# a .venv with the pinned, tested versions from constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test check pytest docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,export,web,notebook,tensorboard,tune,docs]'
	touch $(STAMP)

# Extra flags: make train ARGS="--recipe fast --seeds 0-4"
train: $(STAMP)
	$(BIN)/mnist-cnn train $(ARGS)

# Everything CI runs: the checks, then the tests. Extra pytest flags: make test ARGS="-k resume"
test: check pytest

# Lint, formatting, static types and the docs site (a broken link or a missing page fails)
check: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

pytest: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

# The docs site at http://127.0.0.1:8001/ (8000 is mnist-cnn serve's), rebuilt as pages change
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
