"""Shared test setup: everything runs offline, on 127.0.0.1."""

from __future__ import annotations

import os

# Children inherit these: no test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
