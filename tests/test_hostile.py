"""Hostile input on every surface that parses bytes from the network: property tests."""

from __future__ import annotations

import json
import random

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllm_p2p import heartbeat, wire
from dllm_p2p.identity import generate
from dllm_p2p.membership import parse_announcement
from dllm_p2p.registry.chain import Chain, RegistryError, make_record, verify_chain
from gateway.app import Gateway, create_app
from gateway.nodes import NodeTable

from .test_gateway_unit import FakeClient, table_with

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["prompt", "model", "max_new_tokens", "temperature", "top_p", "seed", "stream", "x"]), json_values, max_size=6))
async def test_gateway_answers_any_json_body_with_a_status_never_a_500(body: dict) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(Gateway(table_with("a"), FakeClient({"/addr/a": "ok"})))), base_url="http://gw") as http:  # type: ignore[arg-type]
        for path in ("/api/generate", "/v1/completions", "/v1/chat/completions"):
            response = await http.post(path, content=json.dumps(body).encode())
            assert response.status_code in {200, 400, 413, 503}, (path, body, response.text)
            assert "Traceback" not in response.text


@pytest.mark.parametrize(
    "raw",
    [b"", b"null", b"[]", b'"str"', b"{" * 5000 + b"}" * 5000, b'{"prompt": "\\ud800"}', b'{"prompt": "x", "prompt": 1}', "{\"prompt\": \"é\u0000\U0001F600\"}".encode()],
    ids=["empty", "null", "list", "string", "deep", "lone-surrogate", "duplicate-key", "unicode"],
)
async def test_gateway_survives_malformed_json(raw: bytes) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(Gateway(table_with("a"), FakeClient({"/addr/a": "ok"})))), base_url="http://gw") as http:  # type: ignore[arg-type]
        response = await http.post("/api/generate", content=raw)
    assert response.status_code in {200, 400, 413}
    assert "error" in response.json() or "text" in response.json()


def test_deep_and_huge_msgpack_frames_are_refused_within_limits() -> None:
    deep = b"\x91" * 100_000 + b"\xc0"  # 100k nested one-element arrays
    with pytest.raises(wire.WireError):
        wire.decode_body(deep)
    huge_map = msgpack.packb({f"k{i}": i for i in range(5000)})
    with pytest.raises(wire.WireError, match="unknown request keys"):
        wire.parse_request(wire.decode_body(huge_map))
    lying = b"\xdd\xff\xff\xff\xff"  # claims a 4-billion-element array in 5 bytes
    with pytest.raises(wire.WireError):
        wire.decode_body(lying)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_gossip_parsers_reject_random_bytes_cleanly(data: bytes) -> None:
    with pytest.raises(heartbeat.InvalidHeartbeat):
        heartbeat.parse(data)
    try:
        parse_announcement(data)
    except ValueError:
        pass


def test_heartbeats_are_checked_for_signature_sender_and_age() -> None:
    me, other = generate(), generate()
    good = heartbeat.make(me, 1, role="worker", models=["tiny"], addrs=[], load={"running": 0})
    assert heartbeat.parse(good, sender=me.peer_id.to_base58()).models == ["tiny"]
    with pytest.raises(heartbeat.InvalidHeartbeat, match="published by another peer"):
        heartbeat.parse(good, sender=other.peer_id.to_base58())
    tampered = msgpack.unpackb(good)
    tampered["models"] = ["gpt-5"]
    with pytest.raises(heartbeat.InvalidHeartbeat, match="bad signature"):
        heartbeat.parse(msgpack.packb(tampered))
    stale = heartbeat.make(me, 2, role="worker", models=[], addrs=[], load={}, now=0)
    with pytest.raises(heartbeat.InvalidHeartbeat, match="from now"):
        heartbeat.parse(stale)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_registry_files_are_rejected_never_crash(data: st.DataObject) -> None:
    identity = generate()
    chain = Chain()
    for seq in (1, 2):
        chain = chain.append(make_record(identity, "register", ["/ip4/127.0.0.1/tcp/4001"], ["tiny"], seq=seq, ttl=600))
    text = bytearray(chain.to_json().encode())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(text) - 1))
        text[position] = data.draw(st.integers(0, 255))
    try:
        verified = verify_chain(bytes(text))
    except RegistryError:
        return
    # A mutation that still verifies can only have touched layout, not content.
    assert verified.head == chain.head


def test_random_json_documents_are_rejected_as_registries() -> None:
    rng = random.Random(5)
    for _ in range(300):
        doc = {"format": "dllm-registry/1", "blocks": [{"index": rng.randint(-1, 3), "prev": "0" * rng.choice([0, 64]), "record": {}}]}
        with pytest.raises(RegistryError):
            verify_chain(json.dumps(doc))


async def test_a_malformed_pubsub_rpc_ends_that_stream_not_the_node(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A peer's pubsub RPC that is not protobuf raised DecodeError out of py-libp2p's
    stream handler and stopped the whole node."""
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL_ID
    from libp2p.utils.varint import encode_varint_prefixed

    from dllm_p2p.host import host_addrs, make_host, parse_multiaddr, peer_info
    from dllm_p2p.membership import REGISTRY_PROTOCOL, Membership, MembershipConfig
    from dllm_p2p.registry.store import ChainStore

    node = Membership(generate(), MembershipConfig(role="observer", pow_bits=0), ChainStore(tmp_path / "node"))
    host, attacker = make_host(node.identity), make_host(generate())
    listen = [parse_multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with host.run(listen), attacker.run(listen), trio.open_nursery() as nursery:
        await nursery.start(node.run, host)
        target = peer_info(host_addrs(host)[0])
        with trio.fail_after(20):
            await attacker.connect(target)
            for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01", bytes(range(256))):
                stream = await attacker.new_stream(target.peer_id, [TProtocol(str(GOSSIPSUB_PROTOCOL_ID))])
                await stream.write(encode_varint_prefixed(garbage))
                try:
                    await stream.read(1)  # the node ends this stream
                except Exception:
                    pass
            # ...and is still up: it serves its chain.
            stream = await attacker.new_stream(target.peer_id, [TProtocol(REGISTRY_PROTOCOL)])
            assert await wire.FrameReader(stream, 1 << 20).read_frame() is not None
        nursery.cancel_scope.cancel()
