"""A real network on 127.0.0.1: three workers that know one bootstrap address, a gateway.

The tests run in file order and share one network: the later ones kill workers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dllm_p2p.registry.chain import verify_chain

from .procs import HEARTBEAT, TTL, LocalNetwork, fast_network, get_json, run_cli, start_worker, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    with fast_network(tmp_path_factory.mktemp("net"), 3) as network:
        yield network


def peer_of(addr: str) -> str:
    return addr.rsplit("/", 1)[1]


def online_peers(net: LocalNetwork) -> set[str]:
    return {n["peer_id"] for n in get_json(f"{net.url}/api/nodes")["nodes"] if n["online"]}


def test_every_worker_sees_the_others_through_one_bootstrap(net: LocalNetwork) -> None:
    peers = {peer_of(a) for a in net.worker_addrs}
    # Ask through the *last* worker, which only ever dialed the first one.
    result = run_cli("nodes", "--bootstrap", net.worker_addrs[-1], "--json", "--wait", "3", "--ttl", str(TTL))
    assert result.returncode == 0, result.stderr
    listed = {row["peer_id"]: row for row in json.loads(result.stdout)}
    assert peers <= set(listed)
    for peer in peers:
        row = listed[peer]
        assert row["online"] is True and row["models"] == ["tiny"] and row["addrs"]
        assert isinstance(row["last_seen"], float)

    # The registry replicated: every worker's own blockchain.json verifies and lists all three.
    def replicated() -> bool:
        for i in range(len(net.worker_addrs)):
            path = net.data_dir / f"worker-{i + 1}" / "blockchain.json"
            if not path.exists() or set(verify_chain(path.read_bytes()).nodes()) < peers:
                return False
        return True

    wait_for(replicated, 30, "every worker's chain to list all three workers")
    cid = (net.data_dir / "worker-1" / "current_cid.txt").read_text().strip()
    assert cid.startswith("Qm") and len(cid) == 46


def test_generate_json_and_stream(net: LocalNetwork) -> None:
    with httpx.Client(base_url=net.url, timeout=60) as http:
        # 48 tokens: tiny makes one in about 2 ms and a worker sends a token frame at most
        # every 10 ms, so 8 tokens could all arrive in one frame.
        body = http.post("/api/generate", json={"prompt": "Hello", "max_new_tokens": 48, "min_new_tokens": 48, "temperature": 0}).json()
        assert body["usage"]["completion_tokens"] == 48 and body["node"] in {peer_of(a) for a in net.worker_addrs}
        events: list[tuple[str, dict]] = []
        with http.stream("POST", "/api/generate", json={"prompt": "Hello", "max_new_tokens": 48, "min_new_tokens": 48, "temperature": 0, "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    events.append((event, json.loads(line[6:])))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("token") >= 2
    assert "".join(d["text"] for k, d in events if k == "token") == events[-1][1]["text"] == body["text"]
    # Both answers carry the worker's signature, which holds for their text.
    from dllm_p2p.answers import check

    for answer in (body, events[-1][1]):
        assert check(answer["signature"], text=answer["text"], peer_id=answer["node"])["model"] == "tiny"


def test_openai_client_works_by_changing_the_base_url(net: LocalNetwork) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{net.url}/v1", api_key="unused", max_retries=0)
    models = [m.id for m in client.models.list()]
    assert models == ["tiny"]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0, stream=True)
        if chunk.choices
    ]
    assert "".join(pieces) == chat.choices[0].message.content
    completion = client.completions.create(model="tiny", prompt="Once", max_tokens=4)
    assert completion.choices[0].finish_reason in {"stop", "length"}
    # The signed statement rides in a header (and on the last chunk when streaming).
    import base64

    from dllm_p2p.answers import check

    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0)
    signature = json.loads(base64.b64decode(raw.headers["x-dllm-signature"]))
    parsed = raw.parse()
    assert check(signature, text=parsed.choices[0].message.content, peer_id=parsed.model_extra["node"])["peer_id"] == parsed.model_extra["node"]
    last = [c for c in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0, stream=True)][-1]
    assert check(last.model_extra["signature"], text=chat.choices[0].message.content)["model"] == "tiny"


def test_killing_the_chosen_worker_fails_over_and_is_reported_offline(net: LocalNetwork) -> None:
    with httpx.Client(base_url=net.url, timeout=60) as http:
        first = http.post("/api/generate", json={"prompt": "Hi", "max_new_tokens": 4}).json()
        victim = first["node"]
        index = [peer_of(a) for a in net.worker_addrs].index(victim)
        net.children[index].kill()  # SIGKILL: no deregister, no goodbye
        # The gateway still believes the victim is online; whichever node it picks, the
        # request must succeed (on another node if it picked the dead one).
        for _ in range(3):
            after = http.post("/api/generate", json={"prompt": "Hi", "max_new_tokens": 4})
            assert after.status_code == 200, after.text
            assert after.json()["node"] != victim
    started = time.monotonic()
    wait_for(lambda: victim not in online_peers(net), TTL + 10, "the killed worker to be reported offline")
    assert time.monotonic() - started <= TTL + 10
    result = run_cli("nodes", "--bootstrap", net.worker_addrs[(index + 1) % 3], "--json", "--wait", "3", "--ttl", str(TTL))
    listed = {row["peer_id"]: row for row in json.loads(result.stdout)}
    assert listed[victim]["online"] is False
    assert sum(row["online"] for row in listed.values() if row["role"] == "worker") == 2


def test_a_restarted_worker_is_online_again_within_one_ttl(net: LocalNetwork) -> None:
    """The worker SIGKILLed above comes back on the same data dir (same peer id) while
    the gateway keeps running: its new heartbeats must not be taken for replays."""
    index = next(i for i, child in enumerate(net.children[:-1]) if not child.alive())
    victim = peer_of(net.worker_addrs[index])
    boot = net.worker_addrs[(index + 1) % 3]
    child, addr = start_worker(
        net.data_dir / f"worker-{index + 1}", "--bootstrap", boot, "--heartbeat-interval", HEARTBEAT, name="restarted"
    )
    net.children[index] = child
    assert peer_of(addr) == victim
    wait_for(lambda: victim in online_peers(net), TTL, "the restarted worker to be online at the gateway")


def test_no_live_node_gives_a_503_naming_the_model(net: LocalNetwork) -> None:
    with httpx.Client(base_url=net.url, timeout=60) as http:
        other = http.post("/api/generate", json={"prompt": "Hi", "model": "gpt-j"})
        assert other.status_code == 503 and "gpt-j" in other.json()["error"]["message"]
        for child in net.children[:-1]:  # every worker, one after the other; the gateway is last
            child.stop()
        wait_for(lambda: not online_peers(net), TTL + 10, "no worker online")
        response = http.post("/api/generate", json={"prompt": "Hi", "model": "tiny"})
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "no live node serves model 'tiny'"
    # The stopped workers (the restarted one too) deregistered and the gateway learned it.
    def registered() -> set[str]:
        return {r["peer_id"] for r in get_json(f"{net.url}/api/registry")["nodes"] if r.get("role", "worker") == "worker"}

    try:
        wait_for(lambda: not registered(), 40, "every worker to be deregistered at the gateway")
    except AssertionError:
        raise AssertionError(f"still registered: {registered()}\n" + "\n".join(c.output(30) for c in net.children)) from None


def test_nodes_lists_a_relay_it_is_connected_to_as_online_before_its_slow_heartbeat(tmp_path: Path) -> None:
    """A relay beats every 30 s by default: `nodes --wait 2` rarely hears it, but the
    connection it holds to the relay proves the relay alive."""
    import sys

    from .procs import Child, offline_env

    relay = Child([sys.executable, "-m", "dllm_p2p", "relay", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(tmp_path / "relay"), "--no-mdns"], name="relay", env=offline_env())
    try:
        addr = relay.wait_for_line(r"^listening on (/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)", timeout=60).group(1)
        peer = addr.rsplit("/", 1)[1]
        relay.wait_for_line(r"registry published", timeout=60, stream="err")
        # Not a wait for an event: the scenario is a relay whose last heartbeat is older
        # than GossipSub's replay window (3 s), as it is 27 s of every 30.
        time.sleep(5)
        listing = run_cli("nodes", "--bootstrap", addr, "--json", "--wait", "2", timeout=60)
        assert listing.returncode == 0, listing.stderr
        rows = {row["peer_id"]: row for row in json.loads(listing.stdout)}
        assert rows[peer]["role"] == "relay" and rows[peer]["online"] is True, listing.stdout + listing.stderr
    finally:
        relay.stop()
