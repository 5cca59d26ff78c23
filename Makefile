# Two commands set everything up on a fresh machine:
#   make run   - create .venv, install, run the main job on the default data
#   make test  - the same set-up, then the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CUDA_HOME ?= /usr/local/cuda
STAMP := $(VENV)/.installed
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: run test bench sanitize clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

$(STAMP): $(VENV)/.deps $(EXT_SOURCES)
	$(BIN)/pip install -q -e . --no-build-isolation
	touch $@

run: $(STAMP)
	$(BIN)/python -m efcn_sparse demo

test: $(STAMP)
	$(BIN)/python -m pytest tests benchmarks -q

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks/ --benchmark

clean:
	rm -rf build *.egg-info efcn_sparse/_C*.so $(STAMP)
