"""The web page in a real browser, against the real gateway app with a fake network behind it.

The HTTP side is the real thing: ``gateway.app.create_app`` with a real ``NodeTable`` and
the real relay, served by hypercorn's trio worker like ``python -m gateway``. Only libp2p
is faked: ``FakeClient`` answers for every "worker" from a script, and nodes come online
through ``NodeTable.heartbeat`` rather than gossip. The end-to-end browser test against real
workers lives elsewhere; this one checks the page: streaming, the log, error display, the
node explorer, opening from disk and finding a gateway through the registry, and the chat
view for chat models (``/v1/chat/completions``).
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

from tests.browser import browser_page

pytestmark = pytest.mark.browser

INDEX = Path(__file__).resolve().parent.parent / "frontend" / "index.html"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
NODE_A = "12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
NODE_B = "12D3KooWBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
NODE_GHOST = "12D3KooWGhostttttttttttttttttttttttttttttttttttttt"
NODE_OFF = "12D3KooWOffffffffffffffffffffffffffffffffffffffff"
HOSTILE_MODEL = '<img src=x onerror="window.pwned=1">'
REGISTRY = {
    "head": "9f" * 32, "cid": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", "blocks": 7, "mode": "embedded",
    "published_at": time.time() - 30, "ipns": "k51qzi5uqu5dhg9ze3ku3tttktsumvot7sij7el822gyhz0i4nxq8xsef6zwk7",
    "ipns_cid": "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", "ipns_at": time.time() - 600, "ipns_via": "dht",
}
CHAT_MODEL = "smol-chat"
MODEL_META = {
    CHAT_MODEL: {"fingerprint": "sha256:" + "ab" * 32, "chat": True},
    "tiny-gpt2": {"fingerprint": "sha256:" + "cd" * 32, "chat": False},
}


def last_text(request: Any) -> str:
    """What a request ends with: its prompt, or the last message of its conversation."""
    if request.messages:
        return str(request.messages[-1].get("content", ""))
    return request.prompt


def answer_words(request: Any) -> list[str]:
    """A prompt gets ``WORDS``; a conversation gets ``Turn <n>: <last user message>``, so a
    test can tell from the answer which turn it is and what was asked."""
    if request.messages is None:
        return WORDS
    users = [m["content"] for m in request.messages if m["role"] == "user"]
    return ["Turn", f" {len(users)}:", *(" " + word for word in users[-1].split())]


class FakeClient:
    """Stands in for ``dllm_p2p.client.Client``: every worker streams ``WORDS`` for a prompt
    and echoes the last user message for a conversation (see ``answer_words``). A request
    whose prompt or last message starts with "CRASH" fails after two tokens."""

    token_delay = 0.04

    def __init__(self) -> None:
        self.requests: list[Any] = []  # every wire.Request, in order

    async def connect(self, addr: str) -> None:
        return None

    async def connect_any(self, addrs: list[str], timeout: float) -> str:
        return addrs[0]

    async def generate(self, addr: str, request: Any) -> AsyncIterator[dict[str, Any]]:
        from dllm_p2p.client import WorkerError

        self.requests.append(request)
        all_words = answer_words(request)
        words = all_words[: request.max_new_tokens or len(all_words)]
        start = time.perf_counter()
        for i, word in enumerate(words):
            await trio.sleep(self.token_delay)
            if i == 2 and last_text(request).startswith("CRASH"):
                raise WorkerError("internal", "the worker ran out of memory")
            yield {"type": "token", "text": word}
        total = (time.perf_counter() - start) * 1000
        said = request.prompt if request.messages is None else " ".join(m["content"] for m in request.messages)
        yield {
            "type": "done",
            "text": "".join(words),
            "model": request.model or "tiny-gpt2",
            "finish_reason": "length" if len(words) < len(all_words) or request.messages is None else "stop",
            "usage": {"prompt_tokens": len(said.split()), "completion_tokens": len(words)},
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

    def __init__(self, folder: Path) -> None:
        from gateway.app import Gateway, create_app
        from gateway.nodes import NodeTable

        self.table = NodeTable(ttl=3600)
        self.client = FakeClient()
        self.gw = Gateway(self.table, self.client, registry_info=lambda: dict(REGISTRY))  # type: ignore[arg-type]
        self.app = create_app(self.gw)
        self.url = ""
        self.folder = folder
        #: The CID of a folder holding ``blockchain(self.url)``, which this server also
        #: serves as a trustless IPFS gateway (``/ipfs/``, CARs), set once it listens.
        self.registry_cid = ""

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
        self._publish()
        return self

    def _publish(self) -> None:
        from dllm_p2p.registry.ipfs import EmbeddedStore

        publish = self.folder / "publish"
        publish.mkdir(parents=True, exist_ok=True)
        (publish / "blockchain.json").write_text(json.dumps(blockchain(self.url)))
        store = EmbeddedStore(self.folder / "ipfs")
        self.registry_cid = store.add_directory(publish)
        self.gw.blocks = store

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
        self.table.heartbeat(NODE_A, models=["tiny-gpt2", CHAT_MODEL], load={"running": 0, "queued": 0, "capacity": 4, "uptime_s": 3725}, meta=MODEL_META)
        self.table.heartbeat(NODE_B, models=["tiny-gpt2", HOSTILE_MODEL, CHAT_MODEL], load={"running": 1, "queued": 2, "capacity": 4, "uptime_s": 42}, meta=MODEL_META)
        self.bring_back_ghost()

    def bring_back_ghost(self) -> None:
        addrs = ["/ip4/127.0.0.1/tcp/4002/p2p/" + NODE_GHOST]
        self.table.register({"peer_id": NODE_GHOST, "role": "worker", "models": ["ghost"], "addrs": addrs, "expires": time.time() + 600})
        self.table.heartbeat(NODE_GHOST, models=["ghost"], load={"running": 0, "capacity": 1}, addrs=["/ip4/127.0.0.1/tcp/4002/p2p/" + NODE_GHOST])


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGateway]:
    with FakeGateway(tmp_path_factory.mktemp("fake-gateway")) as server:
        yield server


@pytest.fixture()
def page(browser: Any) -> Iterator[Any]:
    with browser_page((1280, 900), browser=browser) as p:
        yield p
        assert p.js_errors == [], p.js_errors


def wait_models(page: Any, *models: str) -> None:
    for model in models:
        page.wait_for_selector(f'[data-testid=model] option[value="{model}"]', state="attached")


def open_chat(page: Any, url: str) -> None:
    """Open the page and pick the chat model, once the page knows it is one."""
    page.goto(url)
    page.wait_for_selector(f'[data-testid=model] option[value="{CHAT_MODEL}"]:text("chat")', state="attached")
    page.get_by_test_id("model").select_option(CHAT_MODEL)
    page.get_by_test_id("chat-view").wait_for(state="visible")


ANSWERS = "[data-testid=chat-message][data-role=assistant]"


def send_chat(page: Any, text: str) -> None:
    page.get_by_test_id("chat-input").fill(text)
    page.get_by_test_id("chat-input").press("Enter")


def wait_answer(page: Any, n: int) -> Any:
    """The n-th (1-based) assistant bubble, once its answer has ended (ok, error or stopped)."""
    page.wait_for_function(
        """([sel, n]) => {
            const answers = document.querySelectorAll(sel);
            return answers.length >= n && ['ok', 'error', 'stopped'].includes(answers[n - 1].dataset.status);
        }""",
        arg=[ANSWERS, n],
    )
    return page.locator(ANSWERS).nth(n - 1)


def chat_requests(fake: FakeGateway, marker: str) -> list[Any]:
    """The chat requests the workers got whose conversation mentions ``marker``."""
    return [r for r in list(fake.client.requests) if r.messages and any(marker in m["content"] for m in r.messages)]


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
    ipns = page.get_by_test_id("registry-ipns")
    assert ipns.inner_text().endswith("s ago") and "network's DHT" in ipns.get_attribute("title")
    assert page.get_by_test_id("registry-published").inner_text().endswith("s ago")
    assert page.get_by_test_id("health").inner_text() == "3 live nodes"


def test_a_quarantined_node_is_marked_with_the_reason(fake: FakeGateway, page: Any) -> None:
    reason = "token 0 (17) is not the model's choice: 3.20 nats below the best (greedy)"
    fake.call(fake.table.quarantine, NODE_B, reason)
    try:
        page.goto(fake.url)
        b = page.locator(f'[data-testid=node-row][data-peer-id="{NODE_B}"]')
        badge = b.get_by_test_id("node-quarantined")
        badge.wait_for()
        assert badge.inner_text() == "quarantined" and reason in badge.get_attribute("title")
        assert page.locator(f'[data-testid=node-row][data-peer-id="{NODE_A}"]').get_by_test_id("node-quarantined").count() == 0
    finally:
        for _ in range(3):
            fake.call(fake.table.probation_pass, NODE_B, 3)
    assert not fake.table.nodes[NODE_B].quarantined


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
    page.goto(f"{INDEX.as_uri()}?registry={fake.registry_cid}&ipfs={fake.url}")
    page.wait_for_function("u => document.querySelector('[data-testid=gateway-url]').value === u", arg=fake.url)
    status = page.get_by_test_id("discover-status").inner_text()
    assert "Found 1 live gateway in 6 registry blocks (verified by hash: Qm" in status, status
    page.wait_for_function("() => document.querySelectorAll('[data-testid=node-row]').length === 4")

    page.get_by_test_id("registry-ref").fill("/ipns/k51nothing")
    page.get_by_test_id("discover-button").click()
    page.wait_for_function("() => document.querySelector('[data-testid=discover-status]').textContent.includes('(404)')")
    assert "/ipns/k51nothing/blockchain.json" in page.get_by_test_id("discover-status").inner_text()

    # A plain URL is fetched by path and said to be unverified.
    page.get_by_test_id("registry-ref").fill(f"{fake.url}/ipfs/{fake.registry_cid}/blockchain.json")
    page.get_by_test_id("discover-button").click()
    page.get_by_test_id("discover-status").filter(has_text="not verified: a URL is trusted as served").wait_for()


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


# --- the chat view ------------------------------------------------------------------------


def test_chat_model_opens_the_chat_view_and_sends_the_whole_conversation(fake: FakeGateway, page: Any) -> None:
    open_chat(page, fake.url)
    assert page.get_by_test_id("view-toggle").get_attribute("data-view") == "chat"
    assert page.get_by_test_id("view-chat").get_attribute("aria-pressed") == "true"
    for hidden in ("completion-view", "prompt", "send", "output"):
        assert page.get_by_test_id(hidden).is_hidden(), hidden
    assert page.get_by_test_id("chat-send").is_visible() and page.get_by_test_id("chat-new").is_visible()
    page.evaluate("""() => {
        window.chatUpdates = 0;
        new MutationObserver(() => window.chatUpdates++).observe(
            document.querySelector('[data-testid=chat-messages]'), {subtree: true, characterData: true, childList: true});
    }""")

    send_chat(page, "Hello there alpha")
    assert page.get_by_test_id("chat-input").input_value() == ""
    first = wait_answer(page, 1)
    assert first.get_by_test_id("chat-text").inner_text() == "Turn 1: Hello there alpha"
    assert first.get_attribute("data-status") == "ok"
    # Streamed: the answer's 5 tokens arrive as separate updates, not all at the end.
    assert page.evaluate("window.chatUpdates") >= 5 + 2  # + the two bubbles
    assert page.get_by_test_id("chat-message").first.get_attribute("data-role") == "user"

    # Shift+Enter is a new line; Enter sends. A system prompt goes first when set.
    page.locator("summary", has_text="System prompt").click()
    page.get_by_test_id("chat-system").fill("Be brief.")
    box = page.get_by_test_id("chat-input")
    box.fill("How are")
    box.press("Shift+Enter")
    box.type("you?")
    assert box.input_value() == "How are\nyou?"
    assert page.locator(ANSWERS).count() == 1
    box.press("Enter")
    second = wait_answer(page, 2)
    assert second.get_by_test_id("chat-text").inner_text() == "Turn 2: How are you?"

    sent = chat_requests(fake, "Hello there alpha")[-1]
    assert sent.model == CHAT_MODEL and sent.prompt == ""
    assert list(sent.messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there alpha"},
        {"role": "assistant", "content": "Turn 1: Hello there alpha"},
        {"role": "user", "content": "How are\nyou?"},
    ]
    assert sent.max_new_tokens == 64 and sent.temperature == 0.8 and sent.top_p == 0.95
    roles = [b.get_attribute("data-role") for b in page.get_by_test_id("chat-message").all()]
    assert roles == ["user", "assistant", "user", "assistant"]

    # Each answer has a row in the query log.
    rows = page.get_by_test_id("log-row")
    assert rows.count() == 2
    for row in rows.all():
        assert row.get_attribute("data-status") == "ok" and row.get_attribute("data-kind") == "chat"
    cells = rows.first.locator("td").all_inner_texts()
    assert cells[2].startswith(CHAT_MODEL) and cells[3] == "5" and cells[4].removesuffix(" ms").isdigit() and cells[5] == "ok", cells
    assert "5 tokens" in second.get_by_test_id("chat-meta").inner_text()
    assert page.get_by_test_id("error").is_hidden()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-desktop.png"), full_page=True)

    # New chat: an empty conversation, and the next request carries only the new message.
    page.get_by_test_id("chat-new").click()
    assert page.get_by_test_id("chat-message").count() == 0
    send_chat(page, "Fresh start beta")
    assert wait_answer(page, 1).get_by_test_id("chat-text").inner_text() == "Turn 1: Fresh start beta"
    assert list(chat_requests(fake, "Fresh start beta")[-1].messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Fresh start beta"},
    ]


def test_base_model_shows_the_completion_view_and_the_toggle_switches(fake: FakeGateway, page: Any) -> None:
    page.goto(fake.url)
    wait_models(page, "tiny-gpt2", CHAT_MODEL)
    assert page.get_by_test_id("chat-view").is_hidden()  # "any model": not all of them chat
    assert "--model" in page.get_by_test_id("model-hint").text_content()  # how a worker picks its model
    page.get_by_test_id("model").select_option("tiny-gpt2")
    assert "tiny-gpt2: a base model" in page.get_by_test_id("model-hint").text_content()
    assert page.get_by_test_id("completion-view").is_visible() and page.get_by_test_id("output").is_visible()
    assert page.get_by_test_id("send").is_visible() and page.get_by_test_id("chat-send").is_hidden()
    assert page.get_by_test_id("chat-view").is_hidden()
    assert page.get_by_test_id("view-completion").get_attribute("aria-pressed") == "true"

    page.get_by_test_id("model").select_option(CHAT_MODEL)  # the view follows the model
    page.get_by_test_id("chat-view").wait_for(state="visible")
    hint = page.get_by_test_id("model-hint").text_content()
    assert f"{CHAT_MODEL}: a chat model" in hint and "abababab" in hint  # its fingerprint, shortened
    page.get_by_test_id("view-completion").click()  # the user's pick wins...
    assert page.get_by_test_id("completion-view").is_visible() and page.get_by_test_id("chat-view").is_hidden()
    page.evaluate("window.dllm.refresh()")  # ...also after the models are polled again
    assert page.get_by_test_id("completion-view").is_visible()
    page.get_by_test_id("prompt").fill("Plain completion")
    page.get_by_test_id("max-new-tokens").fill("3")
    page.get_by_test_id("send").click()
    page.wait_for_function("t => document.querySelector('[data-testid=output]').textContent === t", arg="".join(WORDS[:3]))
    assert page.get_by_test_id("log-row").first.get_attribute("data-kind") == "completion"

    page.get_by_test_id("model").select_option("tiny-gpt2")
    page.get_by_test_id("view-chat").click()  # a base model can be chatted with too
    assert page.get_by_test_id("chat-view").is_visible() and page.get_by_test_id("completion-view").is_hidden()
    assert page.get_by_test_id("view-toggle").get_attribute("data-view") == "chat"


def test_chat_error_mid_answer_keeps_the_partial_text(fake: FakeGateway, page: Any) -> None:
    open_chat(page, fake.url)
    send_chat(page, "CRASH right now")
    answer = wait_answer(page, 1)
    page.get_by_test_id("error").wait_for(state="visible")
    assert page.get_by_test_id("error-message").inner_text() == "The worker ran out of memory (internal)"
    assert answer.get_attribute("data-status") == "error"
    assert answer.get_by_test_id("chat-text").inner_text() == "Turn 1:"
    assert "Cut short: The worker ran out of memory (internal)" in answer.get_by_test_id("chat-meta").inner_text()
    row = page.get_by_test_id("log-row").first
    assert row.get_attribute("data-status") == "error" and row.get_attribute("data-kind") == "chat"
    assert row.locator("td").nth(3).inner_text() == "2"
    assert "ran out of memory" in row.get_by_test_id("log-status").inner_text()

    # The conversation goes on from what the user saw.
    send_chat(page, "Go on gamma")
    wait_answer(page, 2)
    assert page.get_by_test_id("error").is_hidden()
    assert list(chat_requests(fake, "Go on gamma")[-1].messages) == [
        {"role": "user", "content": "CRASH right now"},
        {"role": "assistant", "content": "Turn 1:"},
        {"role": "user", "content": "Go on gamma"},
    ]


def test_chat_without_a_live_node_gives_the_message_back(fake: FakeGateway, page: Any) -> None:
    page.goto(fake.url)
    wait_models(page, "ghost")
    page.get_by_test_id("model").select_option("ghost")
    page.get_by_test_id("view-chat").click()
    fake.call(fake.table.forget, NODE_GHOST)
    try:
        send_chat(page, "Anyone there?")
        page.get_by_test_id("error").wait_for(state="visible")
        assert page.get_by_test_id("error-message").inner_text() == "No live node serves model 'ghost' (503)"
        assert page.get_by_test_id("chat-message").count() == 0  # nothing was said...
        assert page.get_by_test_id("chat-input").input_value() == "Anyone there?"  # ...so it can be sent again
        row = page.get_by_test_id("log-row").first
        assert row.get_attribute("data-status") == "error" and row.get_attribute("data-kind") == "chat"
        assert "503" in row.get_by_test_id("log-status").inner_text()
    finally:
        fake.call(fake.bring_back_ghost)


def test_stop_button_cancels_a_chat_answer(fake: FakeGateway, page: Any) -> None:
    open_chat(page, fake.url)
    send_chat(page, " ".join(f"word{i}" for i in range(40)))
    page.wait_for_function("s => document.querySelector(s)?.textContent.length > 0", arg=f"{ANSWERS} [data-testid=chat-text]")
    page.get_by_test_id("stop").click()
    answer = wait_answer(page, 1)
    assert answer.get_attribute("data-status") == "stopped"
    kept = answer.get_by_test_id("chat-text").inner_text()
    assert kept.startswith("Turn 1:") and not kept.endswith("word39")
    page.wait_for_function("() => document.querySelector('[data-testid=log-row]').dataset.status === 'stopped'")
    assert page.get_by_test_id("error").is_hidden()
    assert page.get_by_test_id("chat-send").is_enabled() and page.get_by_test_id("stop").is_disabled()


def test_new_chat_during_an_answer_stops_it_and_starts_afresh(fake: FakeGateway, page: Any) -> None:
    open_chat(page, fake.url)
    send_chat(page, "Interrupted " + " ".join(f"w{i}" for i in range(40)))
    page.wait_for_function("s => document.querySelector(s)?.textContent.length > 0", arg=f"{ANSWERS} [data-testid=chat-text]")
    page.get_by_test_id("chat-new").click()
    assert page.get_by_test_id("chat-message").count() == 0
    page.wait_for_function("() => document.querySelector('[data-testid=log-row]').dataset.status === 'stopped'")
    assert page.get_by_test_id("chat-send").is_enabled()
    send_chat(page, "Afresh eta")
    assert wait_answer(page, 1).get_by_test_id("chat-text").inner_text() == "Turn 1: Afresh eta"
    assert page.get_by_test_id("chat-message").count() == 2  # the old answer never comes back
    assert list(chat_requests(fake, "Afresh eta")[-1].messages) == [{"role": "user", "content": "Afresh eta"}]


def test_copy_puts_the_answer_on_the_clipboard(fake: FakeGateway, browser: Any) -> None:
    with browser_page((1280, 900), browser=browser, permissions=["clipboard-read", "clipboard-write"]) as page:
        open_chat(page, fake.url)
        send_chat(page, "Copy me delta")
        answer = wait_answer(page, 1)
        copy = answer.get_by_test_id("chat-copy")
        copy.click()
        page.wait_for_function("s => document.querySelector(s)?.dataset.state === 'copied'", arg=f"{ANSWERS} [data-testid=chat-copy]")
        assert copy.inner_text() == "Copied"
        assert page.evaluate("navigator.clipboard.readText()") == "Turn 1: Copy me delta"
        assert page.js_errors == []


def test_copy_falls_back_without_the_clipboard_api(fake: FakeGateway, browser: Any) -> None:
    with browser_page((1280, 900), browser=browser) as page:
        # As on a plain-http gateway that isn't localhost: no navigator.clipboard.
        page.add_init_script("""
            Object.defineProperty(Navigator.prototype, 'clipboard', {get: () => undefined, configurable: true});
            const execCommand = Document.prototype.execCommand;
            window.copiedText = null;
            Document.prototype.execCommand = function (command, ...rest) {
                const area = document.activeElement;
                if (command === 'copy' && area) window.copiedText = area.value.slice(area.selectionStart, area.selectionEnd);
                return execCommand.call(this, command, ...rest);
            };
        """)
        open_chat(page, fake.url)
        send_chat(page, "Fallback epsilon")
        answer = wait_answer(page, 1)
        answer.get_by_test_id("chat-copy").click()
        page.wait_for_function("s => document.querySelector(s)?.dataset.state === 'copied'", arg=f"{ANSWERS} [data-testid=chat-copy]")
        assert page.evaluate("window.copiedText") == "Turn 1: Fallback epsilon"
        assert page.locator(".clipboard-helper").count() == 0  # the helper is gone again
        assert page.js_errors == []


def test_non_streaming_chat_answer_names_the_node(fake: FakeGateway, page: Any) -> None:
    open_chat(page, fake.url)
    page.get_by_test_id("stream").uncheck()
    send_chat(page, "No stream zeta")
    answer = wait_answer(page, 1)
    assert answer.get_by_test_id("chat-text").inner_text() == "Turn 1: No stream zeta"
    row = page.get_by_test_id("log-row").first
    assert row.get_attribute("data-status") == "ok"
    assert row.get_attribute("data-node") in {NODE_A, NODE_B}  # the answer's "node"


def test_chat_text_is_never_markup(fake: FakeGateway, page: Any) -> None:
    open_chat(page, fake.url)
    hostile = '<img src=x onerror="window.pwned=1"><b>bold</b>'
    send_chat(page, hostile)
    answer = wait_answer(page, 1)
    assert answer.get_by_test_id("chat-text").inner_text() == "Turn 1: " + " ".join(hostile.split())
    assert page.get_by_test_id("chat-message").first.get_by_test_id("chat-text").inner_text() == hostile
    assert page.locator("[data-testid=chat-messages] img, [data-testid=chat-messages] b").count() == 0
    assert page.evaluate("window.pwned") is None


def test_chat_at_phone_width_has_no_sideways_scroll(fake: FakeGateway, browser: Any) -> None:
    with browser_page((390, 844), browser=browser, is_mobile=True, has_touch=True) as page:
        open_chat(page, fake.url)
        send_chat(page, "What is a peer to peer network?")
        wait_answer(page, 1)
        send_chat(page, "x" * 300)  # one long unbroken word, echoed back
        wait_answer(page, 2)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"page is {width}px wide on a 390px screen"
        box = page.get_by_test_id("chat-messages")
        assert page.evaluate("el => el.scrollWidth <= el.clientWidth", box.element_handle())
        for testid in ("chat-send", "stop", "chat-new"):
            assert page.get_by_test_id(testid).bounding_box()["width"] >= 44, testid
        page.get_by_test_id("chat-messages").evaluate("el => el.scrollTop = 0")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat-phone.png"), full_page=True)
        assert page.js_errors == []


# --- spans and routes ----------------------------------------------------------------------

SPAN_PEERS = {
    "12D3KooWSpanAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa": ("spanned", (0, 10)),
    "12D3KooWSpanBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb": ("spanned", (10, 20)),
    "12D3KooWSpanCccccccccccccccccccccccccccccccccccccccc": ("spanned", (20, 30)),
    "12D3KooWSpanHhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh": ("halved", (0, 10)),
}


def add_span_workers(table: Any) -> None:
    for peer, (model, span) in SPAN_PEERS.items():
        addrs = ["/ip4/127.0.0.1/tcp/4003/p2p/" + peer]
        table.register({"peer_id": peer, "role": "worker", "models": [model], "addrs": addrs, "expires": time.time() + 600})
        meta = {model: {"fingerprint": "sha256:" + "ef" * 32, "chat": False, "span": list(span), "layers": 30, "hidden": 576}}
        load = {"sessions": 1, "max_sessions": 64, "running": 1, "capacity": 64, "kv_cache_mb": 12.0, "kv_cache_budget_mb": 1024.0}
        table.heartbeat(peer, models=[model], load=load, addrs=addrs, meta=meta)


def remove_span_workers(table: Any) -> None:
    for peer in SPAN_PEERS:
        table.nodes.pop(peer, None)


def test_the_spans_panel_and_an_answer_made_by_a_route(fake: FakeGateway, page: Any) -> None:
    """The panel shows which models have a complete route of spans; an answer that came
    through one shows its hops under the output and in the log (the gateway's side of
    routes is tested in test_gateway_unit.py: here the answer is scripted)."""
    peers = list(SPAN_PEERS)
    route = [{"peer_id": peer, "span": list(SPAN_PEERS[peer][1])} for peer in peers[:3]]
    done = {"text": " the quick", "model": "spanned", "fingerprint": "sha256:" + "ef" * 32, "node": None, "route": route,
            "finish_reason": "length", "usage": {"prompt_tokens": 2, "completion_tokens": 2},
            "timing": {"first_token_ms": 12.0, "total_ms": 30.0, "hops_ms": [3.0, 3.1, 3.2]}, "attempts": 1, "signature": None}
    events = "".join(f"event: token\ndata: {json.dumps({'text': t})}\n\n" for t in (" the", " quick")) + f"event: done\ndata: {json.dumps(done)}\n\n"
    fake.call(add_span_workers, fake.table)
    try:
        page.route("**/api/generate", lambda r: r.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=events))
        page.goto(fake.url)
        spanned = page.locator('[data-testid=span-model][data-model="spanned"]')
        spanned.wait_for()
        assert spanned.get_attribute("data-complete") == "true"
        assert spanned.get_by_test_id("span-complete").inner_text() == "complete route"
        assert spanned.get_by_test_id("span-route-hop").count() == 3
        assert [r.get_attribute("data-span") for r in spanned.get_by_test_id("span-row").all()] == ["0:10", "10:20", "20:30"]
        assert "1/64" in spanned.get_by_test_id("span-row").first.inner_text()
        halved = page.locator('[data-testid=span-model][data-model="halved"]')
        assert halved.get_attribute("data-complete") == "false"
        assert "missing layers 10:30" in halved.get_by_test_id("span-facts").inner_text()
        assert page.get_by_test_id("spans-summary").inner_text() == "1 of 2 models with a complete route"
        assert page.get_by_test_id("spans-empty").is_hidden()
        explorer = page.locator(f'[data-testid=node-row][data-peer-id="{peers[1]}"]')
        assert explorer.locator("td").nth(2).inner_text() == "spanned (layers 10:20)"

        page.get_by_test_id("prompt").fill("Hi")
        page.get_by_test_id("send").click()
        page.wait_for_function("() => document.querySelector('[data-testid=log-row]').dataset.status === 'ok'")
        assert page.get_by_test_id("output").inner_text() == " the quick"
        shown = page.get_by_test_id("output-route")
        assert shown.is_visible() and "not signed" in shown.inner_text()
        assert [h.get_attribute("data-peer-id") for h in shown.get_by_test_id("route-hop").all()] == peers[:3]
        assert f"{peers[0][:6]}…{peers[0][-6:]} 0:10" in shown.inner_text()
        assert "route of 3 spans" in page.get_by_test_id("output-meta").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "spans.png"), full_page=True)
        row = page.get_by_test_id("log-row").first
        assert row.get_attribute("data-route") == " ".join(f"{p}:{a}:{b}" for p, (_, (a, b)) in list(SPAN_PEERS.items())[:3])
        assert row.get_by_test_id("log-route").inner_text().split("\n") == [f"{p[:6]}…{p[-6:]} {a}:{b}" for p, (_, (a, b)) in list(SPAN_PEERS.items())[:3]]
        # The next answer, from a whole worker, hides the route again.
        page.unroute("**/api/generate")
        page.get_by_test_id("send").click()
        page.wait_for_function("() => document.querySelectorAll('[data-testid=log-row]')[0].dataset.status === 'ok' && document.querySelectorAll('[data-testid=log-row]').length === 2")
        assert shown.is_hidden()
    finally:
        fake.call(remove_span_workers, fake.table)


def test_without_span_workers_the_spans_panel_says_so(fake: FakeGateway, page: Any) -> None:
    page.goto(fake.url)
    wait_models(page, "tiny-gpt2")
    page.wait_for_function("() => document.querySelector('[data-testid=nodes-updated]').textContent !== ''")
    assert page.get_by_test_id("spans-empty").is_visible() and page.get_by_test_id("span-model").count() == 0
