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
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
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


# --- routes of spans ------------------------------------------------------------------------

from contextlib import asynccontextmanager  # noqa: E402

from dllm_p2p.client import Client, open_client  # noqa: E402

from .spanfakes import FINGERPRINT, FakeSpan, expected_tokens, letter, running  # noqa: E402


def add_span(table: NodeTable, peer: str, span: tuple[int, int], *, layers: int = 3, addrs: list[str] | None = None,
             fingerprint: str = FINGERPRINT, load: dict[str, Any] | None = None, hidden: int = 4) -> None:
    """A registered span worker, as its record and heartbeat describe it."""
    addrs = addrs or [f"/addr/{peer}"]
    table.register({"peer_id": peer, "models": ["tiny"], "addrs": addrs, "expires": time.time() + 600})
    meta = {"tiny": {"fingerprint": fingerprint, "chat": False, "span": list(span), "layers": layers, "hidden": hidden}}
    table.heartbeat(peer, models=["tiny"], load=load or {"sessions": 0, "max_sessions": 8, "running": 0, "capacity": 8}, addrs=addrs, meta=meta)


def test_span_workers_are_never_sent_whole_generations_nor_audits() -> None:
    table = table_with("full")
    table.nodes["full"].model_info = {"tiny": {"fingerprint": FINGERPRINT, "chat": False, "span": [0, 3], "layers": 3}}  # a full worker says [0, layers]
    add_span(table, "part", (0, 2))
    add_span(table, "whole-span", (0, 3))  # all layers, but served as a span (sessions in its load)
    assert {table.choose("tiny").peer_id for _ in range(20)} == {"full"}
    assert [n.peer_id for n in table.auditors("tiny", FINGERPRINT)] == ["full"]
    assert sorted(h.peer_id for h in table.span_candidates("tiny")) == ["part", "whole-span"]
    # A heartbeat that says ``forward`` outright is believed either way.
    table.nodes["full"].model_info["tiny"]["forward"] = True
    assert table.span_candidates("tiny", exclude=["part", "whole-span"])[0].peer_id == "full"
    with pytest.raises(NoLiveNode):
        table.choose("tiny")


def test_routes_skip_spans_in_backoff_quarantine_or_of_another_build() -> None:
    table = NodeTable(ttl=10)
    add_span(table, "a", (0, 2))
    add_span(table, "b", (2, 3))
    add_span(table, "b2", (2, 3))
    add_span(table, "other", (2, 3), fingerprint="sha256:" + "cd" * 32)
    table.record_failure("b", "reset")
    table.quarantine("b2", "failed an audit")
    assert table.plan("tiny") == ("tiny", [])
    described = table.spans()["tiny"]
    assert described["complete"] is False and described["covered"] == 3 and described["route"] is None
    assert [s["peer_id"] for s in described["spans"]] == ["a", "b"]  # the quarantined one is not listed
    assert described["spans"][1]["backoff_s"] > 0 and [g["fingerprint"] for g in described["alternatives"]] == ["sha256:" + "cd" * 32]
    table.record_success("b", 20.0, 10, 0.1)
    model, route = table.plan(None)
    assert model == "tiny" and [h.peer_id for h in route] == ["a", "b"] and route[0].hidden == 4
    assert table.spans()["tiny"]["complete"] is True


def test_a_loaded_span_costs_more_than_an_idle_one() -> None:
    table = NodeTable(ttl=10)
    add_span(table, "busy", (0, 3), load={"sessions": 8, "max_sessions": 8, "running": 8, "capacity": 8})
    add_span(table, "full-cache", (0, 3), load={"sessions": 1, "max_sessions": 8, "kv_cache_mb": 1000, "kv_cache_budget_mb": 1000})
    add_span(table, "idle", (0, 3))
    assert [h.peer_id for h in table.plan("tiny")[1]] == ["idle"]
    costs = {h.peer_id: h.cost for h in table.span_candidates("tiny")}
    assert costs["idle"] < costs["busy"] and costs["idle"] < costs["full-cache"]


class MixedClient(Client):
    """A real libp2p client for the fake spans; ``/addr/...`` are fake full workers."""

    def __init__(self, host: Any, behaviour: dict[str, str]) -> None:
        super().__init__(host, keep_alive=True)
        self.fake = FakeClient(behaviour)

    async def connect_any(self, addrs: list[str], timeout: float | None = None) -> str:
        if addrs and addrs[0].startswith("/addr/"):
            return await self.fake.connect_any(addrs, timeout or 1.0)
        return await super().connect_any(addrs, timeout)

    async def generate(self, addr: str, request: Any):  # type: ignore[no-untyped-def,override]
        async for frame in self.fake.generate(addr, request):
            yield frame


@asynccontextmanager
async def span_gateway(spans: list[FakeSpan], spares: list[FakeSpan] = (), full: tuple[str, ...] = ()):  # type: ignore[no-untyped-def,assignment]
    """A gateway whose table holds ``spans``, ``spares`` (busier, so routes start on
    ``spans``) and fake ``full`` workers; yields its HTTP client, table and libp2p client."""
    table = table_with(*full)
    async with running([*spans, *spares]), open_client() as base:
        for span in spans:
            add_span(table, span.peer_id, (span.start, span.end), addrs=list(span.hop().addrs))
        for span in spares:
            busier = {"sessions": 4, "max_sessions": 8, "running": 4, "capacity": 8}
            add_span(table, span.peer_id, (span.start, span.end), addrs=list(span.hop().addrs), load=busier)
        client = MixedClient(base.host, {f"/addr/{p}": "ok" for p in full})
        app = create_app(Gateway(table, client))  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30) as http:
            yield http, table, client


def route_of(*spans: FakeSpan) -> list[dict[str, Any]]:
    return [{"peer_id": s.peer_id, "span": [s.start, s.end]} for s in spans]


async def test_without_a_full_worker_spans_that_cover_the_model_answer_through_a_route() -> None:
    spans = [FakeSpan(0, 1), FakeSpan(1, 2), FakeSpan(2, 3)]
    async with span_gateway(spans) as (http, table, _):
        response = await http.post("/api/generate", json={"prompt": "Hello", "max_new_tokens": 6, "temperature": 0})
        described = (await http.get("/api/spans")).json()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == "".join(letter(t) for t in expected_tokens("Hello", 6)) and body["finish_reason"] == "length"
    assert body["route"] == route_of(*spans) and body["node"] is None and body["signature"] is None
    assert body["model"] == "tiny" and body["fingerprint"] == FINGERPRINT and body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6}
    assert len(body["timing"]["hops_ms"]) == 3
    entry = described["tiny"]
    assert entry["complete"] is True and entry["route"] == route_of(*spans) and entry["full_workers"] == 0 and entry["layers"] == 3
    assert [s["span"] for s in entry["spans"]] == [[0, 1], [1, 2], [2, 3]] and entry["spans"][0]["load"]["max_sessions"] == 8
    assert all(table.nodes[s.peer_id].successes == 1 and table.nodes[s.peer_id].tokens_per_s for s in spans)


async def test_a_request_may_force_a_route_or_a_full_worker() -> None:
    spans = [FakeSpan(0, 2), FakeSpan(2, 3)]
    async with span_gateway(spans, full=("full",)) as (http, _, _):
        auto = (await http.post("/api/generate", json={"prompt": "Hi", "max_new_tokens": 3})).json()
        forced = (await http.post("/api/generate", json={"prompt": "Hi", "max_new_tokens": 3, "temperature": 0, "route": "spans"})).json()
        full = (await http.post("/api/generate", json={"prompt": "Hi", "route": "full"})).json()
        bad = await http.post("/api/generate", json={"prompt": "Hi", "route": "maybe"})
    assert auto["node"] == "full" and auto["route"] is None and full["node"] == "full"
    assert forced["route"] == route_of(*spans) and forced["text"] == "".join(letter(t) for t in expected_tokens("Hi", 3, middles=0))
    assert bad.status_code == 400 and "route" in bad.text


async def test_a_streamed_route_survives_a_span_dying_midway() -> None:
    spans = [FakeSpan(0, 1), FakeSpan(1, 2, die_after=3), FakeSpan(2, 3)]
    spare = FakeSpan(1, 2)
    async with span_gateway(spans, [spare]) as (http, table, _):
        async with http.stream("POST", "/api/generate", json={"prompt": "Hello", "max_new_tokens": 8, "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            raw = "".join([chunk async for chunk in response.aiter_text()])
    events = [(block.split("\n")[0][7:], json.loads(block.split("\n")[1][6:])) for block in raw.strip().split("\n\n")]
    tokens = [data["text"] for kind, data in events if kind == "token"]
    kind, done = events[-1]
    want = "".join(letter(t) for t in expected_tokens("Hello", 8))
    assert kind == "done" and "".join(tokens) == want == done["text"] and len(tokens) == 8
    assert done["route"] == route_of(spans[0], spare, spans[2]) and done["attempts"] == 2
    assert table.nodes[spans[1].peer_id].failures == 1 and table.nodes[spans[1].peer_id].backoff_until > time.time()


async def test_openai_answers_through_a_route_carry_it_and_no_signature() -> None:
    spans = [FakeSpan(0, 1), FakeSpan(1, 3)]
    async with span_gateway(spans) as (http, _, _):
        chat = await http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
        completion = await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 0})
        async with http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 0, "stream": True}) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    want = "".join(letter(t) for t in expected_tokens("hi", 4, middles=0))
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == want
    assert chat.json()["route"] == route_of(*spans) and "x-dllm-signature" not in chat.headers
    assert completion.json()["choices"][0]["text"] == want and completion.json()["route"] == route_of(*spans)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["route"] == route_of(*spans) and chunks[-1]["signature"] is None and lines[-1] == "data: [DONE]"


async def test_route_failures_are_statuses_not_500s() -> None:
    spans = [FakeSpan(0, 1), FakeSpan(1, 2, die_after=2), FakeSpan(2, 3)]
    async with span_gateway(spans) as (http, table, _):
        plain = await http.post("/api/generate", json={"prompt": "Hello", "max_new_tokens": 8})
        async with http.stream("POST", "/api/generate", json={"prompt": "Hello", "max_new_tokens": 8, "stream": True}) as response:
            status, raw = response.status_code, "".join([chunk async for chunk in response.aiter_text()])
        table.nodes[spans[1].peer_id].last_seen = 0  # gone: no route at all now
        missing = await http.post("/api/generate", json={"prompt": "Hello", "route": "spans"})
        described = (await http.get("/api/spans")).json()
    assert plain.status_code == 502 and plain.json()["error"]["code"] == "node_failed"
    assert "no other peer serves those layers" in plain.json()["error"]["message"]
    # Streamed: the failure came before any token (the dead span is in backoff, the route
    # is gone), so it is a status too.
    assert status == 503 and "no complete route of spans" in raw
    assert missing.status_code == 503 and missing.json()["error"]["code"] == "no_live_node"
    assert described["tiny"]["complete"] is False


async def test_api_generate_takes_a_conversation_for_workers_and_routes_alike() -> None:
    spans = [FakeSpan(0, 1), FakeSpan(1, 3)]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    async with span_gateway(spans, full=("full",)) as (http, _, client):
        whole = await http.post("/api/generate", json={"messages": conversation, "max_new_tokens": 2})
        routed = await http.post("/api/generate", json={"messages": conversation, "max_new_tokens": 3, "temperature": 0, "route": "spans"})
    assert whole.status_code == 200 and whole.json()["node"] == "full"
    assert client.fake.requests[-1].messages == tuple(conversation) and client.fake.requests[-1].prompt == ""
    # The fake first span tokenizes a conversation as its contents run together.
    assert routed.json()["text"] == "".join(letter(t) for t in expected_tokens("Be brief.hi", 3, middles=0))
