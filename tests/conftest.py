"""Shared test setup: everything runs offline, on 127.0.0.1."""

from __future__ import annotations

import os

# Children inherit these: no test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run several workers and the test process on a 2-core machine: one OpenMP thread
# each, or their spinning thread pools slow everything down many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
