"""The page checks the registry's signatures before it uses any record, and prefers
gateways that answered before.

As in tests/test_browser_registry.py, a real gateway process publishes its registry (its own
record, with its public URL) and serves it as a trustless IPFS gateway; the page, opened from
disk, is given a CID and that gateway as its IPFS gateway, fetches the CAR and checks every
block against the CID. Here the registry is then altered the way an attacker who can publish
would alter it: the altered ``blockchain.json`` is added as a new folder, so it has its own
CID and its CAR checks out by hash, and it is served exactly where the page fetches it. Hash
checks cannot catch that; the signature check (frontend/static/verify.js) must: the page says
the registry is not trusted (``data-testid=registry-untrusted``) naming the first bad block,
and keeps the gateway it had. The unaltered registry is accepted and its gateway used.

Then the gateway history: which gateway the page picks from a registry listing several
follows the answers and failures it remembers per URL in localStorage.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dllm_p2p.registry import car
from dllm_p2p.registry.chain import Chain, make_record, solve_pow
from dllm_p2p.registry.ipfs import EmbeddedStore

from .browser import browser_page
from .test_browser_registry import ARTIFACTS, INDEX, POW, Published, discover, free_port, published_gateway

pytestmark = [pytest.mark.integration, pytest.mark.browser]

HISTORY = "dllm.gatewayHistory"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    data_dir = tmp_path_factory.mktemp("registry-verify") / "gateway"
    with published_gateway(data_dir) as published:
        published.data_dir = data_dir  # type: ignore[attr-defined]
        yield published


def published_doc(gateway: Published) -> dict[str, Any]:
    """The registry the gateway published, as the page reads it."""
    return json.loads((gateway.data_dir / "publish" / "blockchain.json").read_text())  # type: ignore[attr-defined]


def serve_registry(page: Any, doc: dict[str, Any], ipfs: str, folder: Path) -> str:
    """Publish ``doc`` as ``<cid>/blockchain.json`` and serve its CAR where the page fetches
    it (``<ipfs>/ipfs/<cid>/blockchain.json?format=car``); returns the CID."""
    publish = folder / "publish"
    publish.mkdir(parents=True)
    (publish / "blockchain.json").write_text(json.dumps(doc, indent=2) + "\n")
    store = EmbeddedStore(folder / "ipfs")
    cid = store.add_directory(publish)
    body = car.write_car([cid], list(car.dag_blocks(store, cid)))
    page.route(
        f"{ipfs}/ipfs/{cid}/**",
        lambda route: route.fulfill(status=200, body=body, headers={
            "content-type": "application/vnd.ipld.car; version=1", "access-control-allow-origin": "*"}),
    )
    return cid


def gateway_block(doc: dict[str, Any], url: str) -> int:
    return next(i for i, b in enumerate(doc["blocks"]) if b.get("record", {}).get("gateway_url") == url)


def flip_signature_byte(doc: dict[str, Any], index: int) -> None:
    record = doc["blocks"][index]["record"]
    raw = bytearray(base64.b64decode(record["signature"]))
    raw[5] ^= 0x01
    record["signature"] = base64.b64encode(bytes(raw)).decode()


def change_addr(doc: dict[str, Any], index: int) -> None:
    doc["blocks"][index]["record"]["addrs"] = ["/ip4/203.0.113.66/tcp/4001"]


def change_url(doc: dict[str, Any], index: int) -> None:
    doc["blocks"][index]["record"]["gateway_url"] = "https://evil.example.org"


ALTERATIONS: dict[str, tuple[Callable[[dict[str, Any], int], None], str]] = {
    "signature": (flip_signature_byte, "bad signature"),
    "addr": (change_addr, "bad signature"),
    "gateway_url": (change_url, "bad signature"),
}


@pytest.mark.parametrize("what", list(ALTERATIONS))
def test_an_altered_registry_is_not_trusted_and_the_genuine_one_is(
    gateway: Published, browser: Any, tmp_path: Path, what: str
) -> None:
    from playwright.sync_api import expect

    alter, reason = ALTERATIONS[what]
    doc = copy.deepcopy(published_doc(gateway))
    bad = gateway_block(doc, gateway.url)
    alter(doc, bad)
    phone = what == "signature"
    width = 390 if phone else 1280
    with browser_page((width, 844 if phone else 900), browser=browser, is_mobile=phone, has_touch=phone) as page:
        cid = serve_registry(page, doc, gateway.url, tmp_path)
        assert cid != gateway.cid
        status = discover(page, cid, gateway.url)
        expect(status).to_have_class(re.compile(r"\bbad\b"))
        untrusted = page.get_by_test_id("registry-untrusted")
        expect(untrusted).to_be_visible()
        assert untrusted.inner_text() == (
            f"Not trusted: the registry fails verification at block {bad} ({reason}). None of its gateways is used."
        )
        last = page.evaluate("window.dllmVerify.last")
        assert (last["ok"], last["firstBad"], last["error"]) == (False, bad, f"block {bad}: {reason}")
        # Its gateway is not used: nothing set, nothing saved, nothing asked of it.
        assert page.get_by_test_id("gateway-url").input_value() == ""
        assert page.evaluate("window.dllm.state.gateway") == ""
        assert page.evaluate("localStorage.getItem('dllm.gatewayUrl')") is None
        assert page.evaluate(f"localStorage.getItem('{HISTORY}')") is None
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        if phone:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "registry-untrusted-phone.png"), full_page=True)

        # The genuine registry, same page: trusted, and its gateway is used.
        page.get_by_test_id("registry-ref").fill(gateway.cid)
        page.get_by_test_id("discover-button").click()
        expect(page.get_by_test_id("gateway-url")).to_have_value(gateway.url)
        expect(untrusted).to_have_count(0)
        assert "bad" not in (status.get_attribute("class") or "")
        assert re.match(r"Found 1 live gateway in \d+ registry blocks \(verified by hash: ", status.inner_text())
        last = page.evaluate("window.dllmVerify.last")
        assert last["ok"] is True and last["powBits"] == int(POW)
        assert page.js_errors == []


def test_a_registry_loaded_from_a_plain_url_is_checked_too(gateway: Published, browser: Any) -> None:
    """A URL (or an IPNS name) cannot be checked by hash, but its signatures still are."""
    from playwright.sync_api import expect

    doc = copy.deepcopy(published_doc(gateway))
    bad = gateway_block(doc, gateway.url)
    flip_signature_byte(doc, bad)
    url = f"{gateway.url}/altered/blockchain.json"
    with browser_page(browser=browser) as page:
        page.route(url, lambda route: route.fulfill(status=200, body=json.dumps(doc), headers={
            "content-type": "application/json", "access-control-allow-origin": "*"}))
        discover(page, url, "")
        expect(page.get_by_test_id("registry-untrusted")).to_contain_text(f"at block {bad} (bad signature)")
        assert page.get_by_test_id("gateway-url").input_value() == ""
        assert page.js_errors == []


# --- which gateway: the one with a history of answering ----------------------------------------


def two_gateways(good: str, dead: str) -> dict[str, Any]:
    """A registry listing two live gateways (proof of work as the network asks)."""
    from tests.test_verify_js import ident

    records = []
    for name, url in (("history good", good), ("history dead", dead)):
        who = ident(name)
        nonce = solve_pow(who.peer_id.to_base58(), int(POW))
        records.append(make_record(who, "register", [], [], 1, 3600, role="gateway", gateway_url=url, pow=nonce))
    chain = Chain(pow_bits=int(POW))
    for record in records:
        chain = chain.append(record)
    return chain.to_dict()


def history(page: Any, url: str) -> dict[str, int]:
    return page.evaluate("u => window.dllmVerify.gatewayHistory(u)", url)


def picks(page: Any, cid: str, ipfs: str) -> str:
    """The gateway the page picks when asked to search ``cid`` (opened from disk once)."""
    if not page.url.startswith("file:"):
        discover(page, cid, ipfs)
    else:
        page.evaluate("document.getElementById('discover').open = true")  # closed once a gateway is set
        page.get_by_test_id("registry-ref").fill(cid)
        page.get_by_test_id("ipfs-gateway").fill(ipfs)
        page.get_by_test_id("discover-button").click()
        page.wait_for_function("() => /^(?!Loading)./.test(document.querySelector('[data-testid=discover-status]').textContent)")
    assert page.get_by_test_id("registry-untrusted").count() == 0
    return page.get_by_test_id("gateway-url").input_value()


def test_the_page_prefers_gateways_with_a_history_of_answering(gateway: Published, browser: Any, tmp_path: Path) -> None:
    good, dead = gateway.url, f"http://127.0.0.1:{free_port()}"  # nothing listens on dead's port
    doc = two_gateways(good, dead)
    seeds = {
        "good answered, dead failed": ({good: (7, 0), dead: (0, 5)}, good),
        "dead answered more": ({good: (1, 6), dead: (7, 0)}, dead),
        "good unknown, dead failed": ({dead: (3, 4)}, good),
    }
    for i, (name, (seed, expected)) in enumerate(seeds.items()):
        with browser_page(browser=browser) as page:
            cid = serve_registry(page, doc, gateway.url, tmp_path / str(i))
            page.goto(INDEX.as_uri())
            stored = {url: {"ok": ok, "fail": fail, "t": 1} for url, (ok, fail) in seed.items()}
            page.evaluate("([k, v]) => localStorage.setItem(k, v)", [HISTORY, json.dumps(stored)])
            for _ in range(4):  # ties are broken at random: the history must win every time
                assert picks(page, cid, gateway.url) == expected, name
            assert page.js_errors == []

    # A new visitor knows neither: whichever it tries first, its polls are counted, and the
    # next search settles on the one that answers.
    with browser_page(browser=browser) as page:
        cid = serve_registry(page, doc, gateway.url, tmp_path / "new")
        first = picks(page, cid, gateway.url)
        assert first in (good, dead)
        page.wait_for_function(
            "u => { const h = window.dllmVerify.gatewayHistory(u); return h.ok + h.fail > 0; }", arg=first, timeout=15_000
        )
        counted = history(page, first)
        assert (counted["ok"] > 0, counted["fail"] > 0) == ((True, False) if first == good else (False, True))
        assert picks(page, cid, gateway.url) == good
        page.wait_for_function("u => window.dllmVerify.gatewayHistory(u).ok > 0", arg=good, timeout=15_000)
        assert page.js_errors == []


def test_the_history_is_bounded(browser: Any) -> None:
    with browser_page(browser=browser) as page:
        page.goto(INDEX.as_uri())
        kept = page.evaluate(
            """async (key) => {
                const d = window.dllmVerify;
                for (let i = 0; i < 40; i++) {
                    d.recordAnswer(`http://g${i}.example.org`, i % 3 !== 0);
                    await new Promise((r) => setTimeout(r, 2));  // distinct times: the oldest go first
                }
                for (let i = 0; i < 1500; i++) d.recordAnswer("http://g39.example.org", true);
                return {
                    urls: Object.keys(JSON.parse(localStorage.getItem(key))),
                    g39: d.gatewayHistory("http://g39.example.org"),
                    g0: d.gatewayHistory("http://g0.example.org"),
                };
            }""",
            HISTORY,
        )
        assert sorted(kept["urls"]) == sorted(f"http://g{i}.example.org" for i in range(8, 40))
        assert kept["g0"] == {"ok": 0, "fail": 0}  # forgotten
        assert 500 <= kept["g39"]["ok"] <= 1000 and kept["g39"]["fail"] == 0  # halved past 1,000

        # A corrupt or hostile entry is ignored, not trusted.
        page.evaluate(
            "k => localStorage.setItem(k, JSON.stringify({'http://x': {ok: 1e308, fail: -1, t: 1}, 'http://y': 'z'}))", HISTORY
        )
        assert page.evaluate("window.dllmVerify.rankGateways(['http://x', 'http://y']).length") == 2
        assert history(page, "http://x") == {"ok": 0, "fail": 0}
        assert page.js_errors == []
