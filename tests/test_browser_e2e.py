"""The page in headless Chromium against a real gateway and real workers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .browser import browser_page, skip_unless_browser
from .procs import LocalNetwork, fast_network, get_json

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    skip_unless_browser()
    # Tokens 30 ms apart, as from a slow machine: the tiny model alone answers 60 tokens
    # faster than the page can be watched, and the test is about streaming.
    with fast_network(tmp_path_factory.mktemp("browser-net"), 2, worker_env={"DLLM_FAULT": "slow-tokens:30"}) as network:
        yield network


def test_page_streams_an_answer_logs_it_then_shows_a_readable_error(net: LocalNetwork) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with browser_page(viewport=(1280, 900)) as page:
        page.goto(f"{net.url}/")
        page.get_by_test_id("nodes").locator('[data-online="true"]').nth(1).wait_for(timeout=20_000)
        page.get_by_test_id("prompt").fill("Once upon a time")
        page.get_by_test_id("max-new-tokens").fill("60")
        # Every change to the output is recorded in the page, so none is missed between polls.
        page.evaluate(
            """() => {
                const output = document.querySelector('[data-testid="output"]');
                window.__lengths = [];
                new MutationObserver(() => window.__lengths.push(output.textContent.length))
                    .observe(output, {childList: true, characterData: true, subtree: true});
            }"""
        )
        page.get_by_test_id("send").click()

        # Streamed: the output grows over several steps before the answer is complete.
        row = page.get_by_test_id("log-row").first
        page.get_by_test_id("log-status").filter(has_text="ok").first.wait_for(timeout=60_000)
        distinct = sorted(set(page.evaluate("window.__lengths")) - {0})
        assert len(distinct) >= 3, f"output did not grow step by step: {distinct[:10]}"
        assert "ok" in (row.text_content() or "")
        node_ids = {n["peer_id"] for n in get_json(f"{net.url}/api/nodes")["nodes"]}
        assert row.locator('td[data-label="Node"]').get_attribute("title") in node_ids
        page.screenshot(path=str(ARTIFACTS / "page-answer.png"), full_page=True)

        for child in net.children[:-1]:  # stop every worker; the gateway is last
            child.stop()
        page.get_by_test_id("nodes").locator('[data-online="true"]').first.wait_for(state="detached", timeout=20_000)
        page.get_by_test_id("send").click()
        error = page.get_by_test_id("error-message")
        error.wait_for(state="visible", timeout=20_000)
        message = error.text_content() or ""
        assert "no live node" in message.lower() and "503" in message
        assert page.js_errors == []
        page.screenshot(path=str(ARTIFACTS / "page-error.png"), full_page=True)
