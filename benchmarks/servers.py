"""The servers a run starts: a one-worker dllm network and the baseline, all on 127.0.0.1.

``Servers`` owns every child process and stops them all in ``close()``, which the suite
calls from a ``finally`` (so also on Ctrl-C and on errors). Children run in their own
session: a Ctrl-C in the terminal reaches the benchmark only, which stops them in order.
"""

from __future__ import annotations

import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dllm_p2p.localnet import Child, LocalNetwork, child_env

Progress = Callable[[str], None]


def offline_env() -> dict[str, str]:
    """The children's environment: never download a model."""
    env = child_env()
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


class Servers:
    def __init__(self, progress: Progress, verbose: bool = False, threads: int = 0) -> None:
        self.progress = progress
        self.verbose = verbose
        self.threads = threads
        self._tmp = tempfile.TemporaryDirectory(prefix="dllm-bench-")
        self._networks: dict[str, LocalNetwork] = {}
        self._baselines: dict[str, tuple[Child, str]] = {}

    def network(self, model: str, max_concurrency: int, max_new_tokens: int) -> str:
        """The gateway URL of a running one-worker network serving ``model`` (started once)."""
        if model not in self._networks:
            started = time.perf_counter()
            self.progress(f"starting a local network: 1 worker ({model}, --max-concurrency {max_concurrency}) + gateway")
            data_dir = Path(self._tmp.name) / f"net-{len(self._networks)}"
            net = LocalNetwork(
                data_dir=data_dir,
                workers=1,
                model=model,
                worker_args=[
                    "--max-concurrency", str(max_concurrency),
                    "--max-queue", str(max(64, 4 * max_concurrency)),
                    "--max-new-tokens", str(max(256, max_new_tokens)),
                    *(["--threads", str(self.threads)] if self.threads else []),
                ],
                echo=self.verbose,
            )
            self._networks[model] = net  # registered first: close() stops a half-started network too
            net.start(progress=lambda msg: self.progress(f"  {msg}"))
            self.progress(f"  network up in {time.perf_counter() - started:.1f} s at {net.url}")
        return self._networks[model].url

    def stop_network(self, model: str) -> None:
        net = self._networks.pop(model, None)
        if net is not None:
            net.stop()

    def baseline(self, model: str) -> str:
        """The URL of a running baseline server for ``model`` (started once)."""
        if model not in self._baselines:
            started = time.perf_counter()
            self.progress(f"starting the baseline server (FastAPI + transformers pipeline, {model})")
            args = [sys.executable, "-m", "benchmarks.baseline_server", "--model", model, "--listen", "127.0.0.1:0"]
            if self.threads:
                args += ["--threads", str(self.threads)]
            child = Child(args, name="baseline", env=offline_env(), echo=self.verbose)
            self._baselines[model] = (child, "")
            url = child.wait_for_line(r"baseline listening on (http://127\.0\.0\.1:\d+)", timeout=300).group(1)
            self._baselines[model] = (child, url)
            _wait_healthy(url, child)
            self.progress(f"  baseline up in {time.perf_counter() - started:.1f} s at {url}")
        return self._baselines[model][1]

    def close(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL after 15 s) and remove the data directories."""
        for model in list(self._baselines):
            child, _ = self._baselines.pop(model)
            child.stop(timeout=15)
        for model in list(self._networks):
            self.stop_network(model)
        self._tmp.cleanup()

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_healthy(url: str, child: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"baseline server exited with {child.popen.returncode}\n{child.output()}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:  # loopback only
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"baseline server not healthy within {timeout:g} s\n{child.output()}")
