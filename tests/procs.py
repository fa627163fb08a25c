"""Real dllm processes on 127.0.0.1 for the integration tests (see dllm_p2p.localnet)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dllm_p2p.localnet import Child, LocalNetwork, child_env, get_json, start_gateway, start_worker, wait_online

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["Child", "LocalNetwork", "fast_network", "get_json", "run_cli", "start_gateway", "start_worker", "offline_env", "wait_for", "wait_online"]

#: Heartbeat interval of ``fast_network``'s nodes, in seconds; a node then counts as
#: offline 4 s (3 intervals + 1) after its last heartbeat.
HEARTBEAT = "1"
TTL = 4.0


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` every 0.1 s until it returns something true, and return that;
    fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


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


def fast_network(data_dir: Path, workers: int, *worker_args: str, worker_env: dict[str, str] | None = None) -> LocalNetwork:
    """A ``tiny`` network whose workers and gateway beat every second; use it with ``with``."""
    return LocalNetwork(
        data_dir=data_dir,
        workers=workers,
        model="tiny",
        worker_args=["--heartbeat-interval", HEARTBEAT, *worker_args],
        gateway_args=["--heartbeat-interval", HEARTBEAT],
        worker_env=worker_env or {},
    )


def spawn_worker_with_layers(
    data_dir: Path, layers: str | None, *extra: str, name: str, env: dict[str, str] | None = None
) -> tuple[Child, str]:
    """A SmolLM2 worker holding ``layers`` (``None``: the whole model); returns it once it listens."""
    from dllm_p2p.localnet import LISTENING, spawn_worker

    args = [*(["--layers", layers] if layers else []), *extra]
    child = spawn_worker(data_dir, *args, model="smollm2", name=name, env=env)
    return child, child.wait_for_line(LISTENING, timeout=300).group(1)
