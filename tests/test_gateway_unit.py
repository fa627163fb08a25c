"""The gateway's node choice, failover and HTTP shapes, against fake workers (no processes)."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import httpx
import pytest
import trio

from dllm_p2p import wire
from dllm_p2p.client import DialError, WorkerError
from gateway.app import Gateway, create_app
from gateway.nodes import NodeTable, NoLiveNode


class FakeClient:
    """Stands in for dllm_p2p.client.Client: each address behaves as scripted."""

    def __init__(self, behaviour: dict[str, str]) -> None:
        self.behaviour = behaviour  # addr -> "ok" | "dial" | "busy" | "midway"
        self.calls: list[str] = []
        self.requests: list[Any] = []

    async def connect(self, addr: str) -> None:
        if self.behaviour[addr] == "dial":
            raise DialError(f"cannot connect to {addr}")

    async def connect_any(self, addrs: list[str], timeout: float) -> str:
        for addr in addrs:
            try:
                await self.connect(addr)
                return addr
            except DialError:
                continue
        raise DialError("no address answered")

    async def generate(self, addr: str, request: Any):  # type: ignore[no-untyped-def]
        self.calls.append(addr)
        self.requests.append(request)
        mode = self.behaviour[addr]
        if mode == "busy":
            raise WorkerError("busy", "node is at capacity")
        yield {"type": "token", "text": "Hel"}
        if mode == "midway":
            raise WorkerError("internal", "crashed midway")
        yield {"type": "token", "text": "lo"}
        yield {"type": "done", "text": "Hello", "model": "tiny", "finish_reason": "length",
               "usage": {"prompt_tokens": 3, "completion_tokens": 2}, "timing": {"total_ms": 5.0}}


def table_with(*peers: str, models: tuple[str, ...] = ("tiny",)) -> NodeTable:
    table = NodeTable(ttl=10, rng=random.Random(7))
    for peer in peers:
        table.register({"peer_id": peer, "models": list(models), "addrs": [f"/addr/{peer}"], "expires": time.time() + 600})
        table.heartbeat(peer, models=list(models), load={"running": 0, "capacity": 4}, addrs=[f"/addr/{peer}"])
    return table


def app_for(table: NodeTable, client: FakeClient) -> httpx.AsyncClient:
    app = create_app(Gateway(table, client))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


# --- node table ---------------------------------------------------------------------------


def test_offline_and_wrong_model_nodes_are_never_chosen() -> None:
    table = table_with("a", "b")
    table.heartbeat("c", models=["other"], load={}, addrs=["/addr/c"])
    table.heartbeat("old", models=["tiny"], load={}, addrs=["/addr/old"], now=time.time() - 60)
    table.heartbeat("unregistered", models=["tiny"], load={}, addrs=["/addr/unregistered"])  # gossip alone
    chosen = {table.choose("tiny").peer_id for _ in range(50)}
    assert chosen == {"a", "b"}
    with pytest.raises(NoLiveNode, match="no live node serves model 'gpt9'"):
        table.choose("gpt9")


def test_p2c_prefers_the_less_loaded_node() -> None:
    table = table_with("idle", "loaded")
    table.heartbeat("loaded", models=["tiny"], load={"running": 4, "queued": 8, "capacity": 4}, addrs=["/addr/loaded"])
    picks = [table.choose("tiny").peer_id for _ in range(20)]
    assert picks.count("idle") == 20


def test_failures_back_off_doubling_and_success_resets() -> None:
    table = table_with("a", "b")
    table.record_failure("a", "dial failed")
    first = table.nodes["a"].backoff_until - time.time()
    table.record_failure("a", "dial failed")
    second = table.nodes["a"].backoff_until - time.time()
    assert 1.5 < first < 2.5 and 3.5 < second < 4.5
    assert {table.choose("tiny").peer_id for _ in range(20)} == {"b"}
    table.record_success("a", 10.0, 5, 0.1)
    assert table.nodes["a"].backoff_until == 0 and table.nodes["a"].success_rate == pytest.approx(1 / 3)


# --- HTTP ---------------------------------------------------------------------------------


async def test_generate_fails_over_before_the_first_token() -> None:
    table = table_with("down", "up")
    # "up" reports load, so p2c picks "down" first and has to fail over.
    table.heartbeat("up", models=["tiny"], load={"running": 4, "capacity": 4}, addrs=["/addr/up"])
    client = FakeClient({"/addr/down": "dial", "/addr/up": "ok"})
    async with app_for(table, client) as http:
        for _ in range(2):
            response = await http.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 2})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["text"] == "Hello" and body["node"] == "up" and body["usage"]["completion_tokens"] == 2
    assert table.nodes["down"].failures == 1  # then backed off, so not tried again


async def test_an_error_after_the_first_token_is_relayed_not_retried() -> None:
    table = table_with("flaky")
    client = FakeClient({"/addr/flaky": "midway"})
    async with app_for(table, client) as http:
        async with http.stream("POST", "/api/generate", json={"prompt": "hi", "stream": True}) as response:
            assert response.status_code == 200
            text = "".join([chunk async for chunk in response.aiter_text()])
    assert "event: token" in text and "event: error" in text and "crashed midway" in text
    assert client.calls == ["/addr/flaky"]


async def test_no_live_node_is_a_503_naming_the_model() -> None:
    async with app_for(table_with(), FakeClient({})) as http:
        response = await http.post("/api/generate", json={"prompt": "hi", "model": "tiny"})
        streamed = await http.post("/api/generate", json={"prompt": "hi", "model": "tiny", "stream": True})
    for r in (response, streamed):
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["message"] == "no live node serves model 'tiny'"


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "bogus": True}, "bogus"),
        ({}, "prompt"),
    ],
)
async def test_bad_bodies_get_400_with_a_reason(body: dict, fragment: str) -> None:
    async with app_for(table_with("a"), FakeClient({"/addr/a": "ok"})) as http:
        response = await http.post("/api/generate", json=body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]["message"]


async def test_non_json_and_oversized_bodies_are_refused() -> None:
    async with app_for(table_with("a"), FakeClient({"/addr/a": "ok"})) as http:
        garbage = await http.post("/api/generate", content=b"\xff{not json", headers={"content-type": "application/json"})
        huge = await http.post("/api/generate", content=b"x" * (300 * 1024), headers={"content-type": "application/json"})
    assert garbage.status_code == 400 and "error" in garbage.json()
    assert huge.status_code == 413


async def test_openai_chat_stream_ends_with_done() -> None:
    async with app_for(table_with("a"), FakeClient({"/addr/a": "ok"})) as http:
        plain = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        async with http.stream("POST", "/v1/chat/completions", json={"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert plain.json()["choices"][0]["message"] == {"role": "assistant", "content": "Hello", "refusal": None}
    assert plain.json()["usage"]["total_tokens"] == 5
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_openai_min_tokens_reaches_the_worker_as_min_new_tokens() -> None:
    client = FakeClient({"/addr/a": "ok"})
    async with app_for(table_with("a"), client) as http:
        ok = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 9, "min_tokens": 9})
        chat = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "min_tokens": 3})
        bad = await http.post("/v1/completions", json={"prompt": "hi", "min_tokens": -1})
    assert ok.status_code == 200 and chat.status_code == 200
    assert [r.min_new_tokens for r in client.requests] == [9, 3]
    assert bad.status_code == 400 and "min_tokens" in bad.text


async def test_models_nodes_health_and_metrics() -> None:
    table = table_with("a")
    async with app_for(table, FakeClient({"/addr/a": "ok"})) as http:
        await http.post("/api/generate", json={"prompt": "hi"})
        models = (await http.get("/v1/models")).json()
        nodes = (await http.get("/api/nodes")).json()
        health = (await http.get("/healthz")).json()
        metrics = (await http.get("/metrics")).text
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert nodes["nodes"][0]["peer_id"] == "a" and nodes["nodes"][0]["online"] is True
    assert nodes["nodes"][0]["success_rate"] == 1.0
    assert health["live_nodes"] == 1
    assert 'dllm_gateway_requests_total{endpoint="generate",status="200"} 1.0' in metrics
    assert "dllm_gateway_live_nodes 1.0" in metrics


# --- reputation ---------------------------------------------------------------------------


def test_a_failing_node_sinks_in_routing_and_recovers_when_it_behaves() -> None:
    table = table_with("steady", "flaky")
    for peer in ("steady", "flaky"):
        table.record_success(peer, 50.0, 10, 0.5)
    for _ in range(4):
        table.record_failure("flaky", "internal: boom", backoff=False)
    flaky, steady = table.nodes["flaky"], table.nodes["steady"]
    assert flaky.reputation() < 0.4 < 0.8 < steady.reputation()
    assert {table.choose("tiny").peer_id for _ in range(20)} == {"steady"}
    described = {n["peer_id"]: n for n in table.describe()}
    assert described["flaky"]["reputation"] < described["steady"]["reputation"]
    for _ in range(8):
        table.record_success("flaky", 50.0, 10, 0.5)
    assert flaky.reputation() > 0.85
    # With no traffic at all, a bad reputation drifts back toward neutral.
    table.record_failure("flaky", "stalled", backoff=False)
    later = flaky.last_outcome_at + 3600
    assert flaky.reputation(later) == pytest.approx(0.8, abs=0.01)


async def test_form_encoded_json_is_accepted_like_curl_sends_it() -> None:
    async with app_for(table_with("a"), FakeClient({"/addr/a": "ok"})) as http:
        response = await http.post("/api/generate", content=b'{"prompt": "hi"}', headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200 and response.json()["text"] == "Hello"


def test_the_node_table_stays_bounded_forgetting_unregistered_nodes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway import nodes as nodes_module

    monkeypatch.setattr(nodes_module, "MAX_NODES", 50)
    table = table_with("a", "b")
    for i in range(500):  # a flood of gossip from fresh keys
        table.heartbeat(f"fresh-{i}", models=["tiny"], load={}, addrs=[f"/addr/fresh-{i}"], now=time.time() - 1 + i / 1000)
    assert len(table.nodes) <= 50
    assert {"a", "b"} <= set(table.nodes)  # registered nodes are kept
    assert "fresh-499" in table.nodes and "fresh-0" not in table.nodes  # the least recently heard went first


def test_a_known_node_that_gossips_a_bad_heartbeat_loses_reputation_a_stranger_is_not_added() -> None:
    table = table_with("a", "b")
    before = table.nodes["a"].reputation()
    table.bad_heartbeat("a", "load.capacity must be at least 1")
    assert table.nodes["a"].reputation() < before and "bad heartbeat" in table.nodes["a"].last_error
    assert table.nodes["a"].backoff_until == 0  # no backoff: it may still answer well
    table.bad_heartbeat("stranger", "wrong fields")
    assert "stranger" not in table.nodes


# --- deadlines (on trio's virtual clock: minutes pass at once) ------------------------------


class HangingClient(FakeClient):
    """``blackhole`` addresses never answer a dial; ``stall`` workers send one token and
    then nothing, keeping the stream open."""

    def __init__(self, behaviour: dict[str, str]) -> None:
        super().__init__(behaviour)
        self.dialed: list[str] = []

    async def connect(self, addr: str) -> None:
        self.dialed.append(addr)
        if self.behaviour[addr] == "blackhole":
            await trio.sleep_forever()
        await super().connect(addr)

    async def generate(self, addr: str, request: Any):  # type: ignore[no-untyped-def]
        if self.behaviour[addr] == "stall":
            yield {"type": "token", "text": "Hel"}
            await trio.sleep_forever()
        async for frame in super().generate(addr, request):
            yield frame


async def test_an_answer_that_stalls_after_its_first_frame_fails_within_the_idle_deadline(autojump_clock: Any) -> None:
    from gateway.relay import FRAME_IDLE_TIMEOUT, RelayError, relay

    table = table_with("stuck")
    client = HangingClient({"/addr/stuck": "stall"})
    started = trio.current_time()
    with trio.fail_after(3600), pytest.raises(RelayError, match="stalled"):
        async for _ in relay(table, client, wire.Request(prompt="hi", stream=True)):  # type: ignore[arg-type]
            pass
    assert trio.current_time() - started == pytest.approx(FRAME_IDLE_TIMEOUT, abs=1)


async def test_a_record_full_of_dead_addresses_costs_one_dial_budget_then_fails_over(autojump_clock: Any) -> None:
    from gateway.relay import DIAL_BUDGET, relay

    table = table_with("dead", "alive")
    dead = [f"/addr/dead{i}" for i in range(20)]
    table.heartbeat("alive", models=["tiny"], load={"running": 4, "capacity": 4}, addrs=["/addr/alive"])  # p2c tries "dead" first
    table.nodes["dead"].addrs = dead
    client = HangingClient({**{a: "blackhole" for a in dead}, "/addr/alive": "ok"})
    started = trio.current_time()
    with trio.fail_after(3600):
        frames = [f async for f in relay(table, client, wire.Request(prompt="hi"))]  # type: ignore[arg-type]
    assert frames[-1].node == "alive"
    assert trio.current_time() - started <= DIAL_BUDGET + 0.5


async def test_a_silent_workers_connection_is_closed_so_requests_on_it_fail_over(autojump_clock: Any) -> None:
    """A pulled cable leaves TCP believing the connection open: once the worker's
    heartbeats stop for a TTL the gateway closes it, so a request waiting on it fails
    (and is retried elsewhere) at once, not at the answer deadline."""
    from libp2p.peer.id import ID

    from dllm_p2p.identity import generate
    from gateway.server import drop_silent

    silent, alive = generate().peer_id, generate().peer_id
    table = table_with(silent.to_base58(), alive.to_base58())
    table.nodes[silent.to_base58()].last_seen = time.time() - 60

    class Network:
        def __init__(self) -> None:
            self.open = {silent, alive}

        def get_connections(self, peer: ID) -> list[object]:
            return [object()] if peer in self.open else []

        async def close_peer(self, peer: ID) -> None:
            self.open.discard(peer)

    network = Network()
    host = type("Host", (), {"get_network": lambda self: network})()
    with trio.move_on_after(3):
        await drop_silent(table, host)
    assert network.open == {alive}
