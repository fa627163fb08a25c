"""Shared test setup: everything runs offline, on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from .browser import chromium, skip_unless_browser

# Children inherit these: no test may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run several workers and the test process on a 2-core machine: one OpenMP thread
# each, or their spinning thread pools slow everything down many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module (skipped where there is none)."""
    skip_unless_browser()
    with chromium() as b:
        yield b
