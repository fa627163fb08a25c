"""Faults and access control over real processes on 127.0.0.1."""

from __future__ import annotations

import json
import secrets
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest
import trio
from libp2p.custom_types import TProtocol

from dllm_p2p import wire
from dllm_p2p.client import ClientError, DialError, open_client
from dllm_p2p.identity import generate
from dllm_p2p.membership import REGISTRY_PROTOCOL
from dllm_p2p.registry.chain import Chain, make_record, verify_chain

from .procs import get_json, start_gateway, start_worker, wait_online

pytestmark = pytest.mark.integration

LONG = {"prompt": "Tell me a long story", "max_new_tokens": 400, "min_new_tokens": 400, "stream": True}


async def test_worker_killed_mid_stream_fails_the_stream_without_hanging(tmp_path: Path) -> None:
    proc, addr = start_worker(tmp_path)
    try:
        async with open_client() as client:
            with trio.fail_after(30):  # a hang is the failure this test exists for
                with pytest.raises(ClientError):
                    async with aclosing(client.generate(addr, LONG)) as frames:
                        async for frame in frames:
                            if frame["type"] == "token":
                                proc.kill()  # SIGKILL, mid-generation
    finally:
        proc.kill()


def test_gateway_relays_a_mid_stream_death_as_an_error_event(tmp_path: Path) -> None:
    worker, addr = start_worker(tmp_path / "w", "--heartbeat-interval", "1")
    gateway, url = start_gateway(tmp_path / "g", "--bootstrap", addr, "--heartbeat-interval", "1")
    try:
        wait_online(url, 1)
        events = []
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30)) as http:
            with http.stream("POST", "/api/generate", json=LONG) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        events.append(line[7:])
                        if events == ["token"]:
                            worker.kill()
        assert events[0] == "token" and events[-1] == "error"
    finally:
        gateway.stop()
        worker.kill()


async def test_private_network_refuses_peers_without_the_key(tmp_path: Path) -> None:
    psk = secrets.token_hex(32)
    proc, addr = start_worker(tmp_path, "--psk", psk)
    try:
        async with open_client(connect_timeout=5) as outsider:
            with trio.fail_after(30), pytest.raises(DialError):
                await outsider.info(addr)
        async with open_client(psk=psk) as member:
            done = await member.complete(addr, {"prompt": "hi", "max_new_tokens": 3})
        assert done["type"] == "done"
    finally:
        proc.stop()


async def test_a_peer_serving_a_forged_chain_is_ignored(tmp_path: Path) -> None:
    """A bootstrap peer hands out a chain whose record was altered after signing."""
    evil = generate()
    record = make_record(evil, "register", ["/ip4/127.0.0.1/tcp/1"], ["tiny"], seq=1, ttl=600)
    forged = json.loads(Chain().append(record).to_json())
    forged["blocks"][1]["record"]["models"] = ["gpt-5"]  # signature no longer matches
    forged_bytes = json.dumps(forged).encode()

    async with open_client(identity=evil) as host:
        async def serve_forged(stream) -> None:  # type: ignore[no-untyped-def]
            await stream.write(wire.encode_frame({"type": "chain", "head": "x", "data": forged_bytes}))
            await stream.close()

        host.host.set_stream_handler(TProtocol(REGISTRY_PROTOCOL), serve_forged)
        evil_addr = str(host.host.get_addrs()[0])
        proc, addr = await trio.to_thread.run_sync(lambda: start_worker(tmp_path, "--bootstrap", evil_addr))
        try:
            await trio.to_thread.run_sync(lambda: proc.wait_for_line("ignoring an invalid chain", stream="err", timeout=60))
            done = await host.complete(addr, {"prompt": "hi", "max_new_tokens": 3})
            assert done["type"] == "done"
        finally:
            proc.stop()
    chain = verify_chain((tmp_path / "blockchain.json").read_bytes())
    assert evil.peer_id.to_base58() not in chain.nodes()


def test_gateway_killed_comes_back_with_its_registry(tmp_path: Path) -> None:
    worker, addr = start_worker(tmp_path / "w", "--heartbeat-interval", "1")
    try:
        gateway, url = start_gateway(tmp_path / "g", "--bootstrap", addr, "--heartbeat-interval", "1")
        wait_online(url, 1)
        head = get_json(f"{url}/api/registry")["head"]
        gateway.kill()  # SIGKILL: no chance to flush anything
        saved = verify_chain((tmp_path / "g" / "blockchain.json").read_bytes())
        assert saved.head == head and len(saved.nodes()) == 1
        assert not list((tmp_path / "g").glob(".blockchain.json.*"))  # no half-written temp
        # Restarted without --bootstrap, it still knows the worker from its saved registry.
        gateway, url = start_gateway(tmp_path / "g", "--heartbeat-interval", "1")
        wait_online(url, 1)
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.post("/api/generate", json={"prompt": "hi", "max_new_tokens": 3}).status_code == 200
        gateway.stop()
    finally:
        worker.stop()


def test_api_keys_rate_limits_and_allow_list(tmp_path: Path) -> None:
    worker, addr = start_worker(tmp_path / "w", "--heartbeat-interval", "1")
    other = generate().peer_id.to_base58()
    try:
        gateway, url = start_gateway(
            tmp_path / "g", "--bootstrap", addr, "--heartbeat-interval", "1",
            "--api-key", "s3cret-key", "--rate-limit", "0.5", "--rate-burst", "2",
        )
        locked, locked_url = start_gateway(tmp_path / "g2", "--bootstrap", addr, "--heartbeat-interval", "1", "--allow-peer", other)
        try:
            wait_online(url, 1)
            body = {"prompt": "hi", "max_new_tokens": 2}
            with httpx.Client(base_url=url, timeout=60) as http:
                assert http.post("/api/generate", json=body).status_code == 401
                assert http.post("/api/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
                auth = {"Authorization": "Bearer s3cret-key"}
                codes = [http.post("/api/generate", json=body, headers=auth).status_code for _ in range(4)]
                assert codes[:2] == [200, 200] and 429 in codes[2:]
                assert http.get("/healthz").status_code == 200  # reads stay open
            assert not any("s3cret-key" in line for line in gateway.stdout + gateway.stderr)
            wait_online(locked_url, 1)
            with httpx.Client(base_url=locked_url, timeout=60) as http:
                refused = http.post("/api/generate", json=body)
            assert refused.status_code == 503  # the only worker is not on the allow-list
        finally:
            gateway.stop()
            locked.stop()
    finally:
        worker.stop()
