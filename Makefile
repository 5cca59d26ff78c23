# Two commands set everything up on a fresh machine:
#   make run   - create .venv, install, run the main job on the default data
#   make test  - the same set-up, then the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CUDA_HOME ?= /usr/local/cuda
STAMP := $(VENV)/.installed
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: run data test bench sanitize mutants clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

$(STAMP): $(VENV)/.deps $(EXT_SOURCES)
	$(BIN)/pip install -q -e . --no-build-isolation
	touch $@

# Fashion-MNIST for `make run`: the Debian package dataset-fashion-mnist (idx files in
# /usr/share/datasets/fashion-mnist); without root its files are extracted into data/fashion-mnist.
FMNIST_SYS := /usr/share/datasets/fashion-mnist
FMNIST_LOCAL := data/fashion-mnist
# The quick default of `make run`: 2000/1000 Fashion-MNIST examples, the paper's small CNN at width
# 16, T = 10 epochs, relax times 0,1,3,5,10, 5 seeds (error bars, and a claims table that can decide
# at n = 5); about 6 minutes on one core of an idle 2-core CPU with the C++ backend (about a minute
# per seed). THREADS=1 is robust when other jobs share the cores (competing OpenMP threads slow
# small ops 5-10x); use THREADS=2 on an idle machine.
RUN_DIR ?= runs/fashion-mnist-quick
THREADS ?= 1
RELAX_ARGS ?= --dataset fashion-mnist --model skinny --width 16 --train-size 2000 --test-size 1000 \
	--epochs 10 --relax-times 0,1,3,5,10 --batch-size 50 --lr 0.03 --lr-schedule cosine --momentum 0.9 \
	--n-seeds 5

data:
	@if [ -f $(FMNIST_SYS)/t10k-labels-idx1-ubyte.gz ] || [ -f $(FMNIST_LOCAL)/t10k-labels-idx1-ubyte.gz ]; then \
		echo "Fashion-MNIST: found"; \
	elif [ "$$(id -u)" = 0 ] && [ -z "$(DATA_NO_ROOT)" ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }; \
	else \
		set -e; rm -rf data/.deb; mkdir -p data/.deb $(FMNIST_LOCAL); \
		(cd data/.deb && apt-get download dataset-fashion-mnist) || { echo "apt-get download failed: ask \
an administrator for 'apt-get update', or put the four idx .gz files into $(FMNIST_LOCAL)"; exit 1; }; \
		dpkg-deb -x data/.deb/dataset-fashion-mnist_*.deb data/.deb/root; \
		cp data/.deb/root/usr/share/datasets/fashion-mnist/*.gz $(FMNIST_LOCAL)/; rm -rf data/.deb; \
		echo "Fashion-MNIST extracted into $(FMNIST_LOCAL)"; \
	fi

run: $(STAMP) data
	$(BIN)/efcn relax $(RELAX_ARGS) --threads $(THREADS) --out $(RUN_DIR) --resume

# Optional paths the suite must exercise: a test that would skip for lack of one fails instead
# (tests/conftest.py; TESTING.md). `make test REQUIRE=` only skips, on a machine without them.
REQUIRE ?= triton,triton-compiler,cpu-ext,cuda-emulator,fashion-mnist

test: $(STAMP) data
	EFCN_REQUIRE=$(REQUIRE) $(BIN)/python -m pytest tests benchmarks -q

# Plants each known kind of bug in a temporary copy and checks the tests catch it (minutes; not CI).
mutants: $(STAMP) data
	EFCN_REQUIRE=$(REQUIRE) $(BIN)/python tests/mutations.py $(MUTANTS_ARGS)

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks/ --benchmark
	$(BIN)/python benchmarks/report.py

# AddressSanitizer + UBSan: builds the CPU extension into $(SAN)/ (the in-place build is left
# alone), copies the package there around it, and runs the CPU op tests against that copy.
# Python is not instrumented, so the ASan runtime is preloaded; leak checks are off (CPython);
# --capture=sys lets a sanitizer report reach the terminal before the abort;
# SAN_TESTS picks the tests. CI: `make sanitize` (about 3 minutes on 2 cores, build included).
SAN := build/sanitize
# libstdc++ is preloaded too: ASan must see it at start-up to intercept __cxa_throw.
SAN_ENV := PYTHONPATH=$(CURDIR)/$(SAN)/pkg \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
SAN_TESTS ?= tests/test_cpu_backend.py tests/test_cpu_isa.py tests/test_cpu_bf16.py tests/test_bias_grad.py

sanitize: $(VENV)/.deps
	rm -rf $(SAN)/pkg $(SAN)/lib
	EFCN_SANITIZE=1 EFCN_NO_CUDA=1 $(BIN)/python setup.py -q build_ext --build-lib $(SAN)/lib --build-temp $(SAN)/tmp
	mkdir -p $(SAN)/pkg && cp -r efcn_sparse $(SAN)/pkg/ && rm -f $(SAN)/pkg/efcn_sparse/_C*.so
	cp $(SAN)/lib/efcn_sparse/_C*.so $(SAN)/pkg/efcn_sparse/
	cd $(SAN) && $(SAN_ENV) $(CURDIR)/$(BIN)/python -c "import efcn_sparse._C as c; assert '$(SAN)/pkg' in c.__file__, c.__file__"
	$(SAN_ENV) $(BIN)/pytest -q -p no:cacheprovider --capture=sys $(SAN_TESTS)

clean:
	rm -rf build *.egg-info efcn_sparse/_C*.so $(STAMP)
