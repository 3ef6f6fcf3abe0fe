# lowbit: `make demo` and `make test` do all the set-up on a fresh machine (Python >= 3.11 with venv).
#
#   make demo   create .venv, install lowbit, fetch the default model and corpus, quantize it with w4a8,
#               then `lowbit compare`: both models' perplexity, and their answers to PROMPT side by side
#   make test   create/update .venv with the dev extras and run the test suite
#
# torch: on CPU machines we install TORCH_SPEC (a CPU wheel is provided there; a bare `torch` from
# PyPI would pull GBs of CUDA packages). Override it, e.g. `make demo TORCH_SPEC=torch`, on a GPU box.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check
PROMPT     ?= Explain in two sentences why quantizing an LLM to 4 bits makes it faster to serve.
DEMO_DIR   ?= .demo/smollm2-135m-w4a8
DEMO_SCHEME  ?= w4a8
DEMO_SAMPLES ?= 64# calibration windows of 512 tokens (the library default is 128)
DEMO_CHUNKS  ?= 16# evaluation windows of 512 tokens (the full held-out split is 140)

.PHONY: demo test install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install only when pyproject.toml changes.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

# llm-compressor (tests/test_llmcompressor_oneshot.py: checkpoints its oneshot writes) pins transformers
# <= 5.17 and compressed-tensors == 0.19, behind this project's; its data-free schemes run beside ours,
# so it is installed without its pins (loguru and nvidia-ml-py are the two needs the dev extras lack).
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llmcompressor==0.14.0.1 loguru nvidia-ml-py
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/lowbit fetch
	$(VENV)/bin/lowbit quantize smollm2-135m --scheme $(DEMO_SCHEME) --samples $(DEMO_SAMPLES) -o $(DEMO_DIR) --overwrite
	$(VENV)/bin/lowbit compare smollm2-135m $(DEMO_DIR) --prompt "$(PROMPT)" --max-new-tokens 96 \
		--max-chunks $(DEMO_CHUNKS)

# Test files run in parallel workers, one file per worker at a time (-n auto: one per core; most of the
# time is Triton's CPU interpreter, one core per process). PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= auto
test: install-dev
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .demo build *.egg-info .pytest_cache
