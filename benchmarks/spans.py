"""The ``spans`` benchmark: SmolLM2 served by one full worker, then split into routes of
1, 2 and 3 spans (``--layers``), all through the gateway, on this machine.

Each configuration is its own set of processes (workers + gateway), started, measured and
stopped before the next one starts: they never compete for the cores. The workers of a
configuration share the cores between them (``--threads``: cores // workers, at least 1),
so a 3-span route on 2 cores runs three 1-thread workers against a full worker's 2
threads; the table says so.

Per configuration: one warm-up request, then 1 client (``spans_sequential`` requests, one
at a time) and 8 concurrent clients (``spans_requests_per_client`` each); greedy, exactly
``spans_new_tokens`` tokens. Recorded: aggregate tokens/s, median latency per request,
median ms per decode step (from the gateway's ``timing``: (total - first token) / (tokens
- 1)), median ms per decode step of each hop (``timing.hops_ms``) and each worker's
resident memory as its heartbeat reports it (``load.rss_mib``, ``load.model_rss_mib``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from dllm_p2p.localnet import LISTENING, Child, get_json, spawn_worker, start_gateway, wait_online
from dllm_p2p.models import SMOLLM2_MISSING, find_smollm2

from .load import LoadError, open_http, request_body
from .settings import Settings

Progress = Callable[[str], None]

MODEL = "smollm2"
#: SmolLM2-135M's decoder layers.
LAYERS = 30

#: (name, route mode, the layers of each worker; None = a full worker)
CONFIGS: list[tuple[str, str, list[str | None]]] = [
    ("full worker", "full", [None]),
    ("1 span", "spans", ["0:30"]),
    ("2 spans", "spans", ["0:15", "15:30"]),
    ("3 spans", "spans", ["0:10", "10:20", "20:30"]),
]


@dataclass
class _Answer:
    seconds: float
    tokens: int
    step_ms: float | None
    hops_ms: list[float] = field(default_factory=list)
    route: list[dict[str, Any]] | None = None


def run(settings: Settings, progress: Progress) -> dict[str, Any]:
    """The ``spans`` section of the results; ``skipped`` (and why) without SmolLM2."""
    n = settings.spans_new_tokens
    section: dict[str, Any] = {"model": MODEL, "new_tokens": n, "levels": list(settings.spans_levels)}
    if find_smollm2() is None:
        progress(f"spans: skipped: {SMOLLM2_MISSING}")
        return {"skipped": SMOLLM2_MISSING, **section}
    cores = settings.threads or _cores()
    section.update(
        cores=cores,
        sequential=settings.spans_sequential,
        requests_per_client=settings.spans_requests_per_client,
        configs=[],
    )
    body = request_body(settings.prompt, n)
    for name, mode, layers in CONFIGS:
        threads = max(1, cores // len(layers))
        progress(f"spans: {name} ({', '.join(x or 'all layers' for x in layers)}), {threads} thread(s) per worker")
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="dllm-bench-spans-") as tmp:
            net = _Net(Path(tmp), layers, threads, n, settings.verbose)
            try:
                net.start()
                progress(f"  up in {time.perf_counter() - started:.1f} s")
                entry = trio.run(_measure, settings, net.url, {**body, "route": mode}, progress)
                entry["memory"] = net.memory()
            finally:
                net.stop()
        entry.update(name=name, route_mode=mode, workers=[x or f"0:{LAYERS}" for x in layers], threads_per_worker=threads)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        section["configs"].append(entry)
        _check_tokens(entry, n, progress)
    return section


class _Net:
    """The workers of one configuration (the first one bootstraps the others) and a gateway."""

    def __init__(self, root: Path, layers: list[str | None], threads: int, new_tokens: int, verbose: bool) -> None:
        self.root, self.layers, self.threads, self.new_tokens, self.verbose = root, layers, threads, new_tokens, verbose
        self.children: list[Child] = []
        self.workers: list[tuple[str | None, str]] = []  # (layers, peer id)
        self.url = ""

    def start(self) -> None:
        common = [
            "--threads", str(self.threads), "--heartbeat-interval", "1", "--no-mdns",
            "--max-new-tokens", str(max(256, self.new_tokens)), "--max-concurrency", "8",
        ]
        boot: str | None = None
        for i, layers in enumerate(self.layers):
            args = [*(["--layers", layers] if layers else []), *common, *(["--bootstrap", boot] if boot else [])]
            child = spawn_worker(self.root / f"worker-{i}", *args, model=MODEL, name=f"worker-{layers or 'full'}", echo=self.verbose)
            self.children.append(child)
            addr = child.wait_for_line(LISTENING, timeout=300).group(1)
            boot = boot or addr
            self.workers.append((layers, addr.rsplit("/", 1)[1]))
        assert boot is not None
        gateway, self.url = start_gateway(
            self.root / "gateway", "--bootstrap", boot, "--heartbeat-interval", "1", "--no-mdns", echo=self.verbose
        )
        self.children.append(gateway)
        wait_online(self.url, len(self.layers), timeout=300, children=self.children)

    def memory(self, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Each worker's ``rss_mib`` and ``model_rss_mib`` from the gateway's ``/api/nodes``."""
        deadline = time.monotonic() + timeout
        while True:
            rows = {row["peer_id"]: row.get("load") or {} for row in get_json(f"{self.url}/api/nodes")["nodes"]}
            out = [
                {"layers": layers or f"0:{LAYERS}", "full": layers is None, "rss_mib": rows.get(peer, {}).get("rss_mib"),
                 "model_rss_mib": rows.get(peer, {}).get("model_rss_mib")}
                for layers, peer in self.workers
            ]
            if all(x["model_rss_mib"] is not None for x in out) or time.monotonic() > deadline:
                return out
            time.sleep(0.5)

    def stop(self) -> None:
        for child in reversed(self.children):  # gateway first
            child.terminate()
        for child in reversed(self.children):
            child.stop(timeout=15)


async def _measure(settings: Settings, url: str, body: dict[str, Any], progress: Progress) -> dict[str, Any]:
    levels: dict[str, Any] = {}
    async with open_http(url, max(settings.spans_levels), settings.request_timeout) as client:
        warm = await _post(client, body)  # imports, allocator, the streams to every span
        first_route = warm.route
        for level in settings.spans_levels:
            per_client = settings.spans_sequential if level == 1 else settings.spans_requests_per_client
            answers: list[_Answer] = []

            async def one_client() -> None:
                for _ in range(per_client):
                    answers.append(await _post(client, body))

            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(level):
                    nursery.start_soon(one_client)
            wall = time.perf_counter() - started
            levels[str(level)] = summary = _level(level, per_client, wall, answers)
            hops = " / ".join(f"{ms:.1f}" for ms in summary["hops_ms"]) or "-"
            progress(
                f"  {level} client(s): {summary['tokens_per_s']:.1f} tok/s, median latency {summary['median_latency_ms']:.0f} ms, "
                f"{_fmt(summary['step_ms'])} ms/step, per hop {hops} ms"
            )
    return {"route": first_route, "levels": levels}


async def _post(client: httpx.AsyncClient, body: dict[str, Any]) -> _Answer:
    started = time.perf_counter()
    response = await client.post("/api/generate", json=body)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise LoadError(f"{client.base_url} answered {response.status_code}: {response.text[:300]}")
    data = response.json()
    tokens = int(data.get("usage", {}).get("completion_tokens", 0))
    timing = data.get("timing") or {}
    step = None
    if tokens > 1 and timing.get("total_ms") is not None and timing.get("first_token_ms") is not None:
        step = (float(timing["total_ms"]) - float(timing["first_token_ms"])) / (tokens - 1)
    return _Answer(elapsed, tokens, step, [float(x) for x in timing.get("hops_ms") or []], data.get("route"))


def _level(level: int, per_client: int, wall: float, answers: list[_Answer]) -> dict[str, Any]:
    tokens = sum(a.tokens for a in answers)
    width = max((len(a.hops_ms) for a in answers), default=0)
    hops = [_median([a.hops_ms[i] for a in answers if len(a.hops_ms) > i]) for i in range(width)]
    return {
        "clients": level,
        "requests_per_client": per_client,
        "requests": len(answers),
        "completion_tokens": [min(a.tokens for a in answers), max(a.tokens for a in answers)] if answers else None,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "median_latency_ms": round(_median([a.seconds * 1000 for a in answers]) or 0.0, 1),
        "step_ms": _round(_median([a.step_ms for a in answers if a.step_ms is not None])),
        "hops_ms": [round(h, 2) for h in hops if h is not None],
    }


def _check_tokens(entry: dict[str, Any], n: int, progress: Progress) -> None:
    for level, summary in entry["levels"].items():
        counts = summary.get("completion_tokens")
        if counts and counts != [n, n]:
            note = f"{entry['name']}, {level} client(s): answers had {counts[0]}-{counts[1]} tokens, not {n}"
            entry.setdefault("token_mismatch", []).append(note)
            progress(f"spans: warning: {note}")


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
