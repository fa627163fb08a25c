"""The servers a run starts: a one-worker dllm network, the baseline and llama.cpp's
server, all on 127.0.0.1.

``Servers`` owns every child process and stops them all in ``close()``, which the suite
calls from a ``finally`` (so also on Ctrl-C and on errors). Children run in their own
session: a Ctrl-C in the terminal reaches the benchmark only, which stops them in order.
"""

from __future__ import annotations

import re
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dllm_p2p.localnet import Child, LocalNetwork, child_env
from dllm_p2p import memory

Progress = Callable[[str], None]


def offline_env() -> dict[str, str]:
    """The children's environment: never download a model."""
    env = child_env()
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


class Servers:
    def __init__(
        self, progress: Progress, verbose: bool = False, threads: int = 0, backend: str = "auto", quantize: str = "auto"
    ) -> None:
        self.progress = progress
        self.verbose = verbose
        self.threads = threads
        #: The workers' --backend and --quantize.
        self.backend = backend
        self.quantize = quantize
        self._tmp = tempfile.TemporaryDirectory(prefix="dllm-bench-")
        self._networks: dict[str, LocalNetwork] = {}
        self._baselines: dict[str, tuple[Child, str]] = {}
        self._llamacpp: Child | None = None
        #: The command line of the running llama.cpp server, and the last lines it printed.
        self.llamacpp_command: list[str] = []
        self.llamacpp_output = ""

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
                    "--backend", self.backend,
                    *(["--quantize", self.quantize] if self.backend != "torch" else []),
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
            try:
                _wait_ready(f"{url}/healthz", child, 60.0, "baseline server")
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{child.output()}") from None
            self.progress(f"  baseline up in {time.perf_counter() - started:.1f} s at {url}")
        return self._baselines[model][1]

    def stop_baseline(self, model: str) -> None:
        entry = self._baselines.pop(model, None)
        if entry is not None:
            entry[0].stop(timeout=15)

    def worker_pid(self, model: str) -> int | None:
        """The process id of the (only) worker of the network serving ``model``."""
        net = self._networks.get(model)
        for child in net.children if net else []:
            if child.name.startswith("worker") and child.alive():
                return child.popen.pid
        return None

    def worker_engine(self, model: str) -> str | None:
        """What the worker of ``model``'s network said runs its model ("llamacpp, F16 weights, ...")."""
        net = self._networks.get(model)
        for child in net.children if net else []:
            if child.name.startswith("worker"):
                found = re.findall(r"engine: ([^\n]+)", child.output(400))
                if found:
                    return found[-1].strip()
        return None

    def llamacpp(self, python: Path, gguf: Path, threads: int, n_ctx: int = 2048, timeout: float = 180.0) -> str:
        """Start llama.cpp's OpenAI server (llama-cpp-python) on ``gguf``; return its URL.

        ``python -m llama_cpp.server`` on 127.0.0.1 and a free port, ``threads`` threads for
        generation and for prompt processing, a ``n_ctx``-token context. Ready once
        ``GET /v1/models`` answers (polled, at most ``timeout`` seconds). Raises
        ``Unavailable`` if it exits or does not get ready: the suite then skips llama.cpp.
        """
        from .llamacpp import Unavailable  # not at the top: python -m benchmarks.llamacpp

        self.stop_llamacpp()
        started = time.perf_counter()
        self.progress(f"starting llama.cpp's server (llama-cpp-python, {gguf.name}, {threads} threads)")
        for attempt in range(3):  # a free port can be taken between our look and its bind
            port = _free_port()
            args = [
                str(python), "-m", "llama_cpp.server",
                "--model", str(gguf),
                "--host", "127.0.0.1", "--port", str(port),
                "--n_threads", str(threads), "--n_threads_batch", str(threads),
                "--n_ctx", str(n_ctx),
                # Streaming requests would be cut off by the next request otherwise (we send none).
                "--interrupt_requests", "False",
                # Its timings after every request, only when they are echoed.
                "--verbose", str(self.verbose),
            ]
            # Its own venv: none of this project's PYTHONPATH.
            env = {k: v for k, v in offline_env().items() if k != "PYTHONPATH"}
            child = Child(args, name="llama.cpp", env=env, echo=self.verbose)
            self._llamacpp = child
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_ready(f"{url}/v1/models", child, timeout, "llama.cpp's server")
            except RuntimeError as exc:
                child.stop(timeout=15)
                self._llamacpp = None
                self.llamacpp_output = child.output(30)
                if "address already in use" in self.llamacpp_output.lower() and attempt < 2:
                    continue
                raise Unavailable(f"llama.cpp's server did not start: {str(exc).splitlines()[0]}") from None
            self.progress(f"  llama.cpp up in {time.perf_counter() - started:.1f} s at {url}")
            self.llamacpp_command = args
            return url
        raise AssertionError("unreachable")

    def llamacpp_child(self) -> Child | None:
        return self._llamacpp

    def stop_llamacpp(self) -> None:
        child, self._llamacpp = self._llamacpp, None
        if child is not None:
            child.stop(timeout=15)

    def close(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL after 15 s) and remove the data directories."""
        self.stop_llamacpp()
        for model in list(self._baselines):
            self.stop_baseline(model)
        for model in list(self._networks):
            self.stop_network(model)
        self._tmp.cleanup()

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, child: Child, timeout: float, what: str) -> None:
    """Poll ``url`` until it answers 200; RuntimeError if ``child`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{what} exited with {exit_status(child.popen.returncode)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # loopback only
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready within {timeout:g} s")


def exit_status(code: int | None) -> str:
    """An exit code, with the signal's name when a signal ended the process."""
    if code is not None and code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (Illegal instruction: probably built for CPU features this machine lacks)" if name == "SIGILL" else ""
        return f"{name}{hint}"
    return f"exit code {code}"


def proc_memory(pid: int | None) -> dict[str, float] | None:
    """Resident set size now (``VmRSS``) and at its peak (``VmHWM``) of a live process, in MiB."""
    return None if pid is None else memory.proc_memory(pid)
