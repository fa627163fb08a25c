"""The gateway's bounded history of its nodes (gateway/history.py) and ``/api/history``:
sampling, the bounds on samples and nodes, eviction, with a fake clock and no sleeps."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from gateway.app import Gateway, create_app
from gateway.history import CAPACITY, GATEWAY_SERIES, MAX_NODES, MAX_PUBLICATIONS, NODE_SERIES, History, Ring, metrics_figures
from gateway.nodes import NodeTable

T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def beat(table: NodeTable, peer: str, at: float, **load: Any) -> None:
    table.heartbeat(peer, models=["tiny"], load={"running": 0, "queued": 0, "capacity": 4, **load}, addrs=[f"/addr/{peer}"], now=at)


def test_a_sample_takes_every_node_and_the_gateway() -> None:
    clock = FakeClock()
    table = NodeTable(ttl=10)
    beat(table, "a", T0, running=1, queued=2, tokens_per_second=12.5)
    beat(table, "b", T0 - 60)  # heard from a minute ago: offline
    table.record_success("a", first_token_ms=40.0, tokens=10, decode_s=0.5)
    table.record_failure("a", "boom", backoff=False)
    table.nodes["a"].last_seen = T0  # a success counts as heard from, on the real clock
    ledger = {"a": {"earned_mc": 1500, "spent_mc": 20}}
    counts = {"requests": 7.0, "errors": 1.0}
    history = History(table, clock=clock, credits=ledger.get, figures=lambda: counts)

    history.sample()
    a = history.node("a")
    assert a is not None and a["samples"] == 1 and a["role"] == "worker" and a["last_seen"] >= T0
    assert set(a["series"]) == set(NODE_SERIES)
    s = a["series"]
    assert s["t"] == [T0] and s["online"] == [1] and s["quarantined"] == [0]
    assert (s["running"], s["queued"], s["capacity"]) == ([1], [2], [4])
    assert s["tokens_per_s"] == [12.5] and s["decode_tokens_per_s"] == [20.0] and s["latency_ms"] == [40.0]
    assert s["requests"] == [2] and s["errors"] == [1] and s["success_rate"] == [0.5]
    assert s["earned_mc"] == [1500] and s["spent_mc"] == [20]
    b = history.node("b")["series"]  # type: ignore[index]
    assert b["online"] == [0] and b["latency_ms"] == [None] and b["earned_mc"] == [None]  # unknown is null

    gateway = history.describe()["gateway"]
    assert gateway["samples"] == 1
    assert gateway["series"] == {"t": [T0], "online": [1], "known": [2], "requests": [7], "errors": [1], "blocks": [None], "records": [None]}
    assert gateway["publications"] == []  # no registry given

    # Ten seconds on: a is quiet (offline), quarantined, and failed twice more.
    clock.now += 10.5
    table.quarantine("a", "wrong token")
    table.record_failure("a", "boom")
    history.sample()
    s = history.node("a")["series"]  # type: ignore[index]
    assert s["t"] == [T0, T0 + 10.5] and s["online"] == [1, 0] and s["quarantined"] == [0, 1] and s["errors"] == [1, 2]
    assert history.node("nobody") is None
    # ``since`` keeps the newer samples only.
    assert history.node("a", since=T0)["series"]["t"] == [T0 + 10.5]  # type: ignore[index]
    assert history.describe(since=T0 + 11)["nodes"]["b"]["series"]["t"] == []
    assert history.describe(nodes=False)["nodes"] == {}


def test_each_node_keeps_its_last_samples_only() -> None:
    clock = FakeClock()
    table = NodeTable(ttl=10)
    history = History(table, clock=clock, interval=10, capacity=5)
    for i in range(12):
        clock.now = T0 + 10 * i
        beat(table, "a", clock.now, queued=i)
        history.sample()
    s = history.node("a")["series"]  # type: ignore[index]
    assert s["t"] == [T0 + 10 * i for i in range(7, 12)]  # oldest first
    assert s["queued"] == [7, 8, 9, 10, 11]
    assert history.describe()["gateway"]["series"]["t"] == s["t"]
    assert len(history.nodes["a"].ring.data) == 5 * len(NODE_SERIES)  # a fixed size, however long it runs


def test_the_ring_wraps_and_reads_oldest_first() -> None:
    ring = Ring(3, 2)
    assert ring.columns(("t", "v")) == {"t": [], "v": []} and ring.last(0) is None
    for i in range(5):
        ring.append((i, None if i == 3 else i * 1.5))
    assert ring.columns(("t", "v")) == {"t": [2, 3, 4], "v": [3, None, 6]}
    assert ring.last(0) == 4
    with pytest.raises(ValueError):
        ring.append((1,))


def test_past_the_node_limit_the_least_recently_seen_are_dropped() -> None:
    clock = FakeClock()
    table = NodeTable(ttl=10)
    history = History(table, clock=clock, max_nodes=3)
    for i, peer in enumerate("abcde"):
        beat(table, peer, T0 - 100 + i)  # e heard from last, a first
    history.sample()
    assert sorted(history.nodes) == ["c", "d", "e"]

    # a beats again: now the most recent, it takes the place of the least recent kept (c).
    clock.now += 10
    beat(table, "a", clock.now)
    history.sample()
    assert sorted(history.nodes) == ["a", "d", "e"]
    assert history.node("a")["samples"] == 1 and history.node("d")["samples"] == 2  # type: ignore[index]

    # Never-seen nodes (a registry record, no heartbeat) do not push out nodes kept.
    for peer in ("x", "y"):
        table.register({"peer_id": peer, "models": ["tiny"], "addrs": [f"/addr/{peer}"], "expires": T0 + 600})
    history.sample()
    assert sorted(history.nodes) == ["a", "d", "e"]

    # Nor do they churn among themselves at a tie: the ones kept stay.
    tied = History(NodeTable(ttl=10), clock=clock, max_nodes=2)
    for peer in "pqrs":
        tied.table.register({"peer_id": peer, "models": ["tiny"], "addrs": [], "expires": T0 + 600})
    tied.sample()
    kept = sorted(tied.nodes)
    tied.table.register({"peer_id": "o", "models": ["tiny"], "addrs": [], "expires": T0 + 600})
    tied.sample()
    assert sorted(tied.nodes) == kept


def test_a_node_gone_from_the_table_is_kept_until_its_samples_leave_the_window() -> None:
    clock = FakeClock()
    table = NodeTable(ttl=10)
    history = History(table, clock=clock, interval=10, capacity=6)  # a window of 60 s
    beat(table, "a", T0)
    beat(table, "b", T0)
    history.sample()
    del table.nodes["b"]  # the table forgot it (NodeTable._forget_one)
    clock.now += 30
    history.sample()
    assert history.node("b")["series"]["t"] == [T0]  # type: ignore[index]
    clock.now += 31
    history.sample()
    assert history.node("b") is None and history.node("a") is not None


def registry_state(head: str, blocks: int, records: int, cid: str | None, **more: Any) -> dict[str, Any]:
    """What ``describe_registry`` says (gateway/server.py), with ``records`` live records."""
    nodes = [{"peer_id": f"p{i}", "role": "worker"} for i in range(records)]
    return {"head": head, "blocks": blocks, "compacted_at": None, "nodes": nodes, "cid": cid, "published_at": None,
            "mode": "embedded", "ipns": None, "ipns_cid": None, "ipns_at": None, "ipns_via": "off", **more}


def test_the_registry_over_time_blocks_records_and_publications() -> None:
    clock = FakeClock()
    state = registry_state("h0", 1, 0, None)
    history = History(NodeTable(ttl=10), clock=clock, registry=lambda: state)

    history.sample()  # not published yet: counted, no publication
    clock.now += 10
    state = registry_state("h1", 3, 2, "bafyA", published_at=T0 + 9.5, ipns="k51name", ipns_cid="bafyOld", ipns_at=T0 - 50, ipns_via="dht")
    history.sample()
    clock.now += 10
    state = {**state, "nodes": state["nodes"][:1], "ipns_cid": "bafyA", "ipns_at": T0 + 15}  # a record expired; the name follows
    history.sample()
    clock.now += 10
    state = registry_state("h2", 4, 1, "bafyB", published_at=T0 + 29, ipns="k51name", ipns_cid="bafyA", ipns_at=T0 + 15, ipns_via="dht")
    history.sample()

    gateway = history.describe()["gateway"]
    assert gateway["series"]["blocks"] == [1, 3, 3, 4] and gateway["series"]["records"] == [0, 2, 1, 1]
    assert gateway["publications"] == [  # one per distinct CID, oldest first
        {"cid": "bafyA", "first_seen": T0 + 10, "published_at": T0 + 9.5, "head": "h1", "blocks": 3,
         "ipns": "k51name", "ipns_cid": "bafyOld", "named_at": T0 + 15},
        {"cid": "bafyB", "first_seen": T0 + 30, "published_at": T0 + 29, "head": "h2", "blocks": 4,
         "ipns": "k51name", "ipns_cid": "bafyA", "named_at": None},
    ]
    # ``since`` leaves out the publications first seen up to then, like the samples.
    assert [p["cid"] for p in history.describe(since=T0 + 10)["gateway"]["publications"]] == ["bafyB"]
    # What the answer holds is a copy: a reader cannot change what is kept.
    gateway["publications"][0]["cid"] = "changed"
    assert history.describe()["gateway"]["publications"][0]["cid"] == "bafyA"


def test_only_the_last_publications_are_kept() -> None:
    clock = FakeClock()
    state: dict[str, Any] = {}
    history = History(NodeTable(), clock=clock, registry=lambda: state)
    for i in range(MAX_PUBLICATIONS + 10):
        state = registry_state(f"h{i}", i + 1, 1, f"bafy{i}")
        history.sample()
        history.sample()  # the same CID again: still one publication
        clock.now += 10
    kept = history.describe()["gateway"]["publications"]
    assert len(kept) == MAX_PUBLICATIONS == 64
    assert [p["cid"] for p in kept] == [f"bafy{i}" for i in range(10, MAX_PUBLICATIONS + 10)]
    assert kept[-1]["head"] == f"h{MAX_PUBLICATIONS + 9}" and kept[-1]["blocks"] == MAX_PUBLICATIONS + 10


def test_a_registry_that_fails_or_lies_does_not_stop_the_sampling() -> None:
    clock = FakeClock()
    answers: list[Any] = [RuntimeError("store closed"), "not a dict", {"blocks": "7", "nodes": None, "cid": 42, "head": ["x"]}]

    def registry() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    history = History(NodeTable(), clock=clock, registry=registry)
    for _ in range(3):
        history.sample()
        clock.now += 10
    gateway = history.describe()["gateway"]
    assert gateway["samples"] == 3
    assert gateway["series"]["blocks"] == [None] * 3 and gateway["series"]["records"] == [None] * 3
    assert gateway["publications"] == []


def test_the_defaults_bound_the_memory() -> None:
    assert (CAPACITY, MAX_NODES) == (360, 512)
    history = History(NodeTable())
    assert history.interval == 10 and history.window == 3600
    with pytest.raises(ValueError):
        History(NodeTable(), interval=0)


async def test_run_samples_every_interval(autojump_clock: Any) -> None:
    table = NodeTable(ttl=10)
    beat(table, "a", T0)
    # Wall time follows trio's virtual clock, which jumps ahead whenever the task sleeps.
    history = History(table, clock=lambda: T0 + trio.current_time(), interval=10)
    start = trio.current_time()
    with trio.move_on_after(35):
        await history.run()
    times = history.node("a")["series"]["t"]  # type: ignore[index]
    assert [round(t - T0 - start) for t in times] == [0, 10, 20, 30]


def test_metrics_figures_sum_every_label() -> None:
    gw = Gateway(NodeTable(), None)
    gw.metrics.requests.labels("generate", "200").inc(3)
    gw.metrics.requests.labels("chat", "503").inc()
    gw.metrics.errors.labels("no_live_node").inc()
    assert metrics_figures(gw.metrics)() == {"requests": 4.0, "errors": 1.0}


def http_for(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(gw)), base_url="http://gw")


async def test_the_history_routes() -> None:
    clock = FakeClock()
    table = NodeTable(ttl=10)
    beat(table, "a", T0)
    gw = Gateway(table, None)
    registry = registry_state("h1", 2, 1, "bafyA")
    gw.history = History(table, clock=clock, figures=metrics_figures(gw.metrics), registry=lambda: registry)
    gw.history.sample()
    clock.now += 11
    gw.history.sample()
    async with http_for(gw) as http:
        everything = (await http.get("/api/history")).json()
        one = await http.get("/api/history/a")
        newer = (await http.get("/api/history/a", params={"since": T0})).json()
        gateway_only = (await http.get("/api/history", params={"nodes": "false"})).json()
        missing = await http.get("/api/history/nobody")
    assert everything["enabled"] is True and everything["interval_s"] == 10 and everything["capacity"] == CAPACITY
    assert everything["nodes"]["a"]["series"]["online"] == [1, 0]
    assert everything["gateway"]["series"]["requests"] == [0, 0]
    assert set(everything["gateway"]["series"]) == set(GATEWAY_SERIES)
    assert everything["gateway"]["series"]["blocks"] == [2, 2] and everything["gateway"]["series"]["records"] == [1, 1]
    assert [(p["cid"], p["head"], p["first_seen"]) for p in everything["gateway"]["publications"]] == [("bafyA", "h1", T0)]
    assert gateway_only["gateway"]["publications"] == everything["gateway"]["publications"]
    assert one.status_code == 200 and one.json()["peer_id"] == "a" and one.json()["samples"] == 2
    assert newer["series"]["t"] == [T0 + 11]
    assert gateway_only["nodes"] == {} and gateway_only["gateway"]["samples"] == 2
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_a_gateway_without_history_answers_an_empty_one() -> None:
    async with http_for(Gateway(NodeTable(), None)) as http:
        everything = await http.get("/api/history")
        one = await http.get("/api/history/a")
    assert everything.status_code == 200
    body = everything.json()
    assert body["enabled"] is False and body["nodes"] == {} and body["gateway"]["samples"] == 0
    assert body["gateway"]["series"] == {name: [] for name in GATEWAY_SERIES} and body["gateway"]["publications"] == []
    assert one.status_code == 404
