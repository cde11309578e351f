# edgefleet: `make demo` and `make test` do all set-up on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLM_STAMP := $(VENV)/.installed-llm

.PHONY: demo test lint bench deb clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# llama-cpp-python compiles llama.cpp (about 10 minutes on 2 cores the first time; pip
# caches the wheel). The demo does not need it; the tests do. On x86_64 it is built
# without AMX: where a CPU reports AMX that the host does not let processes use (seen on
# these CI machines), llama.cpp's AMX kernels crash on every Q8_0/Q4 model (no AMX
# tiles, no AMX int8 or bf16). pip's cached wheel is the one built with these flags.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16
LLM_CMAKE_ARGS := -DCMAKE_C_FLAGS=$(NO_AMX) -DCMAKE_CXX_FLAGS=$(NO_AMX)
endif

$(LLM_STAMP): $(STAMP)
	@echo "installing llama-cpp-python (first build compiles llama.cpp: ~10 min)"
	CMAKE_ARGS="$(LLM_CMAKE_ARGS)" $(BIN)/pip install --quiet -e '.[llm]'
	touch $(LLM_STAMP)

demo: $(STAMP)
	$(BIN)/edgefleet demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: $(LLM_STAMP) lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/distribute.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/registry.py
	$(BIN)/python bench/serving.py

# The agent's Debian package (dist/edgefleet-agent_<version>_<arch>.deb), see packaging/.
DIST ?= dist
deb:
	LLM=$(LLM) CMAKE_ARGS="$(LLM_CMAKE_ARGS)" sh packaging/build-deb.sh $(DIST)

clean:
	rm -rf $(VENV) .edgefleet .pytest_cache .mypy_cache .ruff_cache
