"""Across real networks: hosts are Linux network namespaces (tests/netbed.py), a home router
masquerades its LAN and drops whatever it was not asked for, and real worker, relay and
gateway processes run on them."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dllm_p2p.localnet import Child, child_env

from .netbed import Netbed, require_netns

pytestmark = pytest.mark.integration

PY = [sys.executable, "-m"]
FAST = ["--heartbeat-interval", "1"]


@pytest.fixture(autouse=True)
def _netns() -> None:
    require_netns()


class Nodes:
    """Real processes on the hosts of a bed, stopped at the end."""

    def __init__(self, bed: Netbed, root: Path) -> None:
        self.bed, self.root, self.children = bed, root, []

    def spawn(self, host: str, *argv: str, name: str, env: dict[str, str] | None = None) -> Child:
        child = Child(self.bed.prefix(host) + [*PY, *argv], name=name, env={**child_env(), **(env or {})})
        self.children.append(child)
        return child

    def relay(self, host: str, *extra: str) -> str:
        child = self.spawn(host, "dllm_p2p", "relay", "--listen", f"/ip4/{self.bed.addr(host)}/tcp/4001", "--data-dir", str(self.root / host), *FAST, *extra, name=host)
        return child.wait_for_line(rf"^listening on (/ip4/{self.bed.addr(host)}/tcp/4001/p2p/\w+)", timeout=60).group(1)

    def worker(self, host: str, *extra: str, env: dict[str, str] | None = None) -> tuple[Child, str]:
        child = self.spawn(
            host, "dllm_p2p", "worker", "--model", "tiny", "--listen", "/ip4/0.0.0.0/tcp/4001", "--data-dir", str(self.root / host),
            "--threads", "1", *FAST, *extra, name=host, env=env,
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
        # Without --no-hole-punch the worker would soon dial the public gateway directly
        # (DCUtR's connection reversal: the next test); here it stays relayed.
        worker, peer = nodes.worker("worker", "--bootstrap", relay, "--no-hole-punch")
        url = nodes.gateway("gw", "--bootstrap", relay, "--no-hole-punch")
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


def test_a_worker_reserves_again_when_its_relay_comes_back(nodes_on) -> None:  # type: ignore[no-untyped-def]
    """The only relay of a worker behind a home router restarts (same key, same
    address): the worker notices the reservation is gone, makes a new one, and the
    gateway reaches it again."""
    with Netbed("switch inet; host relay inet; host gw inet; router home inet; host worker home") as bed:
        nodes = nodes_on(bed)
        relay = nodes.relay("relay")
        relay_child = nodes.children[-1]
        worker, peer = nodes.worker("worker", "--bootstrap", relay, "--no-hole-punch")
        url = nodes.gateway("gw", "--bootstrap", relay, "--no-hole-punch")
        worker.wait_for_line(r"reachable through relay", timeout=60, stream="err")
        served = lambda: httpx.post(f"{url}/api/generate", json={"prompt": "Hello", "max_new_tokens": 3}, timeout=60)  # noqa: E731
        wait_for(lambda: node_view(url, peer).get("online") and served().status_code == 200, 60, "the worker never served through the relay", nodes)

        relay_child.stop(timeout=10)
        worker.wait_for_line(r"lost the reservation", timeout=60, stream="err")
        assert nodes.relay("relay") == relay  # same key, same address
        reserved = lambda: sum("reachable through relay" in line for line in list(worker.stderr)) >= 2  # noqa: E731
        wait_for(reserved, 90, "the worker never reserved again on the restarted relay", nodes)
        # Served through the relay, or over a connection the worker itself dialed out to
        # the gateway meanwhile (its router lets that through): either is reachable.
        wait_for(lambda: served().status_code == 200, 60, "the gateway never reached the worker again", nodes)


def test_three_nodes_on_one_lan_find_each_other_without_bootstrap(nodes_on) -> None:  # type: ignore[no-untyped-def]
    with Netbed("lan home; host a home; host b home; host c home; host d home") as bed:
        nodes = nodes_on(bed)
        _, a = nodes.worker("a")
        _, b = nodes.worker("b")
        started = time.monotonic()
        url = nodes.gateway("c")  # neither --bootstrap nor --registry: it waits for peers
        wait_for(lambda: all(node_view(url, p).get("online") and node_view(url, p).get("registered") for p in (a, b)), 30, "the gateway never saw both workers", nodes)
        answer = httpx.post(f"{url}/api/generate", json={"prompt": "Hello", "max_new_tokens": 4}, timeout=60)
        assert answer.status_code == 200 and answer.json()["node"] in (a, b), answer.text
        # `nodes` on a fourth host, with no address at all, lists the three of them.
        listing = nodes.bed.run("d", [*PY, "dllm_p2p", "nodes", "--json", "--wait", "8"], env=child_env(), timeout=60)
        rows = {r["peer_id"]: r for r in __import__("json").loads(listing.stdout)}
        online = {p for p, r in rows.items() if r["online"]}
        assert {a, b} <= online and sum(r["role"] == "gateway" for r in rows.values() if r["online"]) == 1, listing.stdout + listing.stderr
        assert time.monotonic() - started < 60


def chain_head(data_dir: Path) -> str | None:
    from dllm_p2p.registry.store import load_chain

    try:
        return load_chain(data_dir / "blockchain.json", clamp=True).head
    except Exception:
        return None


def test_a_partition_heals_into_one_registry_and_requests_go_to_the_reachable_side(nodes_on) -> None:  # type: ignore[no-untyped-def]
    """Five hosts on two switches joined by a cable. The cable is pulled: the gateway's
    side keeps answering, the other side's registry changes (a worker joins there); the
    cable is put back and every node ends on one registry head holding every record."""
    with Netbed("switch s1; switch s2; link trunk s1 s2; host relay s1; host gw s1; host w1 s1; host w2 s2; host w3 s2") as bed:
        nodes = nodes_on(bed)
        relay = nodes.relay("relay")
        _, w1 = nodes.worker("w1", "--bootstrap", relay)
        w2_child, w2 = nodes.worker("w2", "--bootstrap", relay)
        url = nodes.gateway("gw", "--bootstrap", relay)
        wait_for(lambda: all(node_view(url, p).get("registered") and node_view(url, p).get("online") for p in (w1, w2)), 60, "both workers online", nodes)

        bed.cut("trunk")
        wait_for(lambda: not node_view(url, w2).get("online"), 30, "the gateway never noticed w2 was gone", nodes)
        for i in range(5):  # sent during the partition: answered by the side we can reach
            answer = httpx.post(f"{url}/api/generate", json={"prompt": f"During {i}", "max_new_tokens": 3}, timeout=60)
            assert answer.status_code == 200 and answer.json()["node"] == w1, answer.text
        # Meanwhile the other side's registry moves on: a worker joins through w2.
        w2_addr = next(line.split()[-1] for line in w2_child.stdout if line.startswith(f"listening on /ip4/{bed.addr('w2')}/"))
        _, w3 = nodes.worker("w3", "--bootstrap", w2_addr)
        wait_for(lambda: w3 in (chain_nodes(nodes.root / "w2")), 30, "w3 never registered on its side", nodes)
        assert w3 not in chain_nodes(nodes.root / "gw")

        bed.heal("trunk")
        names = ["relay", "gw", "w1", "w2", "w3"]
        started = time.monotonic()
        wait_for(lambda: len({chain_head(nodes.root / n) for n in names}) == 1, 90, "the registries never converged", nodes)
        healed_in = time.monotonic() - started
        assert {w1, w2, w3} <= chain_nodes(nodes.root / "gw")
        wait_for(lambda: node_view(url, w3).get("online") and node_view(url, w3).get("registered"), 30, "the gateway never saw w3", nodes)
        print(f"registries converged {healed_in:.1f} s after the cable was put back")


def test_a_request_in_flight_fails_over_when_its_link_is_cut(nodes_on) -> None:  # type: ignore[no-untyped-def]
    """A request is being answered by a slow worker on the far side of a cable when the
    cable is pulled: the gateway gives up on it once its heartbeats stop and the same
    request is answered by the worker on its own side."""
    with Netbed("switch s1; switch s2; link trunk s1 s2; host relay s1; host gw s1; host near s1; host far s2") as bed:
        nodes = nodes_on(bed)
        relay = nodes.relay("relay")
        # 64 tokens at 1 s each: still being answered when the cable is pulled.
        _, far = nodes.worker("far", "--bootstrap", relay, env={"DLLM_FAULT": "slow-tokens:1000"})
        url = nodes.gateway("gw", "--bootstrap", relay)
        wait_for(lambda: node_view(url, far).get("registered") and node_view(url, far).get("online"), 60, "the far worker online", nodes)

        answers: list[httpx.Response] = []
        body = {"prompt": "In flight", "max_new_tokens": 64, "min_new_tokens": 64}
        # Sent while the far worker is the only one: the first attempt is the far one's.
        sender = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/api/generate", json=body, timeout=180)))
        sender.start()
        try:
            _, near = nodes.worker("near", "--bootstrap", relay)
            wait_for(lambda: node_view(url, near).get("registered") and node_view(url, near).get("online"), 60, "the near worker online", nodes)
            assert sender.is_alive(), "the far worker answered before the cable was pulled"
            bed.cut("trunk")
        finally:
            sender.join(timeout=180)
        assert answers, "the request never came back"
        answer = answers[0]
        assert answer.status_code == 200, answer.text + nodes.output()
        assert answer.json()["node"] == near and answer.json()["attempts"] == 2, answer.text


def chain_nodes(data_dir: Path) -> set[str]:
    from dllm_p2p.registry.store import load_chain

    try:
        return set(load_chain(data_dir / "blockchain.json", clamp=True).nodes())
    except Exception:
        return set()


def test_two_hosts_behind_their_own_routers_try_to_punch_a_hole(nodes_on) -> None:  # type: ignore[no-untyped-def]
    """A gateway and a worker, each behind its own home router, meet through a public
    relay. Requests are served through the relay; DCUtR then tries to punch a hole
    through both routers (both keep ports, so it usually works). The test reports the
    path; it must serve either way."""
    with Netbed("switch inet; host relay inet; router r1 inet; host worker r1; router r2 inet; host gw r2") as bed:
        nodes = nodes_on(bed)
        relay = nodes.relay("relay")
        worker, peer = nodes.worker("worker", "--bootstrap", relay)
        url = nodes.gateway("gw", "--bootstrap", relay)
        circuit = lambda n: any("/p2p-circuit/p2p/" + peer in a for a in n.get("addrs", []))  # noqa: E731
        wait_for(lambda: (n := node_view(url, peer)).get("online") and n.get("registered") and circuit(n), 60, "the worker never became reachable", nodes)
        answer = httpx.post(f"{url}/api/generate", json={"prompt": "Hello", "max_new_tokens": 4}, timeout=60)
        assert answer.status_code == 200 and answer.json()["node"] == peer, answer.text + nodes.output()
        deadline = time.monotonic() + 30
        while node_view(url, peer).get("path") != "hole-punched" and time.monotonic() < deadline:
            time.sleep(0.5)
        path = node_view(url, peer).get("path")
        print(f"path to the worker after 30 s: {path}")
        assert path in ("relayed", "hole-punched")
        for i in range(3):  # served on whichever path it is now
            answer = httpx.post(f"{url}/api/generate", json={"prompt": f"Again {i}", "max_new_tokens": 4}, timeout=60)
            assert answer.status_code == 200 and answer.json()["node"] == peer, answer.text
