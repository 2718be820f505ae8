# Two commands on a fresh machine: `make quickstart` (environment + the quickstart pipeline) and `make test`.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)

.PHONY: quickstart test install clean pipelines examples

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "kdpipe: creating $(VENV) and installing kdpipe with torch, torchvision, timm, DVC and ONNX (about 2 min) ..."
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,export,timm]'
	@echo "kdpipe: installed ($$($(BIN)/kdpipe --version))"
	touch $@

quickstart: install
	dvc repro
	dvc metrics show

test: install
	pytest -q -n auto --dist loadgroup

# removes what the pipeline produced (git-ignored files only); tracked files (dvc.lock, committed
# metrics, the folders' .gitignore) stay
clean:
	git clean -fdX -- data models logs metrics plots reports dvc_plots

# the full pipelines' dvc.yaml files: pipelines/stages.yaml, their one definition, written per folder by
# pipelines/render.py (a real file per folder, since DVC reads dvc.yaml from git revisions too, where a link is
# not followed; render adds the model-library files the folder's params name)
PIPELINES := $(wildcard pipelines/*/params.yaml)
pipelines: $(PIPELINES:params.yaml=dvc.yaml)

pipelines/%/dvc.yaml: pipelines/stages.yaml pipelines/%/params.yaml pipelines/render.py
	$(BIN)/python pipelines/render.py $* > $@.tmp && mv $@.tmp $@

# examples/compress is what `kdpipe init` writes (tests/test_project.py fails when it differs): after editing the
# template (kdpipe/project.py, kdpipe/templates/) or any kdpipe file (kdpipe-code.yaml holds their hashes)
examples:
	$(BIN)/python -c 'from pathlib import Path; from kdpipe import project; from tests.test_project import EXAMPLE; \
	  [(Path("examples/compress") / n).write_text(t) for n, t in project.project_files(**EXAMPLE).items()]'
