"""What peers send, checked before anything uses it: worker frames at the client,
heartbeats at the gossip validator, bodies at the gateway. None of it may become a 500."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol

from dllm_p2p import heartbeat, wire
from dllm_p2p.client import ProtocolError, WorkerError, open_client
from dllm_p2p.host import host_addrs, make_host, parse_multiaddr
from dllm_p2p.identity import generate

DONE = {"type": "done", "text": "hi", "model": "tiny", "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}


@pytest.mark.parametrize(
    "frame, fragment",
    [
        ({"text": "no type"}, "unknown frame type"),
        ({"type": "tokn", "text": "x"}, "unknown frame type"),
        ({"type": "token", "text": 7}, "'text' must be a string"),
        ({**DONE, "usage": {"prompt_tokens": -1, "completion_tokens": 1}}, "usage.prompt_tokens"),
        ({**DONE, "usage": {"prompt_tokens": 1, "completion_tokens": 2**40}}, "usage.completion_tokens"),
        ({**DONE, "usage": "lots"}, "must be maps"),
        ({**DONE, "timing": {"total_ms": math.nan}}, "timing.total_ms"),
        ({**DONE, "finish_reason": "because"}, "finish_reason"),
        ({**DONE, "finish_reason": ["stop"]}, "finish_reason"),
        ({**DONE, "model": ["x"]}, "'model' must be a string"),
    ],
)
def test_bad_worker_frames_are_refused_naming_the_field(frame: dict[str, Any], fragment: str) -> None:
    with pytest.raises(wire.WireError) as info:
        wire.check_response(dict(frame))
    assert fragment in str(info.value)


def test_good_frames_are_normalised_and_error_frames_bounded() -> None:
    done = wire.check_response({"type": "done", "text": "x"})
    assert done["usage"] == {"prompt_tokens": 0, "completion_tokens": 0} and done["timing"]["total_ms"] == 0.0
    error = wire.check_response({"type": "error", "code": "teapot", "message": "m" * 10_000})
    assert error["code"] == "internal" and len(error["message"]) == 1000


async def test_the_client_turns_a_lying_workers_frames_into_protocol_errors() -> None:
    """A real libp2p peer that answers /dllm/generate/1.0.0 with a frame without a type."""
    evil = make_host(generate())
    replies = [{"text": "no type"}, {**DONE, "usage": {"prompt_tokens": -5}}, {"type": "error", "code": "busy", "message": "later"}]

    async def handler(stream: Any) -> None:
        try:
            await wire.FrameReader(stream, wire.MAX_REQUEST_FRAME).read_frame()
            await stream.write(wire.encode_frame(replies.pop(0)))
            await stream.close()
        except Exception:
            await stream.reset()

    evil.set_stream_handler(TProtocol(wire.GENERATE_PROTOCOL), handler)
    async with evil.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]):
        addr = host_addrs(evil)[0]
        async with open_client() as client:
            for expected in (ProtocolError, ProtocolError, WorkerError):
                with trio.fail_after(20), pytest.raises(expected):
                    await client.complete(addr, {"prompt": "hi"})


async def test_the_client_refuses_answers_that_are_unsigned_or_signed_for_something_else() -> None:
    from dllm_p2p import answers

    key = generate()
    evil = make_host(key)
    other = generate()

    def signed(signer: Any, body: bytes, text: str) -> dict[str, Any]:
        return answers.sign(signer, request_body=body, request_id=None, text=text, token_ids=[1], model="tiny",
                            fingerprint=None, finish_reason="stop", usage={"prompt_tokens": 1, "completion_tokens": 1})

    cases = [
        lambda body: {**DONE},  # no signature at all
        lambda body: {**DONE, "signature": signed(key, body, "another text")},
        lambda body: {**DONE, "signature": signed(key, b"another request", DONE["text"])},
        lambda body: {**DONE, "signature": signed(other, body, DONE["text"])},  # a valid signature, by someone else
        lambda body: {**DONE, "signature": signed(key, body, DONE["text"])},  # the real thing
    ]

    async def handler(stream: Any) -> None:
        try:
            reader = wire.FrameReader(stream, wire.MAX_REQUEST_FRAME)
            await reader.read_frame()
            await stream.write(wire.encode_frame(cases.pop(0)(reader.last_body)))
            await stream.close()
        except Exception:
            await stream.reset()

    evil.set_stream_handler(TProtocol(wire.GENERATE_PROTOCOL), handler)
    async with evil.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]):
        addr = host_addrs(evil)[0]
        async with open_client() as client:
            for fragment in ("signature must be a map", "another text", "another request", "not by the node"):
                with trio.fail_after(20), pytest.raises(ProtocolError, match=fragment):
                    await client.complete(addr, {"prompt": "hi"})
            with trio.fail_after(20):
                done = await client.complete(addr, {"prompt": "hi"})
            assert done["signature"]["peer_id"] == key.peer_id.to_base58()


def beat(**changes: Any) -> bytes:
    me = generate()
    fields: dict[str, Any] = dict(role="worker", models=["tiny"], addrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{me.peer_id}"], load={"running": 0, "capacity": 4})
    fields.update(changes)
    if "addrs" in changes and changes["addrs"] == "own-without-p2p":
        fields["addrs"] = ["/ip4/127.0.0.1/tcp/1"]
    return heartbeat.make(me, 1, **fields)


@pytest.mark.parametrize(
    "changes",
    [
        {"load": {"capacity": "x"}},
        {"load": {"capacity": 0}},
        {"load": {"running": 1.5}},
        {"load": {"running": -1}},
        {"load": {"x": [1, 2]}},
        {"load": {f"k{i}": 1 for i in range(40)}},
        {"addrs": "own-without-p2p"},
        {"addrs": ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWSomebodyElse"]},
        {"models": ["m"] * 17},
        {"role": "emperor"},
        {"meta": {"tiny": {"chat": "yes"}}},
        {"meta": {"tiny": {"span": [0, 40], "layers": 30}}},  # past the model's last layer
        {"meta": {"tiny": {"span": [10, 10], "layers": 30}}},  # empty
        {"meta": {"tiny": {"span": [-1, 10]}}},
        {"meta": {"tiny": {"span": [0, 10, 20]}}},
        {"meta": {"tiny": {"span": [0.0, 10]}}},
        {"meta": {"tiny": {"span": [False, True]}}},
        {"meta": {"tiny": {"span": "0:10"}}},
        {"meta": {"tiny": {"layers": 0}}},
        {"meta": {"tiny": {"layers": 10**9}}},
        {"meta": {"tiny": {"hidden": 576.0}}},
        {"meta": {"tiny": {"hidden": -576}}},
        {"meta": {"tiny": {"forward": "yes"}}},
    ],
)
def test_heartbeats_with_content_routing_cannot_use_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(heartbeat.InvalidHeartbeat):
        heartbeat.parse(beat(**changes))


def test_a_well_formed_heartbeat_passes() -> None:
    parsed = heartbeat.parse(beat(meta={"tiny": {"fingerprint": "sha256:" + "0" * 64, "chat": False}}))
    assert parsed.load["capacity"] == 4 and parsed.meta["tiny"]["chat"] is False
    assert parsed.meta["tiny"] == {"fingerprint": "sha256:" + "0" * 64, "chat": False}


def test_a_span_workers_heartbeat_keeps_its_span_and_load() -> None:
    load = {"sessions": 2, "max_sessions": 64, "running": 2, "capacity": 64, "kv_cache_mb": 12.5, "kv_cache_budget_mb": 1024.0}
    meta = {"smollm2": {"fingerprint": "sha256:" + "1" * 64, "chat": True, "span": [10, 20], "layers": 30, "hidden": 576, "forward": True, "future": [1]}}
    parsed = heartbeat.parse(beat(models=["smollm2"], load=load, meta=meta))
    assert parsed.meta["smollm2"] == {"fingerprint": "sha256:" + "1" * 64, "chat": True, "span": [10, 20], "layers": 30, "hidden": 576, "forward": True}
    assert parsed.load == load
    # Without ``layers`` a span is still bounded; a full worker's [0, layers] passes.
    assert heartbeat.parse(beat(meta={"tiny": {"span": [0, 2]}})).meta["tiny"]["span"] == [0, 2]
    assert heartbeat.parse(beat(meta={"tiny": {"span": [0, 30], "layers": 30}})).meta["tiny"]["layers"] == 30


# --- the gateway, with whatever survived validation ------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

load_values = st.one_of(st.integers(-5, 2**60), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.booleans(), st.none(), st.lists(st.integers(-5, 5), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    load=st.dictionaries(st.sampled_from(["running", "queued", "capacity", "uptime_s", "state", "tokens_per_second", "x"]), load_values, max_size=5),
    addrs=st.lists(st.sampled_from(["own", "/ip4/127.0.0.1/tcp/1", "garbage", "/p2p/12D3KooWx", ""]), max_size=3),
    meta=st.dictionaries(
        st.sampled_from(["tiny", "other", ""]),
        st.dictionaries(
            st.sampled_from(["fingerprint", "chat", "span", "layers", "hidden", "forward"]),
            st.one_of(load_values, st.lists(st.integers(-2, 40), min_size=2, max_size=2), st.sampled_from(["sha256:x", True])),
            max_size=6,
        ),
        max_size=2,
    ),
)
async def test_no_heartbeat_that_passes_validation_makes_the_gateway_answer_500(load: dict, addrs: list, meta: dict) -> None:
    import httpx

    from gateway.app import Gateway, create_app

    from .test_gateway_unit import FakeClient, table_with

    me = generate()
    own = f"/ip4/127.0.0.1/tcp/1/p2p/{me.peer_id}"
    data = heartbeat.make(me, 1, role="worker", models=["tiny"], addrs=[own if a == "own" else a for a in addrs], load=load, meta=meta)
    table = table_with("a")
    try:
        beat = heartbeat.parse(data)
    except heartbeat.InvalidHeartbeat:
        beat = None
    if beat is not None:
        table.register({"peer_id": beat.peer_id, "models": beat.models, "addrs": beat.addrs, "expires": 2**40})
        table.heartbeat(beat.peer_id, models=beat.models, load=beat.load, addrs=beat.addrs, meta=beat.meta)
    from collections import defaultdict

    client = FakeClient(defaultdict(lambda: "dial", {"/addr/a": "ok"}))  # the gossiped node can't be dialed
    app = create_app(Gateway(table, client))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        for _ in range(3):  # p2c may pick either node
            response = await http.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 2})
            assert response.status_code in {200, 502, 503}, response.text
        for path in ("/api/nodes", "/v1/models", "/api/spans"):
            response = await http.get(path)
            assert response.status_code == 200, response.text
        response = await http.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 2, "route": "spans"})
        assert response.status_code in {502, 503}, response.text


async def test_a_chunked_body_over_the_limit_is_refused_without_reading_it_all() -> None:
    import httpx

    from gateway.app import MAX_BODY, Gateway, create_app

    from .test_gateway_unit import FakeClient, table_with

    sent = 0

    async def chunks():  # type: ignore[no-untyped-def]
        nonlocal sent
        for _ in range(3 * 1024):  # 3 MiB in 1 KiB chunks, no Content-Length
            sent += 1024
            yield b" " * 1024

    app = create_app(Gateway(table_with("a"), FakeClient({"/addr/a": "ok"})))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
        response = await http.post("/api/generate", content=chunks())
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
        assert sent <= MAX_BODY + 64 * 1024  # it stopped reading at the limit
        small = await http.post("/api/generate", content=_once(b'{"prompt": "hi", "max_new_tokens": 2}'))
        assert small.status_code == 200, small.text
        huge_k = await http.post("/api/generate", json={"prompt": "hi", "top_k": 10**23})
        assert huge_k.status_code == 400 and "top_k" in huge_k.json()["error"]["message"]


async def _once(body: bytes):  # type: ignore[no-untyped-def]
    yield body


# --- settings that would only fail later are refused at start --------------------------


@pytest.mark.parametrize(
    "command, fragment",
    [
        (["-m", "gateway", "--max-attempts", "0"], "--max-attempts must be at least 1"),
        (["-m", "gateway", "--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["-m", "gateway", "--ttl", "-1"], "--ttl must be positive"),
        (["-m", "dllm_p2p", "worker", "--model", "tiny", "--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["-m", "dllm_p2p", "worker", "--model", "tiny", "--record-ttl", "1"], "--record-ttl"),
        (["-m", "dllm_p2p", "worker", "--model", "tiny", "--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_impossible_settings_are_refused_with_one_clear_line(tmp_path: Any, command: list[str], fragment: str) -> None:
    import subprocess
    import sys

    from .procs import offline_env

    result = subprocess.run(
        [sys.executable, *command, "--data-dir", str(tmp_path)], env=offline_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_deregister_without_a_key_refuses_instead_of_minting_one(tmp_path: Any) -> None:
    from .procs import run_cli

    result = run_cli("deregister", "--data-dir", str(tmp_path))
    assert result.returncode == 2 and "node.key" in result.stderr and "no node to deregister" in result.stderr
    assert not (tmp_path / "node.key").exists()


def test_registry_show_and_nodes_leave_no_temporary_folders(tmp_path: Any) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from .procs import offline_env

    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "blockchain.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**offline_env(), "TMPDIR": str(scratch)}
    for args in (["registry", "show", str(example)], ["nodes", "--registry", str(example)]):
        result = subprocess.run([sys.executable, "-m", "dllm_p2p", *args], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
    assert list(scratch.iterdir()) == []


def test_the_wheel_carries_every_module_and_the_page(tmp_path: Any) -> None:
    """An installed gateway serves the page: frontend/ ships as gateway.frontend."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import shutil

    root = Path(__file__).resolve().parent.parent
    source = tmp_path / "src"  # a copy: building leaves build/ behind in the tree it builds
    shutil.copytree(root, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "tests", "test-artifacts", "docs", "benchmarks"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("dllm_p2p-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(root)) for pkg in ("dllm_p2p", "gateway") for p in (root / pkg).rglob("*.py")}
    expected |= {"gateway/frontend/" + str(p.relative_to(root / "frontend")) for p in (root / "frontend").rglob("*") if p.is_file()}
    assert expected <= names, sorted(expected - names)


# --- liveness on the receiver's clock, bounded per-peer state ---------------------------


def test_liveness_is_measured_on_our_clock_and_tolerates_a_slow_sender() -> None:
    from dllm_p2p.membership import Membership, MembershipConfig
    from dllm_p2p.registry.store import ChainStore

    m = Membership(generate(), MembershipConfig(heartbeat_interval=1.0), ChainStore("/nonexistent-dllm-test"))
    slow = generate()
    now = time.time()

    def arrive(sent_by_sender: float, arrival: float, seq: int) -> heartbeat.Heartbeat:
        beat = heartbeat.parse(heartbeat.make(slow, seq, role="worker", models=[], addrs=[], load={}, now=sent_by_sender), now=arrival)
        stamped = m._stamp(beat, arrival)
        m.last_seen[stamped.peer_id] = stamped
        return stamped

    # Its clock is 5 minutes slow: the first heartbeat counts from its own stamp (it could
    # be a replay), the second from when it was really sent, on our clock.
    first = arrive(now - 300, now, 1)
    assert not m.online(first.peer_id, now=now)
    second = arrive(now - 298, now + 2, 2)
    assert second.seen_at == pytest.approx(now + 2) and m.online(second.peer_id, now=now + 2)
    # A heartbeat that arrives 20 s late counts from when it was sent (give or take the
    # second a peer's offset may drift per heartbeat).
    late = arrive(now - 296, now + 24, 3)
    assert late.seen_at == pytest.approx(now + 4 + 1, abs=0.01) and not m.online(late.peer_id, now=now + 24)


def test_per_peer_state_of_membership_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import dllm_p2p.membership as membership_module
    from dllm_p2p.membership import Membership, MembershipConfig
    from dllm_p2p.registry.store import ChainStore

    monkeypatch.setattr(membership_module, "MAX_PEERS_TRACKED", 20)
    m = Membership(generate(), MembershipConfig(), ChainStore("/nonexistent-dllm-test"))

    class Subscription:
        def __init__(self, messages: list) -> None:
            self.messages = messages

        def __aiter__(self):  # type: ignore[no-untyped-def]
            return self

        async def __anext__(self):  # type: ignore[no-untyped-def]
            if not self.messages:
                raise StopAsyncIteration
            return self.messages.pop(0)

    keys = [generate() for _ in range(100)]
    messages = [type("Msg", (), {"data": heartbeat.make(k, 1, role="gateway", models=[], addrs=[], load={}), "from_id": k.peer_id.to_bytes()})() for k in keys]
    trio.run(m._consume_heartbeats, Subscription(messages))
    assert len(m.last_seen) == 20 and len(m._offsets) == 20
    assert keys[-1].peer_id.to_base58() in m.last_seen and keys[0].peer_id.to_base58() not in m.last_seen


async def test_chain_fetches_are_bounded_at_once_and_per_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh keys announcing heads must not start unbounded fetches: at most MAX_FETCHES
    at once, one per peer, and a peer prompting a fetch without a new head waits 30 s."""
    import trio.testing

    import dllm_p2p.membership as membership_module
    from dllm_p2p.membership import Membership, MembershipConfig
    from dllm_p2p.registry.store import ChainStore

    m = Membership(generate(), MembershipConfig(), ChainStore("/nonexistent-dllm-test"))
    running, most, fetched = 0, 0, []
    release = trio.Event()

    async def fetch(addr: str) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        fetched.append(addr)
        await release.wait()
        running -= 1

    monkeypatch.setattr(m, "_fetch_chain", fetch)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(m._fetch_from_peer, f"peer{i}", [f"/addr/{i}"], f"head{i}")
                nursery.start_soon(m._fetch_from_peer, f"peer{i}", [f"/addr/{i}"], f"head{i}")  # twice at once
            await trio.testing.wait_all_tasks_blocked()
            assert most == membership_module.MAX_FETCHES and len(fetched) == membership_module.MAX_FETCHES
            release.set()
        done = fetched[0].rsplit("/", 1)[1]  # one that was fetched (trio starts tasks in any order)
        fetched.clear()
        await m._fetch_from_peer(f"peer{done}", [f"/addr/{done}"])  # no new head: too soon to ask again
        await m._fetch_from_peer(f"peer{done}", [f"/addr/{done}"], "head-new")  # a new head: at once
    assert fetched == [f"/addr/{done}"]


def test_the_client_keeps_a_bounded_number_of_idle_streams_per_peer() -> None:
    from dllm_p2p.client import MAX_IDLE_PER_PEER, Client

    client = Client(host=None)  # type: ignore[arg-type]
    kept = [client._put_idle("peer", object(), None) for _ in range(MAX_IDLE_PER_PEER + 3)]  # type: ignore[arg-type]
    assert kept.count(True) == MAX_IDLE_PER_PEER and len(client._idle["peer"]) == MAX_IDLE_PER_PEER
