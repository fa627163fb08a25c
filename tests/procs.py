"""Real dllm processes on 127.0.0.1 for the integration tests (see dllm_p2p.localnet)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dllm_p2p.localnet import Child, LocalNetwork, child_env, get_json, start_gateway, start_worker, wait_online

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Child", "LocalNetwork", "get_json", "run_cli", "start_gateway", "start_worker", "offline_env", "wait_online"]


def offline_env() -> dict[str, str]:
    env = child_env()
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run_cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dllm_p2p", *args],
        cwd=ROOT,
        env=offline_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
