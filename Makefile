# Two commands on a fresh machine: `make quickstart` (environment + the quickstart pipeline) and `make test`.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: quickstart test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

quickstart: install
	dvc repro
	dvc metrics show

test: install
	pytest -q

clean:
	rm -rf data models logs metrics plots reports dvc.lock
