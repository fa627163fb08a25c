"""A model split across real worker processes: SmolLM2's 30 layers as spans 0:10, 10:20 and
20:30, a full worker beside them, a gateway, all on 127.0.0.1.

What must hold (issue: models bigger than any one node): a route of three spans gives,
token for token, the greedy answers of one full worker; killing the span in use while a
long answer streams still yields the whole identical answer, served by the survivor; a
middle span's worker holds well under half the memory of a full worker's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dllm_p2p.models import SMOLLM2_MISSING, find_smollm2

from .procs import Child, spawn_worker_with_layers, start_gateway, wait_online

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child.",
]


def rss_mib(child: Child) -> float:
    for line in Path(f"/proc/{child.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    if find_smollm2() is None:
        pytest.skip(SMOLLM2_MISSING)
    root = tmp_path_factory.mktemp("spans")
    children: list[Child] = []
    try:
        common = ["--threads", "1", "--heartbeat-interval", "1"]
        full, boot = spawn_worker_with_layers(root / "full", None, *common, name="full")
        children.append(full)
        spans = {}
        for name, layers in [("span-0:10", "0:10"), ("span-10:20", "10:20"), ("span-10:20-b", "10:20"), ("span-20:30", "20:30")]:
            # The middle spans take 40 ms more per step: a long answer lasts long enough to kill one.
            env = {"DLLM_FAULT": "slow-steps:40"} if layers == "10:20" else None
            child, addr = spawn_worker_with_layers(root / name, layers, *common, "--bootstrap", boot, name=name, env=env)
            children.append(child)
            spans[name] = (child, addr)
        gateway, url = start_gateway(root / "gateway", "--bootstrap", boot, "--heartbeat-interval", "1")
        children.append(gateway)
        wait_online(url, 1 + len(spans), timeout=300, children=children)
        yield {"url": url, "full": full, "full_addr": boot, "spans": spans}
    finally:
        for child in reversed(children):
            child.terminate()
        for child in reversed(children):
            child.stop(timeout=15)


def generate(url: str, prompt: str, **extra: object) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": 64, "temperature": 0, **extra}
    response = httpx.post(f"{url}/api/generate", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_three_spans_answer_token_for_token_like_one_full_worker(net: dict) -> None:
    peers = {name: addr.rsplit("/", 1)[1] for name, (_, addr) in net["spans"].items()}
    for prompt in PROMPTS:
        whole = generate(net["url"], prompt)
        routed = generate(net["url"], prompt, route="spans")
        assert routed["text"] == whole["text"], prompt
        assert routed["usage"] == whole["usage"] and routed["finish_reason"] == whole["finish_reason"]
        hops = routed["route"]
        assert [hop["span"] for hop in hops] == [[0, 10], [10, 20], [20, 30]]
        assert hops[0]["peer_id"] == peers["span-0:10"] and hops[2]["peer_id"] == peers["span-20:30"]
        assert hops[1]["peer_id"] in (peers["span-10:20"], peers["span-10:20-b"])
    spans = httpx.get(f"{net['url']}/api/spans", timeout=10).json()
    (model,) = [facts for facts in spans.values()]
    assert model["complete"] is True and model["layers"] == 30


def test_a_middle_span_holds_well_under_half_a_full_workers_memory(net: dict) -> None:
    """Each worker reports its resident memory and the share its model takes (what it holds
    beyond the ~400 MiB every worker process has before loading a model)."""
    peers = {"full": net["full_addr"], "middle": net["spans"]["span-10:20"][1]}
    ids = {name: addr.rsplit("/", 1)[1] for name, addr in peers.items()}

    def reported() -> dict[str, dict] | None:
        rows = {row["peer_id"]: row["load"] for row in httpx.get(f"{net['url']}/api/nodes", timeout=10).json()["nodes"]}
        loads = {name: rows.get(peer, {}) for name, peer in ids.items()}
        return loads if all("model_rss_mib" in load for load in loads.values()) else None

    deadline = time.monotonic() + 30
    while (loads := reported()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert loads is not None, "no memory figures in the heartbeats"
    full, middle = loads["full"], loads["middle"]
    print(
        f"resident memory: full worker {full['rss_mib']:.0f} MiB (model {full['model_rss_mib']:.0f}), "
        f"span 10:20 {middle['rss_mib']:.0f} MiB (model {middle['model_rss_mib']:.0f}): "
        f"{middle['model_rss_mib'] / full['model_rss_mib']:.0%} of the full worker's model memory"
    )
    assert middle["model_rss_mib"] < 0.5 * full["model_rss_mib"]
    assert middle["rss_mib"] < full["rss_mib"]
    assert rss_mib(net["spans"]["span-10:20"][0]) < rss_mib(net["full"])


def test_killing_the_middle_span_in_use_mid_answer_replays_to_the_other(net: dict, tmp_path: Path) -> None:
    url = net["url"]
    prompt = "Tell me a long story about a lighthouse keeper."
    expected = generate(url, prompt, route="spans", max_new_tokens=160, min_new_tokens=160)
    middles = {name: net["spans"][name] for name in ("span-10:20", "span-10:20-b")}
    peer_names = {addr.rsplit("/", 1)[1]: name for name, (_, addr) in middles.items()}
    body = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": 160, "min_new_tokens": 160, "temperature": 0, "route": "spans", "stream": True}
    pieces, final, killed = [], None, None
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=300) as response:
        assert response.status_code == 200
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line.split(":", 1)[1])
                if event == "token":
                    pieces.append(data["text"])
                    if killed is None and len(pieces) == 8:
                        killed = _kill_busy_middle(url, middles)
                elif event == "done":
                    final = data
                elif event == "error":
                    raise AssertionError(data)
    assert killed is not None and final is not None
    assert "".join(pieces) == final["text"] == expected["text"]
    survivor = final["route"][1]["peer_id"]
    assert peer_names[survivor] != killed


def _kill_busy_middle(url: str, middles: dict[str, tuple[Child, str]]) -> str:
    """Kill whichever 10:20 worker holds a session now (its heartbeats say so)."""
    by_peer = {addr.rsplit("/", 1)[1]: name for name, (_, addr) in middles.items()}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for row in httpx.get(f"{url}/api/nodes", timeout=10).json()["nodes"]:
            name = by_peer.get(row["peer_id"])
            if name is not None and row["load"].get("sessions"):
                middles[name][0].kill()
                return name
        time.sleep(0.1)
    raise AssertionError("no 10:20 worker held a session")


def test_cli_query_finds_a_route_from_heartbeats_and_names_it(net: dict) -> None:
    from .procs import run_cli

    prompt = PROMPTS[0]
    expected = generate(net["url"], prompt, route="spans", max_new_tokens=16)
    args = ["query", net["full_addr"], prompt, "--chat", "--spans", "--temperature", "0", "--max-new-tokens", "16"]
    result = run_cli(*args, "--wait", "30", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["text"] == expected["text"]
    assert [hop["span"] for hop in answer["route"]] == [[0, 10], [10, 20], [20, 30]]
    assert "route: 0:10@" in result.stderr
