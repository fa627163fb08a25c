"""A hostile peer against a running gateway process: it registers properly, then answers
with every kind of broken frame, gossips malformed heartbeats and announcements, and
serves forged chains. The gateway must answer every HTTP request with a status that
says what happened (never a 500), keep running, and keep its registry."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import trio
from libp2p.custom_types import TProtocol

from dllm_p2p import answers, heartbeat, wire
from dllm_p2p.host import host_addrs, make_host, parse_multiaddr
from dllm_p2p.identity import generate
from dllm_p2p.membership import REGISTRY_PROTOCOL, REGISTRY_TOPIC, Membership, MembershipConfig
from dllm_p2p.registry.store import ChainStore

from .procs import get_json, start_gateway

pytestmark = pytest.mark.integration

FINGERPRINT = "sha256:" + "0" * 64


def signed_done(me: Any, body: bytes, text: str, **changes: Any) -> dict[str, Any]:
    usage = {"prompt_tokens": 2, "completion_tokens": 1}
    done = {"type": "done", "text": text, "model": "tiny", "fingerprint": FINGERPRINT, "finish_reason": "stop", "usage": usage,
            "signature": answers.sign(me, request_body=body, request_id=None, text=text, token_ids=[1], model="tiny",
                                      fingerprint=FINGERPRINT, finish_reason="stop", usage=usage)}
    return {**done, **changes}


def cases(me: Any) -> list[Any]:
    """Each case turns the request body into the bytes the hostile worker answers with."""
    frame = wire.encode_frame
    return [
        lambda body: frame({"text": "no type"}),
        lambda body: frame({"type": "done", "text": "x", "usage": {"prompt_tokens": -1}}),
        lambda body: frame({"type": "token", "text": "partial"}) + b"\xff\xfe garbage",
        lambda body: wire.encode_uvarint(2**40) + b"x",
        lambda body: frame({"type": "token", "text": "x"})[:-1],
        lambda body: frame(signed_done(me, body, "ok", usage={"prompt_tokens": 2, "completion_tokens": -5})),
        lambda body: frame(signed_done(me, body, "ok")),  # a proper answer: 200
        lambda body: frame({"type": "error", "code": "teapot", "message": "m" * 100_000}),
        lambda body: frame({"type": "token", "text": 12}),
        lambda body: b"",
        lambda body: frame(signed_done(me, body, "ok", tokens=["a"])),
        lambda body: wire.encode_uvarint(3) + msgpack.packb([1, 2]),
        lambda body: bytes(random.Random(len(body)).getrandbits(8) for _ in range(64)),
        lambda body: frame(signed_done(me, body, "signed for another text", text="what was sent")),
        lambda body: frame(signed_done(me, body + b"!", "ok")),  # signed for another request
        lambda body: frame({"type": "done", "text": "x", "timing": {"total_ms": float("nan")}}),
        lambda body: frame({"type": "done", "text": "x", "finish_reason": ["stop"]}),
    ]


def hostile_gossip(rng: random.Random, me: Any) -> list[tuple[str, bytes]]:
    peer = me.peer_id.to_base58()
    return [
        (heartbeat.TOPIC, msgpack.packb({"peer_id": peer, "load": {"capacity": "x"}})),
        (heartbeat.TOPIC, heartbeat.make(me, 10**15, role="worker", models=["tiny"], addrs=["/ip4/127.0.0.1/tcp/1"], load={})),
        (heartbeat.TOPIC, heartbeat.make(me, 10**15 + 1, role="worker", models=["tiny"], addrs=[], load={"capacity": 0})),
        (heartbeat.TOPIC, bytes(rng.getrandbits(8) for _ in range(200))),
        (REGISTRY_TOPIC, msgpack.packb({"head": "%064x" % rng.getrandbits(256), "addrs": ["garbage"] * 100})),
        (REGISTRY_TOPIC, msgpack.packb({"head": 5})),
    ]


async def test_a_hostile_worker_never_makes_the_running_gateway_answer_500(tmp_path: Path) -> None:
    rng = random.Random(11)
    me = generate()
    membership = Membership(
        me, MembershipConfig(role="worker", heartbeat_interval=1.0), ChainStore(tmp_path / "hostile"),
        models=lambda: ["tiny"], load=lambda: {"running": 0, "capacity": 4},
        model_info=lambda: {"tiny": {"fingerprint": FINGERPRINT, "chat": False}},
    )
    host = make_host(me)
    pending = cases(me)
    statuses: list[int] = []

    async def answer(stream: Any) -> None:
        try:
            reader = wire.FrameReader(stream, wire.MAX_REQUEST_FRAME)
            await reader.read_frame()
            reply = pending[len(statuses) % len(pending)](reader.last_body)
            if reply:
                await stream.write(reply)
            await stream.close()
        except Exception:
            await stream.reset()

    async def forged_chain(stream: Any) -> None:
        try:
            doc = membership.chain.to_dict()
            doc["blocks"][-1]["record"]["models"] = ["forged"]
            await stream.write(wire.encode_frame({"type": "chain", "head": "f" * 64, "data": msgpack.packb(doc)}))
            await stream.close()
        except Exception:
            await stream.reset()

    host.set_stream_handler(TProtocol(wire.GENERATE_PROTOCOL), answer)
    async with host.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]), trio.open_nursery() as nursery:
        await nursery.start(membership.run, host)
        addr = host_addrs(host)[0]
        gateway, url = await trio.to_thread.run_sync(
            lambda: start_gateway(tmp_path / "gateway", "--bootstrap", addr, "--heartbeat-interval", "1", "--audit-rate", "0")
        )
        try:
            with trio.fail_after(60):
                while not any(n["online"] and n["registered"] for n in (await trio.to_thread.run_sync(get_json, f"{url}/api/nodes"))["nodes"]):
                    await trio.sleep(0.2)
            head = membership.chain.head
            host.set_stream_handler(TProtocol(REGISTRY_PROTOCOL), forged_chain)  # from now on, forged chains
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                for i in range(2 * len(pending)):
                    for topic, data in hostile_gossip(rng, me):
                        await membership.pubsub.publish(topic, data)
                    response = await http.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 2, "stream": i % 2 == 1})
                    statuses.append(response.status_code)
                    assert response.status_code in {200, 502, 503, 504}, (i, response.text)
                    assert "Traceback" not in response.text
                    for path in ("/api/nodes", "/v1/models", "/api/registry", "/api/audits", "/healthz"):
                        assert (await http.get(path)).status_code == 200, path
                registry = (await http.get("/api/registry")).json()
            assert gateway.alive(), gateway.output()
            assert 200 in statuses and 502 in statuses  # the proper answers got through, the rest failed cleanly
            assert registry["head"] == head  # the forged chains changed nothing
            assert not any("forged" in n["models"] for n in registry["nodes"])
        finally:
            await trio.to_thread.run_sync(gateway.stop)
            nursery.cancel_scope.cancel()
