"""Credits on the page, in headless Chromium against a real gateway and a real worker.

An answer's cost (the receipt the gateway and the worker signed) shows in the query log,
the worker's gossiped ledger totals in the nodes table, and the gateway's own balance
under it. A second test feeds the page hostile and odd credit fields through routed
responses: only numbers are shown, a forked ledger is marked, a failing /api/credits
breaks nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .browser import browser_page, skip_unless_browser
from .procs import LocalNetwork, fast_network, get_json

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LOG_OK = "n => document.querySelectorAll('[data-testid=log-row]').length === n && document.querySelector('[data-testid=log-row]').dataset.status === 'ok'"


def cost_text(mc: float) -> str:
    """The page's rule: 3 decimals below 10 credits, fewer above."""
    credits = mc / 1000
    decimals = 3 if credits < 10 else 2 if credits < 1000 else 1 if credits < 100000 else 0
    return f"{credits:.{decimals}f}"


def public_spent(credits: dict[str, Any]) -> tuple[int, int]:
    account = credits.get("accounts", {}).get("public", {})
    return account.get("spent_mc", 0), account.get("requests", 0)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    skip_unless_browser()
    with fast_network(tmp_path_factory.mktemp("credits-net"), 1) as network:
        yield network


def send(page: Any, n: int) -> None:
    """Send the prompt and wait for the n-th log row to end ok."""
    page.get_by_test_id("send").click()
    page.wait_for_function(LOG_OK, arg=n, timeout=60_000)


def test_the_page_shows_what_answers_cost_and_what_the_worker_earned(net: LocalNetwork, browser: Any) -> None:
    before = get_json(f"{net.url}/api/credits")
    assert before["enabled"] is True and before["unit"] == "millicredits"
    spent0, requests0 = public_spent(before)
    worker = next(n["peer_id"] for n in get_json(f"{net.url}/api/nodes")["nodes"] if n.get("role", "worker") == "worker")

    with browser_page((1280, 900), browser=browser) as page:
        page.goto(f"{net.url}/")
        page.locator(f'[data-testid=node-row][data-peer-id="{worker}"][data-online="true"]').wait_for(timeout=20_000)
        page.get_by_test_id("prompt").fill("Once upon a time")
        page.get_by_test_id("max-new-tokens").fill("8")

        # Streamed: the cost comes in the final "done" event.
        send(page, 1)
        cost = page.get_by_test_id("log-row").first.get_by_test_id("entry-cost")
        mc = int(cost.get_attribute("data-millicredits") or -1)
        spent1, requests1 = public_spent(get_json(f"{net.url}/api/credits"))
        assert requests1 == requests0 + 1
        assert mc == spent1 - spent0 and mc > 0, (mc, spent0, spent1)  # what the gateway charged for it
        assert cost.inner_text() == cost_text(mc)
        assert f"cost {cost_text(mc)} credits" in page.get_by_test_id("output-meta").inner_text()

        # Not streamed: the cost is in the JSON answer.
        page.get_by_test_id("stream").uncheck()
        send(page, 2)
        cost2 = page.get_by_test_id("log-row").first.get_by_test_id("entry-cost")
        mc2 = int(cost2.get_attribute("data-millicredits") or -1)
        spent2, requests2 = public_spent(get_json(f"{net.url}/api/credits"))
        assert requests2 == requests1 + 1 and mc2 == spent2 - spent1 and mc2 > 0
        assert cost2.inner_text() == cost_text(mc2)
        receipt = get_json(f"{net.url}/api/credits")["seq"]
        assert cost2.get_attribute("title").startswith(f"{cost_text(mc2)} credits: {mc2} millicredits paid")
        assert "receipt #" in cost2.get_attribute("title") and receipt >= 2

        # The worker's heartbeats carry its ledger totals: it earned by answering.
        cell = page.locator(f'[data-testid=node-row][data-peer-id="{worker}"] [data-testid=node-credits]')
        page.wait_for_function(
            "s => Number(document.querySelector(s)?.dataset.earnedMc) > 0",
            arg=f'[data-testid=node-row][data-peer-id="{worker}"] [data-testid=node-credits]',
            timeout=20_000,
        )
        assert re.fullmatch(r"\+\d+\.\d{3} / -\d+\.\d{3}", cell.inner_text()), cell.inner_text()
        earned = int(cell.get_attribute("data-earned-mc"))
        assert cell.inner_text().startswith(f"+{earned / 1000:.3f} / -")
        assert "gossiped ledger summary" in cell.get_attribute("title")
        assert cell.get_by_test_id("node-forked").count() == 0
        row = next(n for n in get_json(f"{net.url}/api/nodes")["nodes"] if n["peer_id"] == worker)
        assert row["credits"]["earned_mc"] >= earned > 0

        # The gateway's own balance, refreshed with the nodes.
        line = page.get_by_test_id("gateway-credits")
        page.wait_for_function(
            "mc => Number(document.querySelector('[data-testid=gateway-credits]')?.dataset.spentMc) >= mc",
            arg=mc + mc2,
            timeout=20_000,
        )
        mine = get_json(f"{net.url}/api/credits")
        assert line.is_visible() and line.inner_text().startswith("This gateway: balance ")
        assert int(line.get_attribute("data-spent-mc")) <= mine["spent"]

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "page-credits.png"), full_page=True)
        assert page.js_errors == []


HOSTILE = '<img src=x onerror="window.pwned=1">'
PEERS = [f"12D3KooW{c * 44}" for c in "ABCDE"]


def fake_nodes() -> dict[str, Any]:
    def node(peer: str, **extra: Any) -> dict[str, Any]:
        return {"peer_id": peer, "online": True, "role": "worker", "models": ["tiny"], "load": {"running": 0, "capacity": 1}, **extra}

    return {
        "nodes": [
            node(PEERS[0], credits={"earned_mc": 12345, "spent_mc": 0, "seq": 9, "verified_balance_mc": 1012345, "forked": False}),
            node(PEERS[1], credits={"earned_mc": 700, "spent_mc": 1500, "seq": 4, "verified_balance_mc": None, "forked": True}),
            node(PEERS[2], credits=None),
            node(PEERS[3]),  # a heartbeat without a ledger: no "credits" at all
            node(PEERS[4], credits={"earned_mc": HOSTILE, "spent_mc": -5, "seq": "x", "forked": "yes"}),
        ],
        "online": 5,
    }


def test_odd_and_hostile_credit_fields_show_only_numbers(net: LocalNetwork, browser: Any) -> None:
    costs = [
        {"credits": HOSTILE, "millicredits": "13", "receipt": 1},  # no number: a dash
        None,  # no receipt (a route of spans)
        {"credits": 12.346, "millicredits": 12346, "receipt": HOSTILE},  # a number, its receipt dropped
        [13],
    ]
    answers = iter(costs)

    def generate(route: Any) -> None:
        done = {"text": " the end", "model": "tiny", "node": PEERS[0], "finish_reason": "length",
                "usage": {"prompt_tokens": 2, "completion_tokens": 2}, "timing": {"total_ms": 5.0}, "attempts": 1, "cost": next(answers)}
        route.fulfill(status=200, content_type="application/json", body=json.dumps(done))

    with browser_page((390, 844), browser=browser, is_mobile=True, has_touch=True) as page:
        page.route("**/api/nodes", lambda r: r.fulfill(status=200, content_type="application/json", body=json.dumps(fake_nodes())))
        page.route("**/api/credits", lambda r: r.fulfill(status=500, content_type="application/json", body='{"error": {"message": "boom"}}'))
        page.route("**/api/generate", generate)
        page.goto(f"{net.url}/")
        page.wait_for_function("() => document.querySelectorAll('[data-testid=node-row]').length === 5")
        page.wait_for_function("() => document.querySelector('[data-testid=nodes-updated]').textContent !== ''")
        assert page.get_by_test_id("gateway-credits").is_hidden()  # /api/credits failed: nothing shown
        assert page.get_by_test_id("nodes-error").is_hidden()  # ...and nothing said about it

        cells = {p: page.locator(f'[data-testid=node-row][data-peer-id="{p}"] [data-testid=node-credits]') for p in PEERS}
        assert cells[PEERS[0]].inner_text() == "+12.345 / -0.000"
        assert "1012.345 credits" in cells[PEERS[0]].get_attribute("title")
        forked = cells[PEERS[1]].get_by_test_id("node-forked")
        assert forked.is_visible() and forked.inner_text() == "forked" and "badge forked" in forked.get_attribute("class")
        assert cells[PEERS[1]].get_attribute("data-forked") == "true"
        assert cells[PEERS[1]].inner_text().startswith("+0.700 / -1.500")
        for peer in PEERS[2:]:
            assert cells[peer].inner_text() == "–", peer
            assert cells[peer].get_by_test_id("node-forked").count() == 0
        assert cells[PEERS[4]].get_attribute("data-earned-mc") is None
        assert cells[PEERS[0]].get_attribute("data-label") == "Credits"
        assert page.locator("[data-testid=nodes] img").count() == 0

        page.get_by_test_id("prompt").fill("Hi")
        page.get_by_test_id("stream").uncheck()
        for n in range(1, len(costs) + 1):
            send(page, n)
        shown = [c.inner_text() for c in page.get_by_test_id("entry-cost").all()][::-1]  # newest first on the page
        assert shown == ["–", "–", "12.35", "–"], shown
        assert page.get_by_test_id("entry-cost").nth(1).get_attribute("title") == "12.35 credits: 12346 millicredits paid by this gateway to the node"
        assert page.locator("[data-testid=log] img").count() == 0
        assert page.evaluate("window.pwned") is None

        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"page is {width}px wide on a 390px screen"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "credits-phone.png"), full_page=True)
        assert page.js_errors == []
