# `make train` and `make test` set everything up on a fresh machine:
# a .venv with the pinned, tested versions from constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,export,web,notebook,tensorboard,tune]'
	touch $(STAMP)

# Extra flags: make train ARGS="--recipe fast --seeds 0-4"
train: $(STAMP)
	$(BIN)/mnist-cnn train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
