"""The page finds a real gateway through the registry, checked by hash.

A gateway process publishes its registry (its own record, with its public URL) and serves
it as a trustless IPFS gateway (gateway/trustless.py). The page, opened from disk, is given
the registry's CID and that gateway as its IPFS gateway: it fetches a CAR, checks every block
against its CID, walks dag-pb/UnixFS to ``blockchain.json`` and switches to the gateway it
finds. A CAR with one byte changed on the way is refused, naming the block, and the page
keeps the gateway it had. ``window.dllm.carFile`` (the page's CAR reader) is also checked
on its own: deep files, CIDv1 with raw leaves, a missing block, a foreign hash function.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dllm_p2p.registry import car
from dllm_p2p.registry.ipfs import EmbeddedStore, _int_field, _len_field, _varint, build_dag, cid_of_directory

from .browser import browser_page, skip_unless_browser
from .procs import Child, start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.browser]

INDEX = Path(__file__).resolve().parent.parent / "frontend" / "index.html"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
POW = "8"
#: A well-formed CID no test publishes (the empty UnixFS folder).
UNKNOWN_CID = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"


def free_port() -> int:
    """A port free right now: the gateway must know its public URL before it listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short(cid: str) -> str:
    """The page's short form of a CID (shortHash in app.js)."""
    return f"{cid[:10]}…{cid[-8:]}" if len(cid) > 20 else cid


def published_with(data_dir: Path, url: str, timeout: float = 60.0) -> str:
    """The node's current CID, once what it published under it lists ``url``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cid = (data_dir / "current_cid.txt").read_text().strip()
            text = (data_dir / "publish" / "blockchain.json").read_text()
            if url in text and cid_of_directory(data_dir / "publish") == cid:
                return cid
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{data_dir} published no registry listing {url} within {timeout:g} s")
        time.sleep(0.1)  # polling a file the gateway rewrites, not waiting on the page


class Published:
    def __init__(self, child: Child, url: str, cid: str) -> None:
        self.child, self.url, self.cid = child, url, cid


@contextlib.contextmanager
def published_gateway(data_dir: Path) -> Iterator[Published]:
    """A gateway that announces its own URL in the registry it publishes; stopped after."""
    skip_unless_browser()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child, listening = start_gateway(
        data_dir, "--public-url", url, "--heartbeat-interval", "1", "--pow-bits", POW, "--no-mdns", port=port
    )
    try:
        assert listening == url
        yield Published(child, url, published_with(data_dir, url))
    finally:
        child.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    with published_gateway(tmp_path_factory.mktemp("registry") / "gateway") as published:
        yield published


def discover(page: Any, cid: str, ipfs: str) -> Any:
    """Open the page from disk (no gateway yet) and look ``cid`` up through ``ipfs``."""
    page.goto(INDEX.as_uri())
    page.get_by_test_id("registry-ref").fill(cid)
    page.get_by_test_id("ipfs-gateway").fill(ipfs)
    page.get_by_test_id("discover-button").click()
    page.wait_for_function("() => /^(?!Loading)./.test(document.querySelector('[data-testid=discover-status]').textContent)")
    return page.get_by_test_id("discover-status")


@pytest.mark.parametrize("viewport", [(1280, 900), (390, 844)], ids=["desktop", "phone"])
def test_page_finds_the_gateway_through_a_car_verified_by_hash(gateway: Published, browser: Any, viewport: tuple[int, int]) -> None:
    from playwright.sync_api import expect

    phone = viewport[0] < 500
    with browser_page(viewport, browser=browser, is_mobile=phone, has_touch=phone) as page:
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url) if "/ipfs/" in r.url else None)
        status = discover(page, gateway.cid, gateway.url)
        expect(page.get_by_test_id("gateway-url")).to_have_value(gateway.url)
        text = status.inner_text()
        expected = rf"Found 1 live gateway in \d+ registry blocks \(verified by hash: {re.escape(short(gateway.cid))}, 2 IPFS blocks\); using {re.escape(gateway.url)}\."
        assert re.fullmatch(expected, text), text
        assert "bad" not in (status.get_attribute("class") or "")
        assert status.get_attribute("data-verified") == "true"
        assert requests == [f"{gateway.url}/ipfs/{gateway.cid}/blockchain.json?format=car"]

        fits(page, status, viewport[0])
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"registry-verified-{'phone' if phone else 'desktop'}.png"), full_page=True)

        # A CID the gateway does not hold: a 404 naming the whole CAR URL, which still fits,
        # and the gateway found before is kept.
        page.get_by_test_id("registry-ref").fill(UNKNOWN_CID)
        page.get_by_test_id("discover-button").click()
        expect(status).to_have_class(re.compile(r"\bbad\b"))
        assert status.inner_text() == f"Cannot load {gateway.url}/ipfs/{UNKNOWN_CID}/blockchain.json?format=car (404)"
        assert page.get_by_test_id("gateway-url").input_value() == gateway.url
        fits(page, status, viewport[0])
        assert page.js_errors == []


def fits(page: Any, status: Any, width: int) -> None:
    """The status line is on screen: no sideways scroll, nothing cut off."""
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    box = status.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
    assert status.evaluate("e => e.scrollWidth <= e.clientWidth")


def test_a_tampered_car_is_refused_and_the_gateway_is_kept(gateway: Published, browser: Any) -> None:
    from playwright.sync_api import expect

    tampered: list[str] = []

    def flip_a_byte_of_the_last_block(route: Any) -> None:
        response = route.fetch()
        body = bytearray(response.body())
        _, blocks = car.read_car(bytes(body), max_blocks=10_000, max_bytes=32 << 20)
        cid, block = blocks[-1]
        body[len(body) - len(block) // 2 - 1] ^= 0x01  # inside the last block's data
        tampered.append(cid)
        route.fulfill(response=response, body=bytes(body))

    with browser_page((390, 844), browser=browser, is_mobile=True, has_touch=True) as page:
        page.route("**/ipfs/**", flip_a_byte_of_the_last_block)
        status = discover(page, gateway.cid, gateway.url)
        expect(status).to_have_class(re.compile(r"\bbad\b"))
        assert len(tampered) == 1
        text = status.inner_text()
        assert f"Block {short(tampered[0])} does not match its hash" == text, text
        assert page.get_by_test_id("gateway-url").input_value() == ""
        assert page.evaluate("window.dllm.state.gateway") == ""
        assert page.evaluate("localStorage.getItem('dllm.gatewayUrl')") is None
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "registry-tampered.png"), full_page=True)

        # The same page, the CAR untouched: now it switches.
        page.unroute("**/ipfs/**")
        page.get_by_test_id("discover-button").click()
        expect(page.get_by_test_id("gateway-url")).to_have_value(gateway.url)
        expect(status).to_contain_text("verified by hash")
        assert page.js_errors == []


# --- the CAR / dag-pb / UnixFS reader on its own ---------------------------------------------

CAR_FILE = """async ([b64, cid, names]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    try {
        const {bytes: out, blocks} = await window.dllm.carFile(bytes, cid, names);
        return {text: new TextDecoder().decode(out), blocks};
    } catch (err) {
        return {error: err.message};
    }
}"""


def read_in_page(page: Any, data: bytes, cid: str, names: list[str]) -> dict[str, Any]:
    return page.evaluate(CAR_FILE, [base64.b64encode(data).decode(), cid, names])


def cidv1(codec: int, block: bytes) -> bytes:
    return _varint(1) + _varint(codec) + b"\x12\x20" + hashlib.sha256(block).digest()


@pytest.fixture(scope="module")
def page(browser: Any) -> Iterator[Any]:
    with browser_page((1280, 900), browser=browser) as p:
        p.goto(INDEX.as_uri())
        yield p
        assert p.js_errors == [], p.js_errors


def test_car_reader_assembles_a_deep_file_from_checked_blocks(page: Any, tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "ipfs")
    data = json.dumps({"blocks": [{"n": i, "pad": "x" * (i % 7)} for i in range(200)]}).encode()
    # Tiny chunks and 3 links a node: a file tree several levels deep.
    root = build_dag({"blockchain.json": data}, sink=store.put_block, chunk_size=64, max_links=3).cid
    blocks = list(car.dag_blocks(store, root))
    assert len(blocks) > 100
    whole = car.write_car([root], blocks)
    assert read_in_page(page, whole, root, ["blockchain.json"]) == {"text": data.decode(), "blocks": len(blocks)}

    missing = blocks[len(blocks) // 2][0]
    holed = car.write_car([root], [b for b in blocks if b[0] != missing])
    assert read_in_page(page, holed, root, ["blockchain.json"]) == {"error": f"block {short(missing)} is missing from the CAR"}
    assert read_in_page(page, whole, root, ["other.json"]) == {"error": f"no other.json under {short(root)}"}
    assert read_in_page(page, whole[:-5], root, ["blockchain.json"])["error"].startswith("the CAR is cut short")
    assert read_in_page(page, b'{"blocks": []}', root, ["blockchain.json"]) == {"error": "the answer is not a CARv1"}


def test_car_reader_takes_cidv1_and_raw_leaves_and_refuses_other_hashes(page: Any) -> None:
    leaf = b'{"blocks": []}'
    leaf_cid = cidv1(car.RAW, leaf)
    link = _len_field(1, leaf_cid) + _len_field(2, b"blockchain.json") + _int_field(3, len(leaf))
    folder = _len_field(2, link) + _len_field(1, _int_field(1, 1))  # UnixFS Directory
    root = car.cid_from_bytes(cidv1(car.DAG_PB, folder))
    assert root.startswith("bafy")
    blocks = [(root, folder), (car.cid_from_bytes(leaf_cid), leaf)]
    assert read_in_page(page, car.write_car([root], blocks), root, ["blockchain.json"]) == {"text": leaf.decode(), "blocks": 2}

    # The same leaf under a sha2-512 CID (0x13): refused, whatever the bytes.
    header = car._header([root])
    foreign = _varint(1) + _varint(car.RAW) + b"\x13\x40" + hashlib.sha512(leaf).digest()
    data = _varint(len(header)) + header + _varint(len(foreign) + len(leaf)) + foreign + leaf
    assert read_in_page(page, data, root, ["blockchain.json"]) == {"error": "a CID uses hash 0x13: only sha2-256 is accepted"}
