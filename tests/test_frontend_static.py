"""The web page in a real browser, against the real gateway app with a fake network behind it.

The HTTP side is the real thing: ``gateway.app.create_app`` with a real ``NodeTable`` and
the real relay, served by hypercorn's trio worker like ``python -m gateway``. Only libp2p
is faked: ``FakeClient`` answers for every "worker" from a script, and nodes come online
through ``NodeTable.heartbeat`` rather than gossip. The end-to-end browser test against real
workers lives elsewhere; this one checks the page: streaming, the log, error display, the
node explorer, opening from disk and finding a gateway through the registry.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.browser import browser_page, chromium, skip_unless_browser

pytestmark = pytest.mark.browser

INDEX = Path(__file__).resolve().parent.parent / "frontend" / "index.html"
WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
NODE_A = "12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
NODE_B = "12D3KooWBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
NODE_GHOST = "12D3KooWGhostttttttttttttttttttttttttttttttttttttt"
NODE_OFF = "12D3KooWOffffffffffffffffffffffffffffffffffffffff"
HOSTILE_MODEL = '<img src=x onerror="window.pwned=1">'
REGISTRY = {"head": "9f" * 32, "cid": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", "blocks": 7, "mode": "embedded"}
REGISTRY_CID = "QmRegistryRegistryRegistryRegistryRegistryRegist"


class FakeClient:
    """Stands in for ``dllm_p2p.client.Client``: every worker streams ``WORDS``."""

    token_delay = 0.04

    async def connect(self, addr: str) -> None:
        return None

    async def generate(self, addr: str, request: Any) -> AsyncIterator[dict[str, Any]]:
        from dllm_p2p.client import WorkerError

        words = WORDS[: request.max_new_tokens or len(WORDS)]
        start = time.perf_counter()
        for i, word in enumerate(words):
            await trio.sleep(self.token_delay)
            if i == 2 and request.prompt.startswith("CRASH"):
                raise WorkerError("internal", "the worker ran out of memory")
            yield {"type": "token", "text": word}
        total = (time.perf_counter() - start) * 1000
        yield {
            "type": "done",
            "text": "".join(words),
            "model": request.model or "tiny-gpt2",
            "finish_reason": "length",
            "usage": {"prompt_tokens": len(request.prompt.split()), "completion_tokens": len(words)},
            "timing": {"queue_ms": 0.1, "first_token_ms": self.token_delay * 1000, "total_ms": total},
        }


def blockchain(gateway_url: str) -> dict[str, Any]:
    """A real signed registry, as the page reads it from IPFS: one gateway record is usable."""
    from dllm_p2p.identity import generate
    from dllm_p2p.registry.chain import Chain, make_record

    now = time.time()
    worker, gone, old, live = generate(), generate(), generate(), generate()
    records = [
        make_record(worker, "register", [], ["tiny-gpt2"], seq=1, ttl=600, role="worker"),
        make_record(gone, "register", [], [], seq=1, ttl=600, role="gateway", gateway_url="http://gone.invalid"),
        make_record(gone, "deregister", [], [], seq=2, ttl=600, role="gateway", gateway_url="http://gone.invalid"),
        make_record(old, "register", [], [], seq=1, ttl=600, now=now - 1200, role="gateway", gateway_url="http://old.invalid"),
        make_record(live, "register", [], [], seq=1, ttl=600, role="gateway", gateway_url=gateway_url),
    ]
    chain = Chain()
    for record in records:
        chain = chain.append(record)
    return chain.to_dict()


class FakeGateway:
    """The real gateway app on 127.0.0.1, in its own thread with its own trio loop."""

    def __init__(self) -> None:
        from gateway.app import Gateway, create_app
        from gateway.nodes import NodeTable

        self.table = NodeTable(ttl=3600)
        self.gw = Gateway(self.table, FakeClient(), registry_info=lambda: dict(REGISTRY))  # type: ignore[arg-type]
        self.app = create_app(self.gw)
        self.url = ""

        @self.app.get("/ipfs/{cid}/blockchain.json")  # this server doubles as an IPFS gateway
        async def ipfs(cid: str) -> Any:
            from fastapi.responses import JSONResponse

            if cid != REGISTRY_CID:
                return JSONResponse({"error": "not found"}, status_code=404)
            return JSONResponse(blockchain(self.url))

        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), name="fake-gateway", daemon=True)

    async def _main(self) -> None:
        from hypercorn.config import Config
        from hypercorn.trio import serve

        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, self.app, config, shutdown_trigger=self._stop.wait))
            self.url = binds[0]
            self._ready.set()

    def __enter__(self) -> FakeGateway:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the fake gateway did not start")
        self.call(self._populate)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.call(self._stop.set)
        self._thread.join(10)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` in the server's loop (the node table belongs to that thread)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def _populate(self) -> None:
        addr = "/ip4/127.0.0.1/tcp/4001/p2p/"
        expires = time.time() + 600
        self.table.update_from_registry(
            [{"peer_id": peer, "role": "worker", "models": ["tiny-gpt2"], "addrs": [addr + peer], "expires": expires} for peer in (NODE_A, NODE_B, NODE_OFF)]
        )
        self.table.heartbeat(NODE_A, models=["tiny-gpt2"], load={"running": 0, "queued": 0, "capacity": 4, "uptime_s": 3725})
        self.table.heartbeat(NODE_B, models=["tiny-gpt2", HOSTILE_MODEL], load={"running": 1, "queued": 2, "capacity": 4, "uptime_s": 42})
        self.bring_back_ghost()  # heartbeats only: not in the registry

    def bring_back_ghost(self) -> None:
        self.table.heartbeat(NODE_GHOST, models=["ghost"], load={"running": 0, "capacity": 1}, addrs=["/ip4/127.0.0.1/tcp/4002/p2p/" + NODE_GHOST])


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGateway]:
    with FakeGateway() as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    skip_unless_browser()
    with chromium() as b:
        yield b


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    with browser_page((1280, 900), browser=browser) as p:
        yield p
        assert p.js_errors == [], p.js_errors


def wait_models(page: Any, *models: str) -> None:
    for model in models:
        page.wait_for_selector(f'[data-testid=model] option[value="{model}"]', state="attached")


def test_assets_are_served_where_the_page_asks(fake: FakeGateway) -> None:
    import httpx

    for asset in ("static/app.js", "static/style.css"):
        res = httpx.get(f"{fake.url}/{asset}")
        assert res.status_code == 200, (
            f"GET /{asset} -> {res.status_code}: the page loads its assets from /static/..., "
            "so the gateway must serve frontend/static/ there"
        )


def test_prompt_streams_tokens_and_logs_the_query(fake: FakeGateway, page: Any) -> None:
    page.goto(fake.url)
    assert page.get_by_test_id("gateway-url").input_value() == fake.url
    wait_models(page, "tiny-gpt2")
    page.get_by_test_id("model").select_option("tiny-gpt2")
    page.get_by_test_id("prompt").fill("Tell me about foxes")
    page.get_by_test_id("max-new-tokens").fill("6")
    # Count the separate updates of the output: streaming means several, not one at the end.
    page.evaluate("""() => {
        window.outputUpdates = 0;
        new MutationObserver(() => window.outputUpdates++).observe(
            document.querySelector('[data-testid=output]'), {subtree: true, characterData: true, childList: true});
    }""")
    page.get_by_test_id("send").click()
    expected = "".join(WORDS[:6])
    page.wait_for_function("t => document.querySelector('[data-testid=output]').textContent === t", arg=expected)
    assert page.evaluate("window.outputUpdates") >= 6
    row = page.get_by_test_id("log-row").first
    page.wait_for_function("() => document.querySelector('[data-testid=log-row]').dataset.status === 'ok'")
    cells = row.locator("td").all_inner_texts()
    assert cells[1] in {f"{n[:6]}…{n[-6:]}" for n in (NODE_A, NODE_B)}, cells
    assert cells[2] == "tiny-gpt2" and cells[3] == "6" and cells[4].removesuffix(" ms").isdigit() and cells[5] == "ok", cells
    assert page.get_by_test_id("error").is_hidden()
    assert "6 tokens" in page.get_by_test_id("output-meta").inner_text()


def test_non_streaming_answer(fake: FakeGateway, page: Any) -> None:
    page.goto(fake.url)
    page.get_by_test_id("prompt").fill("Hi")
    page.get_by_test_id("max-new-tokens").fill("3")
    page.get_by_test_id("stream").uncheck()
    page.get_by_test_id("send").click()
    page.wait_for_function("() => document.querySelector('[data-testid=log-row]')?.dataset.status === 'ok'")
    assert page.get_by_test_id("output").inner_text() == "".join(WORDS[:3])


def test_no_live_node_shows_a_readable_error(fake: FakeGateway, page: Any) -> None:
    page.goto(fake.url)
    wait_models(page, "ghost")
    page.get_by_test_id("model").select_option("ghost")
    fake.call(fake.table.forget, NODE_GHOST)  # the only node serving it leaves
    try:
        page.get_by_test_id("prompt").fill("Anyone there?")
        page.get_by_test_id("send").click()
        error = page.get_by_test_id("error")
        error.wait_for(state="visible")
        assert page.get_by_test_id("error-message").inner_text() == "No live node serves model 'ghost' (503)"
        assert error.get_attribute("data-code") == "no_live_node"
        row = page.get_by_test_id("log-row").first
        assert row.get_attribute("data-status") == "error"
        assert "503" in row.get_by_test_id("log-status").inner_text()
        # The model stays selected, marked as having no live node, once the page refreshes.
        page.evaluate("window.dllm.refresh()")
        page.wait_for_selector('[data-testid=model] option[value="ghost"]:text("no live node")', state="attached")
    finally:
        fake.call(fake.bring_back_ghost)


def test_error_after_the_first_tokens_keeps_them_and_shows_the_error(fake: FakeGateway, page: Any) -> None:
    page.goto(fake.url)
    page.get_by_test_id("prompt").fill("CRASH please")
    page.get_by_test_id("send").click()
    page.get_by_test_id("error").wait_for(state="visible")
    assert page.get_by_test_id("error-message").inner_text() == "The worker ran out of memory (internal)"
    assert page.get_by_test_id("output").inner_text() == "".join(WORDS[:2])
    row = page.get_by_test_id("log-row").first
    assert row.get_attribute("data-status") == "error"
    assert row.locator("td").nth(3).inner_text() == "2"


def test_stop_button_cancels_the_answer(fake: FakeGateway, page: Any) -> None:
    page.goto(fake.url)
    page.get_by_test_id("prompt").fill("Long story")
    page.get_by_test_id("send").click()
    page.wait_for_function("() => document.querySelector('[data-testid=output]').textContent.length > 0")
    page.get_by_test_id("stop").click()
    page.wait_for_function("() => document.querySelector('[data-testid=log-row]').dataset.status === 'stopped'")
    assert page.get_by_test_id("error").is_hidden()
    assert page.get_by_test_id("send").is_enabled()


def test_node_explorer_lists_nodes_and_registry(fake: FakeGateway, page: Any) -> None:
    page.goto(fake.url)
    rows = page.get_by_test_id("node-row")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=node-row]').length === 4")
    b = page.locator(f'[data-testid=node-row][data-peer-id="{NODE_B}"]')
    assert b.get_by_test_id("node-status").inner_text() == "online"
    cells = b.locator("td").all_inner_texts()
    assert "1/4 +2 queued" in cells[3] and cells[4] == "42s", cells
    assert HOSTILE_MODEL in cells[2]  # shown as text, not markup
    assert page.locator("[data-testid=nodes] img").count() == 0
    assert page.evaluate("window.pwned") is None
    a = page.locator(f'[data-testid=node-row][data-peer-id="{NODE_A}"]')
    assert a.locator("td").nth(4).inner_text() == "1h 2m"
    off = page.locator(f'[data-testid=node-row][data-peer-id="{NODE_OFF}"]')
    assert off.get_by_test_id("node-status").inner_text() == "offline"
    assert rows.last.get_attribute("data-peer-id") == NODE_OFF  # offline nodes sort last
    assert page.get_by_test_id("registry-blocks").inner_text() == "7"
    assert page.get_by_test_id("registry-mode").inner_text() == "embedded"
    assert page.get_by_test_id("registry-head").get_attribute("title") == REGISTRY["head"]
    assert page.get_by_test_id("registry-cid").locator("a").get_attribute("title") == REGISTRY["cid"]
    assert page.get_by_test_id("health").inner_text() == "3 live nodes"


def test_page_opened_from_disk_asks_for_the_gateway(fake: FakeGateway, page: Any) -> None:
    page.goto(INDEX.as_uri())
    assert page.get_by_test_id("gateway-url").input_value() == ""
    assert "opened from disk" in page.get_by_test_id("gateway-hint").inner_text()
    page.get_by_test_id("prompt").fill("Hello")
    page.get_by_test_id("send").click()
    assert "Set the Gateway URL first" in page.get_by_test_id("error-message").inner_text()

    page.get_by_test_id("gateway-url").fill(fake.url)
    page.get_by_test_id("gateway-connect").click()
    page.wait_for_function("() => document.querySelectorAll('[data-testid=node-row]').length === 4")
    page.get_by_test_id("max-new-tokens").fill("4")
    page.get_by_test_id("send").click()
    page.wait_for_function("t => document.querySelector('[data-testid=output]').textContent === t", arg="".join(WORDS[:4]))
    assert page.get_by_test_id("error").is_hidden()

    page.reload()  # remembered in localStorage
    assert page.get_by_test_id("gateway-url").input_value() == fake.url


def test_page_finds_a_gateway_through_the_registry(fake: FakeGateway, page: Any) -> None:
    page.goto(f"{INDEX.as_uri()}?registry={REGISTRY_CID}&ipfs={fake.url}")
    page.wait_for_function("u => document.querySelector('[data-testid=gateway-url]').value === u", arg=fake.url)
    status = page.get_by_test_id("discover-status").inner_text()
    assert "Found 1 live gateway in 6 blocks" in status, status
    page.wait_for_function("() => document.querySelectorAll('[data-testid=node-row]').length === 4")

    page.get_by_test_id("registry-ref").fill("/ipns/k51nothing")
    page.get_by_test_id("discover-button").click()
    page.wait_for_function("() => document.querySelector('[data-testid=discover-status]').textContent.includes('(404)')")


def test_phone_layout_has_no_sideways_scroll(fake: FakeGateway, browser: Any) -> None:
    with browser_page((390, 844), browser=browser, is_mobile=True, has_touch=True) as page:
        page.goto(fake.url)
        page.wait_for_function("() => document.querySelectorAll('[data-testid=node-row]').length === 4")
        page.get_by_test_id("prompt").fill("Hi")
        page.get_by_test_id("max-new-tokens").fill("2")
        page.get_by_test_id("send").click()
        page.wait_for_function("() => document.querySelector('[data-testid=log-row]')?.dataset.status === 'ok'")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"page is {width}px wide on a 390px screen"
        assert page.get_by_test_id("send").bounding_box()["width"] >= 44  # a thumb-sized target
        assert page.js_errors == []


def test_sse_parser_handles_split_and_crlf_events(page: Any) -> None:
    page.goto(INDEX.as_uri())
    events = page.evaluate(
        """async () => {
            const chunks = ['event: tok', 'en\\r\\ndata: {"text": "a"}\\r', '\\n\\r\\n: comment\\n',
                            'data:x\\ndata: y\\n\\nevent: done\\ndata: {}'];
            const body = new ReadableStream({start(c) {
                for (const chunk of chunks) c.enqueue(new TextEncoder().encode(chunk));
                c.close();
            }});
            const out = [];
            for await (const event of window.dllm.sseEvents(body)) out.push(event);
            return out;
        }"""
    )
    assert events == [
        {"event": "token", "data": json.dumps({"text": "a"})},
        {"event": "message", "data": "x\ny"},
        {"event": "done", "data": "{}"},
    ]
