"""200 concurrent requests against a small network: every one answered, none lost.

Bounded in count (200 requests) and time (120 s each), loopback only. The figures are
written to test-artifacts/load.json; docs/RELIABILITY.md quotes a run.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from .procs import LocalNetwork, fast_network

pytestmark = pytest.mark.integration

REQUESTS = 200
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    with fast_network(tmp_path_factory.mktemp("load"), 2, "--max-concurrency", "4", "--max-queue", "8") as network:
        yield network


async def test_200_concurrent_requests_are_all_answered(net: LocalNetwork) -> None:
    pids = {child.name: child.popen.pid for child in net.children}
    peak = {name: rss_mb(pid) for name, pid in pids.items()}
    before = dict(peak)
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    done = trio.Event()

    async def sample_memory() -> None:
        while not done.is_set():
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_mb(pid))
            with trio.move_on_after(0.2):
                await done.wait()

    async def one(http: httpx.AsyncClient, i: int) -> None:
        started = time.perf_counter()
        try:
            with trio.fail_after(120):
                response = await http.post("/api/generate", json={"prompt": f"Request {i}:", "max_new_tokens": 8})
            outcomes[f"{response.status_code} {response.json().get('error', {}).get('code', 'ok')}"] += 1
            latencies.append(time.perf_counter() - started)
        except (trio.TooSlowError, httpx.HTTPError) as exc:
            outcomes[f"lost {type(exc).__name__}"] += 1

    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=net.url, timeout=None, limits=limits) as http:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_memory)
            async with trio.open_nursery() as requests:
                for i in range(REQUESTS):
                    requests.start_soon(one, http, i)
            done.set()
    elapsed = time.perf_counter() - started

    answered = outcomes["200 ok"]
    lost = sum(n for key, n in outcomes.items() if key.startswith("lost"))
    rejected = sum(outcomes.values()) - answered - lost
    latencies.sort()
    report = {
        "requests": REQUESTS,
        "answered": answered,
        "rejected": rejected,
        "lost": lost,
        "outcomes": dict(outcomes),
        "elapsed_s": round(elapsed, 2),
        "latency_p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "latency_max_s": round(latencies[-1], 3) if latencies else None,
        "rss_before_mb": {k: round(v) for k, v in before.items()},
        "rss_peak_mb": {k: round(v) for k, v in peak.items()},
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "load.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))

    assert lost == 0, report
    assert answered + rejected == REQUESTS
    assert set(outcomes) <= {"200 ok", "503 busy", "503 no_live_node"}, report
    assert answered >= 24, report  # at least the two nodes' batch + queue capacity
    for name, mb in peak.items():
        assert mb - before[name] < 500, f"{name} grew by {mb - before[name]:.0f} MB: {report}"
