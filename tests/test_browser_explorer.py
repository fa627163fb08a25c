"""The network map and a node's charts, in headless Chromium against a real gateway and
three real workers on 127.0.0.1.

The gateway samples its nodes every second here (``--history-interval 1``), so the page
has a history to draw within a few seconds: the map shows the gateway and one node per
worker with the last answer's path, and choosing a node (on the map, or in the table at
phone width) draws its uptime strip and charts from ``/api/history/{peer_id}``; with no node
chosen, the gateway's own, with the registry's live records, blocks and publications.
"""

from __future__ import annotations

import re
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .browser import browser_page, chromium, skip_unless_browser
from .procs import LocalNetwork, fast_network, get_json, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WORKERS = 3
LOG_OK = "n => document.querySelectorAll('[data-testid=log-row]').length === n && document.querySelector('[data-testid=log-row]').dataset.status === 'ok'"
ONLINE_ON_MAP = "n => document.querySelectorAll('[data-testid=map-node][data-online=true]').length === n"
CHARTS_DRAWN = """peer => {
    const panel = document.querySelector('[data-testid=node-detail]');
    const points = (key) => Number(panel.querySelector(`[data-testid=chart][data-series=${key}]`)?.dataset.points || 0);
    return panel.dataset.peerId === peer && points('latency_ms') >= 2 && points('tokens_per_s') >= 2 && points('queued') >= 2
        && points('errors') >= 1 && Number(panel.querySelector('[data-testid=uptime-strip]')?.dataset.samples || 0) >= 2;
}"""
REGISTRY_DRAWN = """() => {
    const box = document.querySelector('[data-testid=node-detail] [data-testid=registry-history]');
    const points = (key) => Number(box?.querySelector(`[data-testid=chart][data-series=${key}]`)?.dataset.points || 0);
    return points('records') >= 2 && points('blocks') >= 2 && box.querySelectorAll('[data-testid=publication]').length >= 1;
}"""


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    skip_unless_browser()
    network = fast_network(tmp_path_factory.mktemp("explorer-net"), WORKERS)
    network.gateway_args += ["--history-interval", "1"]
    with network:
        yield network


def node_history(net: LocalNetwork, peer: str) -> dict[str, Any] | None:
    try:
        return get_json(f"{net.url}/api/history/{peer}")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404, exc
        return None


def measured(net: LocalNetwork, peer: str) -> bool:
    """Whether the history holds two samples of ``peer`` with its latency measured."""
    history = node_history(net, peer)
    return history is not None and sum(isinstance(v, (int, float)) for v in history["series"]["latency_ms"]) >= 2


def test_the_map_shows_the_network_and_a_chosen_node_its_last_hour(net: LocalNetwork) -> None:
    workers = sorted(n["peer_id"] for n in get_json(f"{net.url}/api/nodes")["nodes"] if n["role"] == "worker")
    assert len(workers) == WORKERS
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        with browser_page((1280, 900), browser=browser) as page:
            page.goto(f"{net.url}/")
            page.wait_for_function(ONLINE_ON_MAP, arg=WORKERS, timeout=20_000)
            # One circle per worker around this gateway, each with its edge.
            assert page.locator("[data-testid=map-gateway]").count() == 1
            drawn = page.locator("[data-testid=map-node]").evaluate_all("ns => ns.map(n => [n.dataset.peerId, n.dataset.role])")
            assert sorted(drawn) == [[peer, "worker"] for peer in workers]
            assert page.locator("[data-testid=map-edge]").count() == WORKERS

            page.get_by_test_id("prompt").fill("Once upon a time")
            page.get_by_test_id("max-new-tokens").fill("8")
            for n in (1, 2):
                page.get_by_test_id("send").click()
                page.wait_for_function(LOG_OK, arg=n, timeout=30_000)
            node = page.get_by_test_id("log-row").first.get_attribute("data-node")
            assert node in workers
            # The last answer's path is drawn, to the node that made it, over a direct edge.
            answer = page.locator("[data-testid=map-answer]")
            answer.first.wait_for(state="attached")
            assert answer.count() == 1 and answer.get_attribute("data-peer-id") == node
            assert page.locator(f'[data-testid=map-edge][data-peer-id="{node}"]').get_attribute("data-path") in {"direct", "hole-punched"}

            wait_for(lambda: measured(net, node), 15, f"two samples of {node} with a latency in /api/history")
            everything = get_json(f"{net.url}/api/history")
            assert sorted(everything["nodes"]) == workers and everything["gateway"]["samples"] >= 2
            assert everything["gateway"]["series"]["requests"][-1] >= 2

            page.locator(f'[data-testid=map-node][data-peer-id="{node}"]').click()
            page.wait_for_function(CHARTS_DRAWN, arg=node, timeout=10_000)
            assert page.get_by_test_id("detail-peer").inner_text() == node
            assert page.locator(f'[data-testid=map-node][data-peer-id="{node}"]').get_attribute("aria-pressed") == "true"
            assert page.locator(f'[data-testid=node-row][data-peer-id="{node}"]').get_attribute("data-selected") == "true"
            strip = page.get_by_test_id("uptime-strip")
            assert int(strip.get_attribute("data-online") or 0) >= 2
            assert page.locator("[data-testid=uptime-cell][data-state=on]").count() >= 1
            row = next(n for n in get_json(f"{net.url}/api/nodes")["nodes"] if n["peer_id"] == node)
            assert page.get_by_test_id("detail-models").inner_text() == ", ".join(row["models"])
            assert float(page.get_by_test_id("detail-reputation").inner_text()) > 0
            assert "passed" in page.get_by_test_id("detail-audits").inner_text()
            assert re.fullmatch(r"–|\+\d+\.\d{3} / -\d+\.\d{3}", page.get_by_test_id("detail-credits").inner_text())
            page.screenshot(path=str(ARTIFACTS / "explorer-desktop.png"), full_page=True)

            # Back to the gateway's own charts: nodes online over time.
            page.get_by_test_id("detail-close").click()
            page.wait_for_function(
                "() => Number(document.querySelector('[data-testid=gateway-charts] [data-series=online]')?.dataset.points || 0) >= 2"
            )
            # And the registry's: live records and blocks over time, its publications by CID.
            page.wait_for_function(REGISTRY_DRAWN, timeout=15_000)
            cids = [p["cid"] for p in get_json(f"{net.url}/api/history?nodes=false")["gateway"]["publications"]]
            shown = page.get_by_test_id("publication").evaluate_all("rows => rows.map(r => r.dataset.cid)")
            assert shown and set(shown) <= set(cids), (shown, cids)
            assert page.js_errors == []

        with browser_page((390, 844), browser=browser, is_mobile=True, has_touch=True) as page:
            page.goto(f"{net.url}/")
            page.wait_for_function(ONLINE_ON_MAP, arg=WORKERS, timeout=20_000)
            # At phone width the table is a list of cards: a node is chosen there too.
            page.locator(f'[data-testid=node-row][data-peer-id="{node}"] [data-testid=node-select]').click()
            page.wait_for_function(CHARTS_DRAWN, arg=node, timeout=10_000)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"page is {width}px wide on a 390px screen"
            page.get_by_test_id("map").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "explorer-phone.png"), full_page=True)
            assert page.js_errors == []
