"""Across real networks: hosts are Linux network namespaces (tests/netbed.py), a home router
masquerades its LAN and drops whatever it was not asked for, and real worker, relay and
gateway processes run on them."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dllm_p2p.localnet import Child, child_env

from .netbed import Netbed, require_netns

pytestmark = pytest.mark.integration

PY = [sys.executable, "-m"]
FAST = ["--heartbeat-interval", "1", "--pow-bits", "8"]


@pytest.fixture(autouse=True)
def _netns() -> None:
    require_netns()


class Nodes:
    """Real processes on the hosts of a bed, stopped at the end."""

    def __init__(self, bed: Netbed, root: Path) -> None:
        self.bed, self.root, self.children = bed, root, []

    def spawn(self, host: str, *argv: str, name: str) -> Child:
        child = Child(self.bed.prefix(host) + [*PY, *argv], name=name, env=child_env())
        self.children.append(child)
        return child

    def relay(self, host: str, *extra: str) -> str:
        child = self.spawn(host, "dllm_p2p", "relay", "--listen", f"/ip4/{self.bed.addr(host)}/tcp/4001", "--data-dir", str(self.root / host), *FAST, *extra, name=host)
        return child.wait_for_line(rf"^listening on (/ip4/{self.bed.addr(host)}/tcp/4001/p2p/\w+)", timeout=60).group(1)

    def worker(self, host: str, *extra: str) -> tuple[Child, str]:
        child = self.spawn(
            host, "dllm_p2p", "worker", "--model", "tiny", "--listen", "/ip4/0.0.0.0/tcp/4001", "--data-dir", str(self.root / host),
            "--threads", "1", *FAST, *extra, name=host,
        )
        addr = child.wait_for_line(rf"^listening on (/ip4/{self.bed.addr(host)}/tcp/4001/p2p/\w+)", timeout=120).group(1)
        return child, addr.rsplit("/", 1)[1]

    def gateway(self, host: str, *extra: str) -> str:
        child = self.spawn(
            host, "gateway", "--listen", "127.0.0.1:8080", "--p2p-listen", f"/ip4/{self.bed.addr(host)}/tcp/4001",
            "--data-dir", str(self.root / host), *FAST, *extra, name=host,
        )
        child.wait_for_line(r"gateway listening on", timeout=60)
        return f"http://127.0.0.1:{self.bed.forward(host, 8080, '127.0.0.1')}"

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop(timeout=5)

    def output(self) -> str:
        return "\n".join(f"===== {c.name}\n{c.output(40)}" for c in self.children)


@pytest.fixture
def nodes_on(tmp_path: Path) -> Iterator:
    made: list[Nodes] = []

    def make(bed: Netbed) -> Nodes:
        made.append(Nodes(bed, tmp_path))
        return made[-1]

    yield make
    for nodes in made:
        nodes.stop()


def wait_for(condition, timeout: float, what: str, nodes: Nodes):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (httpx.HTTPError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:g} s\n{nodes.output()}")
        time.sleep(0.2)


def node_view(url: str, peer: str) -> dict:
    return {n["peer_id"]: n for n in httpx.get(f"{url}/api/nodes", timeout=5).json()["nodes"]}.get(peer, {})


def test_a_worker_behind_a_home_router_serves_through_a_relay(nodes_on) -> None:  # type: ignore[no-untyped-def]
    with Netbed("switch inet; host relay inet; host gw inet; router home inet; host worker home") as bed:
        nodes = nodes_on(bed)
        relay = nodes.relay("relay")
        worker, peer = nodes.worker("worker", "--bootstrap", relay)
        url = nodes.gateway("gw", "--bootstrap", relay)
        worker.wait_for_line(r"reachability: private", timeout=60, stream="err")
        worker.wait_for_line(r"reachable through relay", timeout=60, stream="err")
        circuit = lambda n: any("/p2p-circuit/p2p/" + peer in a for a in n.get("addrs", []))  # noqa: E731
        wait_for(lambda: (n := node_view(url, peer)).get("online") and n.get("registered") and circuit(n), 60, "the worker's circuit address never reached the gateway", nodes)
        answer = httpx.post(f"{url}/api/generate", json={"prompt": "Hello", "max_new_tokens": 5}, timeout=60)
        assert answer.status_code == 200, answer.text + nodes.output()
        assert answer.json()["node"] == peer
        assert node_view(url, peer)["path"] == "relayed"
        # The record itself (signed, in the registry) carries the circuit address.
        records = lambda: {r["peer_id"]: r for r in httpx.get(f"{url}/api/registry", timeout=5).json()["nodes"]}  # noqa: E731
        wait_for(lambda: circuit(records()[peer]), 30, "the worker's record never carried its circuit address", nodes)
