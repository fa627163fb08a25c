"""frontend/static/verify.js against dllm_p2p/registry/chain.py, in headless Chromium.

Chains made by Python (``make_record``, ``Chain.append``) must verify in the browser
(WebCrypto Ed25519 and SHA-256) with the same head, and every altered copy must be refused
by both, naming the same first bad block: one byte of a signature, an addr, a block's prev,
and a list of other edits (re-linked or not, as a forger would). The canonical encoding,
signing bytes, block hashes and peer ids are compared byte for byte.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dllm_p2p.identity import Identity
from dllm_p2p.registry.chain import (
    Chain,
    InvalidChain,
    block_hash,
    canonical,
    make_record,
    signing_bytes,
    solve_pow,
    verify_chain,
)

from .browser import browser_page
from .test_chain import ident, relink

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
INDEX = ROOT / "frontend" / "index.html"
EXAMPLE = ROOT / "docs" / "examples" / "blockchain.json"
T = 1_767_225_600  # 2026-01-01T00:00:00Z: records are issued around it
NOW = T + 1000  # the verifiers' clock (both are given it)
POW_BITS = 8


def pow_of(who: Identity) -> str:
    return _pow(who.peer_id.to_base58())


@functools.cache
def _pow(peer_id: str) -> str:
    return solve_pow(peer_id, POW_BITS)


def rec(who: Identity, seq: int, *, op: str = "register", at: int = T, addrs: list[str] | None = None,
        models: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return make_record(who, op, ["/ip4/192.0.2.1/tcp/4001"] if addrs is None else addrs,
                       ["gpt2"] if models is None else models, seq, 600, now=at, pow=pow_of(who), **extra)


def realistic() -> Chain:
    """Every kind of record the format has, on a checkpoint that asks for proof of work."""
    worker, span, gateway, relay = ident("worker"), ident("span worker"), ident("gateway"), ident("relay")
    spans = {"smollm2": {"fingerprint": "sha256:" + "ab" * 32, "span": [0, 15], "layers": 30}}
    records = [
        rec(worker, 1, role="worker", addrs=["/ip4/192.0.2.10/tcp/4001", "/ip4/192.0.2.10/udp/4001/quic-v1"]),
        rec(span, 1, at=T + 1, models=["smollm2"], spans=spans),
        rec(gateway, 1, at=T + 2, addrs=[], models=[], role="gateway", gateway_url="https://gw.example.org/dllm"),
        rec(relay, 1, at=T + 3, role="relay", addrs=["/dns4/relay.example.org/tcp/4001/p2p/12D3KooWx"], models=[]),
        rec(worker, 2, op="renew", at=T + 300, role="worker"),
        rec(gateway, 2, op="deregister", at=T + 400, addrs=[], models=[], role="gateway"),
        rec(worker, 3, at=T + 500, models=["gpt2", "a \"quoted\" \\ model~"]),
    ]
    chain = Chain(pow_bits=POW_BITS)
    for record in records:
        chain = chain.append(record)
    return chain


@pytest.fixture(scope="module")
def page(browser: Any) -> Iterator[Any]:
    with browser_page(browser=browser) as p:
        p.goto(INDEX.as_uri())
        p.wait_for_function("() => Boolean(window.dllmVerify)")
        yield p
        assert p.js_errors == [], p.js_errors


VERIFY = """async ([text, now, clamp]) => {
    const r = await window.dllmVerify.verifyChain(JSON.parse(text), {now, clamp});
    return {ok: r.ok, error: r.error, firstBad: r.firstBad, head: r.head ?? null, powBits: r.powBits ?? null};
}"""


def in_browser(page: Any, doc: Any, now: float = NOW, clamp: bool = False) -> dict[str, Any]:
    return page.evaluate(VERIFY, [json.dumps(doc), now, clamp])


def in_python(doc: Any, now: float = NOW, clamp: bool = False) -> dict[str, Any]:
    try:
        chain = verify_chain(json.dumps(doc), now=now, clamp=clamp)
    except InvalidChain as exc:
        return {"ok": False, "error": str(exc), "firstBad": exc.index}
    return {"ok": True, "error": None, "firstBad": None, "head": chain.head, "powBits": chain.pow_bits}


def flip_signature_byte(doc: dict[str, Any], index: int) -> None:
    record = doc["blocks"][index]["record"]
    raw = bytearray(base64.b64decode(record["signature"]))
    raw[17] ^= 0x01
    record["signature"] = base64.b64encode(bytes(raw)).decode()


# --- accepted -------------------------------------------------------------------------------


def test_chains_python_made_verify_in_the_browser_with_the_same_head(page: Any) -> None:
    chain = realistic()
    doc = chain.to_dict()
    assert in_python(doc)["ok"]
    result = in_browser(page, doc)
    assert result == {"ok": True, "error": None, "firstBad": None, "head": chain.head, "powBits": POW_BITS}

    example = json.loads(EXAMPLE.read_text())  # docs/REGISTRY.md's example: no proof of work
    result = in_browser(page, example)
    assert result["ok"], result
    assert result["head"] == example["blocks"][-1]["hash"] and result["powBits"] == 0

    # The checkpoint alone (a registry nobody has joined yet) is a valid chain too.
    assert in_browser(page, Chain().to_dict())["ok"]


def test_canonical_bytes_signing_bytes_hashes_and_peer_ids_match_python(page: Any) -> None:
    values = [
        {"b": 1, "a": [True, False, None, 0, 9007199254740991], "c": {"z": "", "y": "x"}},
        "quote \" backslash \\ slash / tilde ~ space",
        "controls \x00\x01\x08\t\n\x0c\r\x1f and DEL \x7f",
        "non-ASCII é ü 日本 and astral \U0001f600",
        {"B": 1, "a": 2, "_": 3, "0": 4, "aa": 5, "a b": 6},
        [],
        {},
    ]
    got = page.evaluate("vs => vs.map((v) => window.dllmVerify.canonical(v))", values)
    assert got == [canonical(v).decode("ascii") for v in values]

    doc = realistic().to_dict()
    records = [block["record"] for block in doc["blocks"][1:]]
    js = page.evaluate(
        """async (doc) => {
            const d = window.dllmVerify;
            const hex = (bytes) => [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
            const records = doc.blocks.slice(1).map((b) => b.record);
            return {
                signing: records.map((r) => hex(d.signingBytes(r))),
                hashes: await Promise.all(doc.blocks.map((b) => d.blockHash(b))),
                peers: records.map((r) => d.peerIdFromPublicKey(r.public_key)),
            };
        }""",
        doc,
    )
    assert js["signing"] == [signing_bytes(r).hex() for r in records]
    assert js["hashes"] == [block_hash(b) for b in doc["blocks"]] == [b["hash"] for b in doc["blocks"]]
    assert js["peers"] == [r["peer_id"] for r in records]

    keys = [ident(f"key {i}") for i in range(24)]
    got = page.evaluate("ks => ks.map((k) => window.dllmVerify.peerIdFromPublicKey(k))", [k.public_key_b64 for k in keys])
    assert got == [k.peer_id.to_base58() for k in keys]
    # Not an Ed25519 libp2p key (a secp256k1 protobuf, a bare 32-byte key): no peer id.
    assert page.evaluate("k => window.dllmVerify.peerIdFromPublicKey(k)", base64.b64encode(b"\x08\x02\x12\x21" + b"\x02" * 33).decode()) is None
    assert page.evaluate("k => window.dllmVerify.peerIdFromPublicKey(k)", base64.b64encode(b"\x01" * 32).decode()) is None


def test_proof_of_work_matches_python(page: Any) -> None:
    from dllm_p2p.registry.chain import pow_ok

    peer = ident("worker").peer_id.to_base58()
    cases = [(peer, pow_of(ident("worker")), bits) for bits in (0, 1, 4, 8)]
    cases += [(peer, str(n), bits) for n in range(40) for bits in (1, 3, 9)]
    cases += [(peer, "", 4), (peer, "x" * 33, 1), (peer, None, 1), (peer, None, 0)]
    got = page.evaluate("cs => Promise.all(cs.map(([p, n, b]) => window.dllmVerify.powOk(p, n, b)))", cases)
    assert got == [pow_ok(p, n, b) for p, n, b in cases]
    assert True in got and False in got


# --- refused, naming the first bad block ------------------------------------------------------


def test_one_byte_of_a_signature_altered(page: Any) -> None:
    doc = realistic().to_dict()
    flip_signature_byte(doc, 3)
    # Re-linked or not: the edited block is the first bad one.
    for altered in (doc, relink(copy.deepcopy(doc))):
        result = in_browser(page, altered)
        assert result["ok"] is False and result["firstBad"] == 3, result
        assert result["error"] == "block 3: bad signature"
        assert in_python(altered)["error"] == result["error"]


def test_an_addr_changed(page: Any) -> None:
    doc = realistic().to_dict()
    doc["blocks"][5]["record"]["addrs"][0] = "/ip4/203.0.113.66/tcp/4001"
    for altered in (doc, relink(copy.deepcopy(doc))):
        result = in_browser(page, altered)
        assert (result["ok"], result["firstBad"], result["error"]) == (False, 5, "block 5: bad signature")
        assert in_python(altered)["error"] == result["error"]


def test_a_blocks_prev_changed(page: Any) -> None:
    doc = realistic().to_dict()
    doc["blocks"][4]["prev"] = doc["blocks"][2]["hash"]
    result = in_browser(page, doc)
    assert (result["ok"], result["firstBad"]) == (False, 4)
    assert result["error"] == "block 4: broken link: prev is not the hash of block 3"
    assert in_python(doc)["error"] == result["error"]

    # Its hash recomputed too: the link still breaks there (and the next block's would).
    doc["blocks"][4]["hash"] = block_hash(doc["blocks"][4])
    assert in_browser(page, doc)["firstBad"] == 4 == in_python(doc)["firstBad"]


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return edit


def _swap_key(doc: dict[str, Any]) -> None:
    """Block 2 claims another node's key (and so its peer id check fails)."""
    doc["blocks"][2]["record"]["public_key"] = doc["blocks"][1]["record"]["public_key"]


def _swap_identity(doc: dict[str, Any]) -> None:
    """Block 2 claims another node's key and peer id: the signature is not theirs."""
    for key in ("public_key", "peer_id", "pow"):
        doc["blocks"][2]["record"][key] = doc["blocks"][1]["record"][key]


def _stray_bits(doc: dict[str, Any]) -> None:
    """The same signature bytes spelled differently: base64 with non-zero padding bits."""
    record = doc["blocks"][2]["record"]
    text = record["signature"]
    assert text.endswith("==")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    record["signature"] = text[:-3] + alphabet[alphabet.index(text[-3]) | 1] + "=="


def _replay(doc: dict[str, Any]) -> None:
    """The worker's seq-1 record appended again at the end: its seq does not grow."""
    doc["blocks"].append({"index": len(doc["blocks"]), "prev": "", "record": copy.deepcopy(doc["blocks"][1]["record"])})


def _reorder(doc: dict[str, Any]) -> None:
    blocks = doc["blocks"]
    blocks[1], blocks[5] = blocks[5], blocks[1]
    blocks[1]["index"], blocks[5]["index"] = 1, 5


def _future_record(doc: dict[str, Any]) -> None:
    """A record signed by its node, but issued two hours ahead of the verifier's clock."""
    doc["blocks"].append({"index": len(doc["blocks"]), "prev": "", "record": rec(ident("relay"), 2, at=NOW + 7200, models=[])})


def _proofless(doc: dict[str, Any]) -> None:
    """A correctly signed record from a key that did no work."""
    lazy = ident("lazy")
    record = make_record(lazy, "register", [], [], 1, 600, now=T, pow="1")  # a nonce that proves nothing
    doc["blocks"].append({"index": len(doc["blocks"]), "prev": "", "record": record})


#: (name, edit, relink afterwards?) Both verifiers must agree on ok and the first bad block.
EDITS: list[tuple[str, Callable[[dict[str, Any]], None], bool]] = [
    ("stored hash", _set(("blocks", 6, "hash"), "f" * 64), False),
    ("hash not hex", _set(("blocks", 2, "hash"), "F" * 64), False),
    ("checkpoint hash", _set(("blocks", 0, "hash"), "0" * 64), False),
    ("checkpoint prev", _set(("blocks", 0, "prev"), "1" * 64), False),
    ("pow_bits lowered", _set(("blocks", 0, "checkpoint", "pow_bits"), 1), True),
    ("pow_bits raised", _set(("blocks", 0, "checkpoint", "pow_bits"), 30), True),
    ("pow_bits removed", _delete(("blocks", 0, "checkpoint", "pow_bits")), True),
    ("pow_bits zero", _set(("blocks", 0, "checkpoint", "pow_bits"), 0), True),
    ("checkpoint from the future", _set(("blocks", 0, "checkpoint", "compacted_at"), NOW + 301), True),
    ("checkpoint a little ahead", _set(("blocks", 0, "checkpoint", "compacted_at"), NOW + 299), True),
    ("index", _set(("blocks", 3, "index"), 4), True),
    ("index a string", _set(("blocks", 3, "index"), "3"), True),
    ("index a bool", _set(("blocks", 1, "index"), True), True),
    ("record in block 0", lambda d: d["blocks"][0].update(record={}), True),
    ("checkpoint in block 2", lambda d: d["blocks"][2].update(checkpoint={"compacted_at": 0}), True),
    ("unknown block key", lambda d: d["blocks"][2].update(note="hi"), True),
    ("unknown record key", lambda d: d["blocks"][2]["record"].update(note="hi"), True),
    ("missing record key", _delete(("blocks", 4, "record", "models")), True),
    ("seq a float", _set(("blocks", 2, "record", "seq"), 1.5), True),
    ("seq a bool", _set(("blocks", 2, "record", "seq"), True), True),
    ("seq too big", _set(("blocks", 2, "record", "seq"), 2**53), True),
    ("seq raised", _set(("blocks", 5, "record", "seq"), 9), True),
    ("expires extended", _set(("blocks", 1, "record", "expires"), T + 86_400), True),
    ("life too long", _set(("blocks", 1, "record", "expires"), T + 86_401), True),
    ("expires before issued", _set(("blocks", 1, "record", "expires"), T), True),
    ("role changed", _set(("blocks", 1, "record", "role"), "gateway"), True),
    ("role unknown", _set(("blocks", 1, "record", "role"), "king"), True),
    ("op unknown", _set(("blocks", 1, "record", "op"), "crown"), True),
    ("gateway_url changed", _set(("blocks", 3, "record", "gateway_url"), "https://evil.example.org"), True),
    ("gateway_url not http", _set(("blocks", 3, "record", "gateway_url"), "ftp://gw.example.org"), True),
    ("gateway_url on a worker", _set(("blocks", 1, "record", "gateway_url"), "https://gw.example.org"), True),
    ("model added", lambda d: d["blocks"][1]["record"]["models"].append("llama"), True),
    ("model non-ASCII", _set(("blocks", 1, "record", "models", 0), "gpt2é"), True),
    ("addr not a multiaddr", _set(("blocks", 1, "record", "addrs", 0), "ip4/1.2.3.4"), True),
    ("too many addrs", _set(("blocks", 1, "record", "addrs"), ["/a"] * 17), True),
    ("spans changed", _set(("blocks", 2, "record", "spans", "smollm2", "span"), [0, 30]), True),
    ("spans past the end", _set(("blocks", 2, "record", "spans", "smollm2", "span"), [0, 31]), True),
    ("pow changed", _set(("blocks", 4, "record", "pow"), "0"), True),
    ("signature not base64", _set(("blocks", 2, "record", "signature"), "not*base64"), True),
    ("signature not canonical", lambda d: d["blocks"][2]["record"].update(signature=d["blocks"][2]["record"]["signature"].rstrip("=")), True),
    ("signature with stray bits", _stray_bits, True),
    ("signature cut short", lambda d: d["blocks"][2]["record"].update(signature=d["blocks"][2]["record"]["signature"][:40]), True),
    ("key of another node", _swap_key, True),
    ("identity of another node", _swap_identity, True),
    ("peer id of another node", _set(("blocks", 2, "record", "peer_id"), "12D3KooWKLojXHJr5s8EuqnPaZdVY6n4rvMz8T9gs9na84rT7Z9c"), True),
    ("record replayed", _replay, True),
    ("records reordered", _reorder, True),
    ("record issued in the future", _future_record, True),
    ("record without proof of work", _proofless, True),
    ("format", _set(("format",), "dllm-registry/2"), False),
    ("no blocks", _set(("blocks",), []), False),
    ("blocks not a list", _set(("blocks",), {}), False),
    ("extra top-level key", lambda d: d.update(extra=1), False),
    ("block not an object", _set(("blocks", 3), [1, 2]), False),
    ("record not an object", _set(("blocks", 3, "record"), "x"), True),
]


@pytest.mark.parametrize(("edit", "again"), [(e, r) for _, e, r in EDITS], ids=[n for n, _, _ in EDITS])
def test_browser_and_python_agree_on_edited_chains(page: Any, edit: Callable[[dict[str, Any]], None], again: bool) -> None:
    doc = realistic().to_dict()
    edit(doc)
    if again:
        relink(doc)
    expected = in_python(doc)
    got = in_browser(page, doc)
    assert (got["ok"], got["firstBad"]) == (expected["ok"], expected["firstBad"]), (got, expected)
    if not expected["ok"]:
        assert got["error"] == expected["error"]
    # As a node takes a peer's chain (clamp), which is how the page takes a registry.
    clamped = in_python(doc, clamp=True)
    assert in_browser(page, doc, clamp=True)["ok"] == clamped["ok"]


def test_the_page_takes_a_checkpoint_stamped_ahead_of_its_clock(page: Any) -> None:
    """The stamp is not signed and the page merges nothing: a browser whose clock is slow
    still takes an honest registry, as a node does (``clamp``)."""
    doc = relink(_stamped(realistic().to_dict(), NOW + 3600))
    assert in_python(doc)["firstBad"] == 0 == in_browser(page, doc)["firstBad"]
    assert in_python(doc, clamp=True)["ok"]
    assert page.evaluate(
        "async ([t, now]) => (await window.dllmVerify.verifyChain(t, {now})).ok", [json.dumps(doc), NOW]
    ) is True


def _stamped(doc: dict[str, Any], at: int) -> dict[str, Any]:
    doc["blocks"][0]["checkpoint"]["compacted_at"] = at
    return doc


def test_verification_needs_no_network_and_never_throws_for_junk(page: Any) -> None:
    junk = ["null", "[]", "1", '"x"', "{}", '{"format": "dllm-registry/1"}', '{"format": "dllm-registry/1", "blocks": [null]}', "not json"]
    got = page.evaluate(
        "docs => Promise.all(docs.map((t) => window.dllmVerify.verifyChain(t).then((r) => [r.ok, r.firstBad])))", junk
    )
    assert got == [[False, None]] * 6 + [[False, 0], [False, None]], got


def test_a_browser_that_cannot_check_trusts_nothing(browser: Any) -> None:
    """Without WebCrypto (a page served over plain http from another host) nothing is trusted."""
    with browser_page(browser=browser) as page:
        page.add_init_script("Object.defineProperty(globalThis.crypto, 'subtle', {get: () => undefined})")
        page.goto(INDEX.as_uri())
        got = page.evaluate(
            """async (t) => {
                try { await window.dllmVerify.trusted(JSON.parse(t)); return "trusted"; }
                catch (err) { return [err.name, err.message, window.dllmVerify.last.ok]; }
            }""",
            json.dumps(realistic().to_dict()),
        )
        assert got[0] == "RegistryUntrusted" and "cannot check the registry's signatures" in got[1] and got[2] is False, got
        assert page.js_errors == []
