"""Audits over real processes: a gateway in front of two honest workers and one that
lies (``DLLM_FAULT=wrong-answers``: fluent answers to another question, from the real
model, signed and claiming it) stops routing to the liar, and never to an honest one."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.audit import GREEDY_GAP, Verdict, judge
from dllm_p2p import wire

from .procs import HEARTBEAT, LocalNetwork, fast_network, get_json, start_worker, wait_online

pytestmark = pytest.mark.integration


def frame(tokens: list[int], prompt_tokens: int = 3) -> dict:
    return {"tokens": tokens, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens)}}


def scores(n: int, *, gap: float = 0.0, rank: int = 0, mass: float = 0.0, logprob: float = -2.0, prompt_tokens: int = 3) -> dict:
    return {"prompt_tokens": prompt_tokens, "gaps": [gap] * n, "ranks": [rank] * n, "mass_above": [mass] * n, "logprobs": [logprob] * n}


@pytest.mark.parametrize(
    "request_, claimed, scored, passed",
    [
        (wire.Request(prompt="x", temperature=0), frame([1, 2]), scores(2, gap=GREEDY_GAP / 10), True),
        (wire.Request(prompt="x", temperature=0), frame([1, 2]), scores(2, gap=1.0), False),
        (wire.Request(prompt="x", temperature=0.8, top_k=5), frame([1, 2]), scores(2, rank=4), True),
        (wire.Request(prompt="x", temperature=0.8, top_k=5), frame([1, 2]), scores(2, rank=40), False),
        (wire.Request(prompt="x", temperature=0.8, top_p=0.5), frame([1, 2]), scores(2, mass=0.9), False),
        (wire.Request(prompt="x", temperature=1.0), frame([1, 2, 3]), scores(3, logprob=-30.0), False),
        (wire.Request(prompt="x", temperature=1.0), frame([1, 2, 3]), scores(3, logprob=-9.0), True),
        (wire.Request(prompt="x", temperature=0), frame([1, 2], prompt_tokens=50), scores(2), False),  # lies about usage
    ],
)
def test_the_verdict_rules(request_: wire.Request, claimed: dict, scored: dict, passed: bool) -> None:
    assert judge(request_, claimed, scored).passed is passed


@pytest.fixture(scope="module")
def liar_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNetwork, str]]:
    net = fast_network(tmp_path_factory.mktemp("audits"), 2)
    # Random routing: p2c would keep to the first nodes it measured as fast, and the
    # liar, the last to join, might then get no request to be caught at.
    net.gateway_args += ["--audit-rate", "1", "--policy", "random", "--probe-interval", "0.5"]
    with net:
        liar, addr = start_worker(
            net.data_dir / "liar", "--bootstrap", net.worker_addrs[0], "--heartbeat-interval", HEARTBEAT, "--threads", "1",
            name="liar", env={"DLLM_FAULT": "wrong-answers"},
        )
        try:
            wait_online(net.url, 3, children=[*net.children, liar])
            peer = addr.rsplit("/", 1)[1]
            deadline = time.monotonic() + 30
            while not nodes(net).get(peer, {}).get("registered"):  # routable only once registered
                assert time.monotonic() < deadline, "the liar's registry record never reached the gateway"
                time.sleep(0.1)
            yield net, peer
        finally:
            liar.stop()


def nodes(net: LocalNetwork) -> dict[str, dict]:
    return {n["peer_id"]: n for n in get_json(f"{net.url}/api/nodes")["nodes"]}


def test_the_liar_is_quarantined_within_20_requests_and_never_routed_to_again(liar_net: tuple[LocalNetwork, str]) -> None:
    net, liar = liar_net
    served = Counter()
    with httpx.Client(base_url=net.url, timeout=60) as http:
        for i in range(20):
            answer = http.post("/api/generate", json={"prompt": f"Question {i}: the river", "max_new_tokens": 8, "temperature": 0})
            assert answer.status_code == 200, answer.text
            served[answer.json()["node"]] += 1
        assert served[liar] >= 1  # it did get traffic (and got caught for it)
        deadline = time.monotonic() + 20
        while not nodes(net)[liar]["quarantined"]:
            assert time.monotonic() < deadline, f"the liar was not quarantined: {nodes(net)[liar]}"
            time.sleep(0.1)
        after = [http.post("/api/generate", json={"prompt": "Again", "max_new_tokens": 4, "temperature": 0}).json()["node"] for _ in range(10)]
    assert liar not in after
    table = nodes(net)
    assert "not the model's choice" in table[liar]["quarantine_reason"]
    assert not any(n["quarantined"] for peer, n in table.items() if peer != liar)
    # The evidence: the signed request and answer and the verdicts, on disk and at /api/audits.
    files = list((net.data_dir / "gateway" / "audits").glob("*.json"))
    evidence = [json.loads(f.read_text()) for f in files]
    assert evidence and all(e["node"] == liar for e in evidence)
    assert evidence[0]["answer"]["signature"]["peer_id"] == liar and evidence[0]["verdicts"][0]["passed"] is False
    assert get_json(f"{net.url}/api/audits")["counts"]["quarantined"] == 1


def test_200_audited_answers_never_quarantine_an_honest_worker(liar_net: tuple[LocalNetwork, str]) -> None:
    net, liar = liar_net
    bodies = [
        {"prompt": "The river", "max_new_tokens": 12, "temperature": 0},
        {"prompt": "Once upon a time", "max_new_tokens": 12, "temperature": 1.0},
        {"prompt": "In the morning", "max_new_tokens": 12, "temperature": 0.7, "top_k": 40},
        {"prompt": "The old mill", "max_new_tokens": 12, "temperature": 0.9, "top_p": 0.9},
    ]
    before = get_json(f"{net.url}/api/audits")["counts"]
    with httpx.Client(base_url=net.url, timeout=60) as http:
        for i in range(200):
            answer = http.post("/api/generate", json={**bodies[i % 4], "seed": i})
            assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 60
    while True:  # audits run behind the answers: wait for the last ones
        counts = get_json(f"{net.url}/api/audits")["counts"]
        # (probe audits of the quarantined liar count too: leave them out)
        done = sum(counts[k] - before[k] for k in ("passed", "failed", "unauditable", "skipped", "errors", "disputed", "probes"))
        if done - 2 * (counts["probes"] - before["probes"]) >= 200:
            break
        assert time.monotonic() < deadline, counts
        time.sleep(0.2)
    assert counts["passed"] - before["passed"] >= 150, counts
    honest = [n for peer, n in nodes(net).items() if peer != liar]
    assert not any(n["quarantined"] or n["audits"]["failed"] for n in honest), honest


def test_a_reformed_worker_is_freed_by_probe_audits(liar_net: tuple[LocalNetwork, str]) -> None:
    """``wrong-answers:1`` lies once, is caught, then answers the probes honestly: after
    three passed probes in a row it is routed to again."""
    net, _ = liar_net
    reformed, addr = start_worker(
        net.data_dir / "reformed", "--bootstrap", net.worker_addrs[0], "--heartbeat-interval", HEARTBEAT, "--threads", "1",
        name="reformed", env={"DLLM_FAULT": "wrong-answers:1"},
    )
    try:
        peer = addr.rsplit("/", 1)[1]
        wait_until(lambda: nodes(net).get(peer, {}).get("registered"), 30, "the worker never registered")
        with httpx.Client(base_url=net.url, timeout=60) as http:
            def ask() -> str:
                answer = http.post("/api/generate", json={"prompt": "The bridge", "max_new_tokens": 6, "temperature": 0})
                assert answer.status_code == 200, answer.text
                return answer.json()["node"]

            for _ in range(60):  # random routing: it gets a request soon
                if ask() == peer:
                    break
            else:
                raise AssertionError("the new worker got no request in 60")
            wait_until(lambda: nodes(net)[peer]["quarantined"] or nodes(net)[peer]["audits"]["passed"], 20, "its lie was never audited")
            assert nodes(net)[peer]["quarantined"], nodes(net)[peer]
            wait_until(lambda: not nodes(net)[peer]["quarantined"], 30, "probe audits never freed it")
            node = nodes(net)[peer]
            assert node["audits"]["failed"] == 1 and node["audits"]["passed"] >= 3, node
            assert any(ask() == peer for _ in range(60)), "freed but never routed to"
    finally:
        reformed.stop()


def wait_until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)
