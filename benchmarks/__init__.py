"""``python -m benchmarks``: throughput and latency of dllm-p2p, side by side with its yardsticks.

One command measures, in the same run and on the same machine:

* **overhead**: one request at a time through HTTP -> gateway -> libp2p -> worker, against
  ``model.generate`` (and the batching engine) called in this process on the same model;
* **latency**: the milliseconds the network path adds to one request, on the ``tiny`` model
  (where generation itself is cheap, so the overhead is visible);
* **concurrency**: aggregate tokens/s with 1, 4, 8, 16 clients through the gateway;
* **baseline**: the same load against a plain FastAPI server calling a transformers
  ``pipeline`` per request (``benchmarks/baseline_server.py``);
* **limit**: a raw batched greedy loop over the KV cache at the same batch sizes, the most
  this hardware gives with this model and PyTorch;
* **llamacpp**: the same load, on the same GGUF file (SmolLM2-135M-Instruct), against
  dllm-p2p and llama.cpp's server (``llama-cpp-python``, built once in a venv of its own:
  ``benchmarks/llamacpp.py``), and both servers' resident memory.

Every server is a child process bound to 127.0.0.1 and stopped at the end, also on
Ctrl-C or an error. See ``docs/BENCHMARKS.md`` for what is measured and how to read it.
"""

from .cli import main
from .settings import Settings
from .suite import run_suite

__all__ = ["Settings", "main", "run_suite"]
