"""Registry chain and its file store: verification, merge, compaction, atomic files."""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair

from dllm_p2p import identity
from dllm_p2p.identity import Identity
from dllm_p2p.registry import chain as chain_mod
from dllm_p2p.registry.chain import (
    FORMAT,
    MAX_BLOCKS,
    MAX_FILE_BYTES,
    MAX_RECORD_BYTES,
    RECORD_DOMAIN,
    ZERO_HASH,
    Chain,
    ChainFull,
    InvalidChain,
    InvalidRecord,
    block_hash,
    canonical,
    compact,
    make_record,
    merge,
    verify_chain,
)
from dllm_p2p.registry.store import FILENAME, ChainStore, load_chain, save_chain, verify_file

ROOT = Path(__file__).resolve().parent.parent
ADDR = "/ip4/127.0.0.1/tcp/4001"


@functools.cache
def ident(name: str) -> Identity:
    """A fixed key per name: fast, and reproducible (Ed25519 signatures are deterministic)."""
    return Identity(create_new_key_pair(hashlib.sha256(name.encode()).digest()))


A, B, C = ident("peer a"), ident("peer b"), ident("peer c")


def rec(who: Identity, seq: int, *, op: str = "register", now: int = 1000, ttl: int = 600,
        addrs: list[str] | None = None, models: list[str] | None = None, **extra: str) -> dict[str, Any]:
    return make_record(who, op, addrs if addrs is not None else [ADDR],
                       models if models is not None else ["gpt2"], seq, ttl, now=now, **extra)


def build(*records: dict[str, Any]) -> Chain:
    chain = Chain()
    for record in records:
        chain = chain.append(record)
    return chain


def doc_of(chain: Chain) -> dict[str, Any]:
    return json.loads(chain.to_json())


def relink(doc: dict[str, Any]) -> dict[str, Any]:
    """Recompute every prev and hash, as a forger rewriting the whole file would."""
    prev = ZERO_HASH
    for block in doc["blocks"]:
        block["prev"] = prev
        block["hash"] = prev = block_hash(block)
    return doc


def expect_invalid(doc: dict[str, Any] | str | bytes, index: int | None, reason: str) -> InvalidChain:
    data = doc if isinstance(doc, (str, bytes)) else json.dumps(doc)
    with pytest.raises(InvalidChain) as info:
        verify_chain(data)
    assert info.value.index == index, str(info.value)
    assert reason in info.value.reason, str(info.value)
    prefix = "" if index is None else f"block {index}: "
    assert str(info.value) == prefix + info.value.reason
    return info.value


@pytest.fixture
def three() -> Chain:
    return build(rec(A, 1, now=1000), rec(B, 1, now=1001), rec(A, 2, op="renew", now=1300))


# ----------------------------------------------------------------------------- format


def test_round_trip_and_nodes(three: Chain) -> None:
    again = verify_chain(three.to_json())
    assert again == three and again.to_json() == three.to_json()
    assert Chain.from_json(three.to_json().encode()) == three
    blocks = three.blocks
    assert [b["index"] for b in blocks] == [0, 1, 2, 3]
    assert blocks[0] == {"index": 0, "prev": ZERO_HASH, "checkpoint": {"compacted_at": 0},
                         "hash": blocks[0]["hash"]}
    for prev, block in zip(blocks, blocks[1:]):
        assert block["prev"] == prev["hash"] == block_hash(prev)
    assert three.head == blocks[-1]["hash"]

    nodes = three.nodes(1400)
    assert set(nodes) == {A.peer_id.to_base58(), B.peer_id.to_base58()}
    assert nodes[A.peer_id.to_base58()]["seq"] == 2
    assert set(three.nodes(1700)) == {A.peer_id.to_base58()}  # B expired at 1601
    assert three.nodes(1900) == {}
    assert three.next_seq(A.peer_id.to_base58()) == 3
    assert three.next_seq(C.peer_id.to_base58()) == 1


def test_signature_rule_is_byte_exact() -> None:
    record = rec(A, 7, role="gateway", gateway_url="https://gw.example.org", models=[])
    body = {k: v for k, v in record.items() if k != "signature"}
    signed = b"dllm-registry-record/1\n" + json.dumps(
        body, sort_keys=True, separators=(",", ":")).encode("ascii")
    assert RECORD_DOMAIN == b"dllm-registry-record/1\n"
    assert identity.verify(A.public_key_bytes, signed, base64.b64decode(record["signature"]))
    assert record["public_key"] == A.public_key_b64
    assert record["peer_id"] == A.peer_id.to_base58()
    assert record["expires"] == record["issued"] + 600


def test_block_hash_is_sha256_of_canonical_block_without_hash(three: Chain) -> None:
    block = three.blocks[2]
    body = {k: v for k, v in block.items() if k != "hash"}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert raw == canonical(body)
    assert block["hash"] == hashlib.sha256(raw).hexdigest()


def test_make_record_rejects_bad_input() -> None:
    with pytest.raises(InvalidRecord, match="unknown op"):
        rec(A, 1, op="update")
    with pytest.raises(InvalidRecord, match="expires must be after issued"):
        rec(A, 1, ttl=0)
    with pytest.raises(InvalidRecord, match="unknown field 'colour'"):
        rec(A, 1, colour="red")
    with pytest.raises(InvalidRecord, match="only allowed with role 'gateway'"):
        rec(A, 1, gateway_url="https://x.example")


def test_append_rejects_replay_lower_seq_and_forgery(three: Chain) -> None:
    first = three.records[0]
    with pytest.raises(InvalidRecord, match="seq 1 does not grow: block 3 of the same peer has seq 2"):
        three.append(first)
    with pytest.raises(InvalidRecord, match="does not grow"):
        three.append(rec(A, 2, now=2000))
    forged = {**rec(C, 1), "addrs": ["/ip4/6.6.6.6/tcp/1"]}
    with pytest.raises(InvalidRecord, match="bad signature"):
        three.append(forged)
    assert three.append(rec(A, 3, now=2000)).next_seq(A.peer_id.to_base58()) == 4


# ----------------------------------------------------------------------------- rejections


def test_forged_signature(three: Chain) -> None:
    doc = doc_of(three)
    doc["blocks"][2]["record"]["addrs"] = ["/ip4/6.6.6.6/tcp/4001"]
    expect_invalid(doc, 2, "bad signature")
    expect_invalid(relink(doc), 2, "bad signature")

    doc = doc_of(three)  # a signature lifted from another record
    doc["blocks"][1]["record"]["signature"] = doc["blocks"][3]["record"]["signature"]
    expect_invalid(relink(doc), 1, "bad signature")


def test_tampered_hash_field(three: Chain) -> None:
    doc = doc_of(three)
    doc["blocks"][3]["hash"] = "f" * 64
    expect_invalid(doc, 3, "hash mismatch")
    doc = doc_of(three)
    doc["blocks"][0]["checkpoint"]["compacted_at"] = 5  # unsigned, but hashed and linked
    expect_invalid(doc, 0, "hash mismatch")


def test_record_signed_by_another_key() -> None:
    # B signs a record that claims to be A: its key gives it away.
    lie = rec(B, 1)
    lie["peer_id"] = A.peer_id.to_base58()
    doc = relink(doc_of(build(rec(C, 1))))
    doc["blocks"].append({"index": 2, "record": lie})
    expect_invalid(relink(doc), 2, "peer id does not match the public key")

    # A's peer id and A's key, but B's signature.
    stolen = rec(A, 1)
    stolen["signature"] = rec(B, 1)["signature"]
    doc["blocks"][2]["record"] = stolen
    expect_invalid(relink(doc), 2, "bad signature")


def test_replayed_and_lowered_seq(three: Chain) -> None:
    doc = doc_of(three)
    doc["blocks"].append({"index": 4, "record": doc["blocks"][1]["record"]})  # replay
    expect_invalid(relink(doc), 4, "seq 1 does not grow: block 3 of the same peer has seq 2")

    lowered = doc_of(build(rec(A, 5), rec(B, 1)))
    lowered["blocks"].append({"index": 3, "record": rec(A, 4, now=2000)})
    expect_invalid(relink(lowered), 3, "seq 4 does not grow: block 1 of the same peer has seq 5")


def test_reordered_blocks(three: Chain) -> None:
    doc = doc_of(three)
    doc["blocks"][1], doc["blocks"][2] = doc["blocks"][2], doc["blocks"][1]
    expect_invalid(doc, 1, "out of order: index 2 at position 1")

    for i, block in enumerate(doc["blocks"]):
        block["index"] = i
    expect_invalid(doc, 1, "broken link: prev is not the hash of block 0")

    doc = doc_of(three)  # a forger re-links A's renew before A's register
    blocks = doc["blocks"]
    blocks[1], blocks[3] = blocks[3], blocks[1]
    for i, block in enumerate(blocks):
        block["index"] = i
    expect_invalid(relink(doc), 3, "seq 1 does not grow: block 1 of the same peer has seq 2")


def test_truncated_file(three: Chain) -> None:
    text = three.to_json().encode()
    for cut in range(0, len(text) - 2, 41):
        expect_invalid(text[:cut], None, "not valid JSON")
    doc = doc_of(three)
    doc["blocks"] = doc["blocks"][1:]  # lost its head end: no checkpoint
    expect_invalid(doc, 0, "the first block must be a checkpoint")
    # Losing whole blocks at the tail leaves an older chain, which is still valid.
    doc = doc_of(three)
    doc["blocks"] = doc["blocks"][:2]
    assert len(verify_chain(json.dumps(doc)).records) == 1


def _set(path: str, value: Any) -> Any:
    def mutate(record: dict[str, Any]) -> None:
        record[path] = value
    return mutate


def _drop(path: str) -> Any:
    return lambda record: record.pop(path)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_set("op", "update"), "unknown op 'update'"),
        (_set("seq", "5"), "seq must be an integer"),
        (_set("seq", True), "seq must be an integer"),
        (_set("seq", -1), "seq must be an integer"),
        (_set("seq", 2**53), "seq must be an integer"),
        (_set("expires", 10.5), "expires must be an integer"),
        (_set("expires", 999), "expires must be after issued"),
        (_drop("models"), "missing field 'models'"),
        (_drop("signature"), "missing field 'signature'"),
        (_set("colour", "red"), "unknown field 'colour'"),
        (_set("addrs", "/ip4/1.2.3.4/tcp/1"), "addrs must be a list"),
        (_set("addrs", [ADDR] * 17), "addrs has 17 entries, more than 16"),
        (_set("addrs", ["/" + "a" * 256]), "addrs entry must be 1 to 256 characters"),
        (_set("addrs", ["ip4/1.2.3.4"]), "is not a multiaddr"),
        (_set("addrs", [7]), "addrs entry must be a string"),
        (_set("models", ["gpt2\u00e9"]), "models entry must be printable ASCII"),
        (_set("models", ["gpt2\n"]), "models entry must be printable ASCII"),
        (_set("models", ["m" * 120] * 20), f"larger than {MAX_RECORD_BYTES} bytes"),
        (_set("role", "admin"), "unknown role 'admin'"),
        (_set("gateway_url", "https://gw.example"), "only allowed with role 'gateway'"),
        (_set("peer_id", ""), "peer_id must be 1 to 128 characters"),
        (_set("public_key", "not base64!"), "public_key is not valid base64"),
        (_set("public_key", "CAESIB=="), "public_key is not canonical base64"),
        (_set("public_key", "AAAA"), "public_key is not a libp2p public key"),
        (_set("signature", "AAAA"), "bad signature"),
    ],
)
def test_malformed_record(three: Chain, mutate: Any, reason: str) -> None:
    doc = doc_of(three)
    mutate(doc["blocks"][2]["record"])
    expect_invalid(relink(doc), 2, reason)


@pytest.mark.parametrize(
    ("mutate", "index", "reason"),
    [
        (lambda d: d["blocks"].__setitem__(2, [1, 2]), 2, "block must be a JSON object"),
        (lambda d: d["blocks"][2].__setitem__("record", "x"), 2, "record must be a JSON object"),
        (lambda d: d["blocks"][2].__setitem__("index", "2"), 2, "index must be an integer"),
        (lambda d: d["blocks"][2].pop("hash"), 2, "missing field 'hash'"),
        (lambda d: d["blocks"][2].__setitem__("extra", 1), 2, "unknown field 'extra'"),
        (lambda d: d["blocks"][2].__setitem__("checkpoint", {}), 2,
         "only the first block may be a checkpoint"),
        (lambda d: d["blocks"][2].__setitem__("prev", "A" * 64), 2,
         "prev must be 64 lowercase hex digits"),
        (lambda d: d["blocks"][0].__setitem__("prev", "1" * 64), 0,
         "the first block's prev must be 64 zeros"),
        (lambda d: d["blocks"][0]["checkpoint"].__setitem__("compacted_at", 1.5), 0,
         "compacted_at must be an integer"),
        (lambda d: d["blocks"][0]["checkpoint"].__setitem__("records", []), 0,
         "checkpoint: unknown field 'records'"),
        (lambda d: d["blocks"][0]["checkpoint"].__setitem__("compacted_at", 2**52), 0,
         "checkpoint is in the future"),
    ],
)
def test_malformed_block(three: Chain, mutate: Any, index: int, reason: str) -> None:
    doc = doc_of(three)
    mutate(doc)
    expect_invalid(doc, index, reason)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[]", "the document must be a JSON object"),
        ('{"format": "dllm-registry/2", "blocks": []}', "unsupported format"),
        ('{"format": "dllm-registry/1"}', "missing field 'blocks'"),
        ('{"format": "dllm-registry/1", "blocks": {}}', "blocks must be a list"),
        ('{"format": "dllm-registry/1", "blocks": []}', "no blocks"),
        ('{"format": "dllm-registry/1", "format": "x", "blocks": []}', "duplicate key 'format'"),
        ('{"format": "dllm-registry/1", "blocks": [NaN]}', "not valid JSON"),
        (b'{"format": "\xff"}', "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_malformed_document(text: str | bytes, reason: str) -> None:
    expect_invalid(text, None, reason)


def test_oversize_documents() -> None:
    blocks = json.dumps({"format": FORMAT, "blocks": [0] * (MAX_BLOCKS + 1)})
    expect_invalid(blocks, None, f"more than {MAX_BLOCKS}")
    expect_invalid(b" " * (MAX_FILE_BYTES + 1), None, "larger than")


def test_largest_chain_fits_in_a_file() -> None:
    """The caps are consistent: MAX_BLOCKS of the largest records, as written, fit."""
    base = {"op": "register", "peer_id": A.peer_id.to_base58(), "public_key": A.public_key_b64,
            "seq": MAX_BLOCKS, "issued": 2**53 - 2, "expires": 2**53 - 1, "role": "gateway",
            "addrs": ["/"] * 16, "models": ["m"] * 32, "gateway_url": "http://x"}
    signature = {"signature": "A" * 86 + "=="}
    room = MAX_RECORD_BYTES - len(canonical({**base, **signature}))
    base["gateway_url"] += "x" * room
    record = {**base, **signature}
    assert len(canonical(record)) == MAX_RECORD_BYTES
    block = {"index": MAX_BLOCKS, "prev": "0" * 64, "record": record, "hash": "0" * 64}
    per_block = len(json.dumps({"blocks": [block, block]}, indent=2)) - len(
        json.dumps({"blocks": [block]}, indent=2))
    assert len(Chain().to_json()) + (MAX_BLOCKS - 1) * per_block <= MAX_FILE_BYTES


def test_chain_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain_mod, "MAX_BLOCKS", 3)
    chain = build(rec(A, 1), rec(B, 1))
    with pytest.raises(ChainFull):
        chain.append(rec(C, 1))
    with pytest.raises(ChainFull):
        merge(chain, build(rec(C, 1)))


# ----------------------------------------------------------------------------- merge


def test_fork_and_merge_converges_with_three_peers() -> None:
    base = build(rec(A, 1, now=1000))
    fork_a = base.append(rec(A, 2, op="renew", now=1300))
    fork_b = base.append(rec(B, 1, now=1100, models=["gpt2", "distilgpt2"]))
    fork_c = base.append(rec(C, 1, now=1200, role="gateway", gateway_url="https://gw.example",
                             models=[]))
    heads = {fork_a.head, fork_b.head, fork_c.head}
    assert len(heads) == 3  # really forked

    results = set()
    for x, y, z in itertools.permutations([fork_a, fork_b, fork_c]):
        results.add(merge(merge(x, y), z).to_json())
        results.add(merge(x, merge(y, z)).to_json())
    assert len(results) == 1
    merged = verify_chain(results.pop())
    assert merged == merge(fork_a, merge(fork_b, fork_c))
    assert merge(merged, merged) == merged and merge(merged, fork_b) == merged

    # Canonical order is (issued, peer id, seq); A's register is shadowed by its renew.
    assert [(r["peer_id"], r["seq"]) for r in merged.records] == [
        (B.peer_id.to_base58(), 1), (C.peer_id.to_base58(), 1), (A.peer_id.to_base58(), 2)]
    nodes = merged.nodes(1500)
    assert set(nodes) == {p.peer_id.to_base58() for p in (A, B, C)}
    assert nodes[C.peer_id.to_base58()]["gateway_url"] == "https://gw.example"


def test_merge_picks_one_of_two_conflicting_records_deterministically() -> None:
    short = rec(A, 3, now=1000, ttl=100, addrs=["/ip4/10.0.0.1/tcp/1"])
    long = rec(A, 3, now=1000, ttl=200, addrs=["/ip4/10.0.0.2/tcp/1"])
    x, y = build(short), build(long)
    assert merge(x, y) == merge(y, x)
    assert merge(x, y).records == [long]  # the longest-lived version wins
    # Equal expiry: the lowest canonical bytes win.
    p = rec(A, 3, now=1000, addrs=["/ip4/10.0.0.1/tcp/1"])
    q = rec(A, 3, now=1000, addrs=["/ip4/10.0.0.2/tcp/1"])
    lowest = min((p, q), key=canonical)
    assert merge(build(p), build(q)).records == merge(build(q), build(p)).records == [lowest]


def test_merge_respects_seq_when_a_clock_went_backwards() -> None:
    # A's seq 2 says it was issued before seq 1: the chain must still list seq 1 first.
    merged = merge(build(rec(A, 1, now=1200, ttl=900)), build(rec(A, 2, now=1000, ttl=100),
                                                              rec(B, 1, now=1100)))
    assert [(r["peer_id"][-4:], r["seq"]) for r in merged.records] == [
        (B.peer_id.to_base58()[-4:], 1), (A.peer_id.to_base58()[-4:], 1),
        (A.peer_id.to_base58()[-4:], 2)]
    verify_chain(merged.to_json())
    # seq 2 rules while it lives; then seq 1, which it does not outlive, shows through.
    assert merged.nodes(1050)[A.peer_id.to_base58()]["seq"] == 2
    assert merged.nodes(1500)[A.peer_id.to_base58()]["seq"] == 1


# ----------------------------------------------------------------------------- compaction


def test_compaction_keeps_live_nodes_and_drops_the_rest() -> None:
    live_old = rec(A, 1, now=1000, ttl=600)
    live = rec(A, 2, op="renew", now=1300, ttl=600)
    gone = rec(B, 1, now=1000, ttl=100)
    left = rec(C, 1, now=1000, ttl=600)
    leaving = rec(C, 2, op="deregister", now=1400, ttl=600, addrs=[], models=[])
    chain = build(live_old, gone, left, live, leaving)
    now = 1500

    small = compact(chain, now)
    assert small.compacted_at == now
    assert small.records == [live, leaving]  # originals, signatures untouched
    assert small.nodes(now) == chain.nodes(now) == {A.peer_id.to_base58(): live}
    assert verify_chain(small.to_json()) == small
    assert compact(small, now) == small
    for t in range(now, 2100, 50):
        assert small.nodes(t) == chain.nodes(t)

    # The stamp makes it stick: an uncompacted copy merged in loses the same records.
    assert merge(chain, small) == merge(small, chain) == small

    later = compact(chain, 2001)  # after the deregister expired too
    assert later.records == [] and later.nodes(2001) == {}
    assert len(later.to_json()) < len(chain.to_json())


def test_compaction_keeps_an_older_record_that_outlives_a_newer_one() -> None:
    long = rec(A, 1, now=1000, ttl=1000)
    short = rec(A, 2, op="deregister", now=1100, ttl=100)
    small = compact(build(long, short), 1150)
    assert small.records == [long, short]
    assert small.nodes(1150) == {}
    assert small.nodes(1300) == {A.peer_id.to_base58(): long}


def test_peers_compacting_at_different_times_converge() -> None:
    records = [rec(A, 1, now=1000, ttl=100), rec(B, 1, now=1000, ttl=300),
               rec(C, 1, now=1000, ttl=900), rec(A, 2, now=1050, ttl=600)]
    x = build(*records[:2])
    y = build(*records[2:])
    x_side = merge(compact(x, 1200), y)
    y_side = merge(compact(y, 1400), x)
    both = merge(x_side, y_side)
    assert both == merge(y_side, x_side) == compact(merge(x, y), 1400)
    assert merge(both, x) == merge(both, y) == both
    assert both.compacted_at == 1400
    assert set(both.nodes(1400)) == {A.peer_id.to_base58(), C.peer_id.to_base58()}


# ----------------------------------------------------------------------------- properties


PEERS = (A, B, C)


@functools.cache
def signed(peer: int, op: str, seq: int, issued: int, ttl: int, addr: int) -> dict[str, Any]:
    return make_record(PEERS[peer], op, [f"/ip4/10.0.0.{addr}/tcp/4001"], ["gpt2"], seq, ttl,
                       now=issued)


record_args = st.tuples(st.integers(0, 2), st.sampled_from(("register", "renew", "deregister")),
                        st.integers(1, 4), st.integers(0, 40), st.integers(1, 40),
                        st.integers(0, 1))


@st.composite
def chains(draw: st.DrawFn) -> tuple[Chain, list[dict[str, Any]]]:
    """A chain built by appends (skipping records whose seq does not fit), maybe compacted,
    with every record it ever held (what the network knows through it)."""
    chain = Chain()
    for args in draw(st.lists(record_args, max_size=7)):
        try:
            chain = chain.append(signed(*args))
        except InvalidRecord:
            pass
    seen = chain.records
    when = draw(st.none() | st.integers(0, 60))
    return (chain if when is None else compact(chain, when)), seen


def reference_nodes(records: list[dict[str, Any]], t: int) -> dict[str, dict[str, Any]]:
    """The documented rule, written plainly: per peer, the highest-seq record alive at t
    (among same-seq versions, the longest-lived, then the lowest canonical bytes)."""
    by_peer: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["expires"] > t:
            by_peer.setdefault(r["peer_id"], []).append(r)
    current = {p: min(rs, key=lambda r: (-r["seq"], -r["expires"], canonical(r)))
               for p, rs in sorted(by_peer.items())}
    return {p: r for p, r in current.items() if r["op"] != "deregister"}


SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(chains(), chains(), chains())
def test_merge_is_commutative_associative_idempotent(x: Any, y: Any, z: Any) -> None:
    (a, _), (b, _), (c, _) = x, y, z
    ab = merge(a, b)
    assert ab.to_json() == merge(b, a).to_json()
    assert merge(ab, c) == merge(a, merge(b, c)) == merge(merge(a, c), b)
    assert merge(ab, ab) == ab and merge(ab, a) == ab and merge(b, ab) == ab
    assert verify_chain(ab.to_json()) == ab


@SETTINGS
@given(chains(), chains(), st.integers(0, 100))
def test_merge_keeps_every_node_state(x: Any, y: Any, later: int) -> None:
    (a, seen_a), (b, seen_b) = x, y
    merged = merge(a, b)
    t = merged.compacted_at + later
    assert merged.nodes(t) == reference_nodes(seen_a + seen_b, t)


@SETTINGS
@given(chains(), st.integers(0, 60), st.integers(0, 100))
def test_compaction_keeps_every_node_state(x: Any, at: int, later: int) -> None:
    chain, seen = x
    small = compact(chain, at)
    t = small.compacted_at + later
    assert small.nodes(t) == chain.nodes(t) == reference_nodes(seen, t)
    assert compact(small, at) == small
    assert len(small.records) <= len(chain.records)


@SETTINGS
@given(chains(), chains(), st.integers(0, 60), st.integers(0, 60))
def test_compaction_then_merge_equals_merge_then_compaction(
    x: Any, y: Any, t1: int, t2: int
) -> None:
    (a, _), (b, _) = x, y
    assert merge(compact(a, t1), compact(b, t2)) == compact(merge(a, b), max(t1, t2))


# ----------------------------------------------------------------------------- store


def test_store_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path, three: Chain) -> None:
    store = ChainStore(tmp_path)
    assert store.load() == Chain()  # no file yet: the empty chain
    store.save(three)
    assert os.listdir(tmp_path) == [FILENAME]
    assert load_chain(tmp_path / FILENAME) == three
    assert ChainStore(tmp_path).load() == three


def test_store_survives_a_crash_mid_write(tmp_path: Path, three: Chain,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / FILENAME
    save_chain(path, three)
    before = path.read_bytes()

    # A previous run died after writing half a temp file: it is never read.
    (tmp_path / f".{FILENAME}.crashed.tmp").write_bytes(before[: len(before) // 2])
    assert load_chain(path) == three

    # This run dies between writing the temp file and renaming it.
    def crash(*args: Any) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        save_chain(path, three.append(rec(C, 1)))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([FILENAME, f".{FILENAME}.crashed.tmp"])
    assert load_chain(path) == three


def test_tampered_file_raises_and_last_good_chain_is_kept(tmp_path: Path, three: Chain) -> None:
    store = ChainStore(tmp_path)
    store.save(three)
    doc = doc_of(three)
    doc["blocks"][1]["record"]["addrs"] = ["/ip4/6.6.6.6/tcp/4001"]
    store.path.write_text(json.dumps(doc))
    with pytest.raises(InvalidChain, match="block 1: bad signature"):
        store.load()
    assert store.chain == three

    store.path.write_text(three.to_json()[:100])
    with pytest.raises(InvalidChain, match="not valid JSON"):
        store.load()
    assert store.chain == three

    newer = build(rec(B, 1))
    assert store.merge(newer) == merge(three, newer) == store.chain
    assert load_chain(store.path) == store.chain


def test_verify_file(tmp_path: Path, three: Chain) -> None:
    path = tmp_path / FILENAME
    save_chain(path, three)
    ok, message = verify_file(path)
    assert ok and message.startswith("valid: 4 blocks") and three.head in message

    doc = doc_of(three)
    doc["blocks"][2]["record"]["seq"] = 0
    path.write_text(json.dumps(doc))
    assert verify_file(path) == (False, "block 2: bad signature")
    assert verify_file(tmp_path / "absent.json")[0] is False


# ----------------------------------------------------------------------------- docs example

EXAMPLE_T = 1_767_225_600  # 2026-01-01T00:00:00Z
EXAMPLE_FILE = ROOT / "docs" / "examples" / "blockchain.json"


def build_example() -> Chain:
    """The chain in docs/REGISTRY.md and docs/examples/blockchain.json. Regenerate with:
    .venv/bin/python -c 'from tests.test_chain import build_example as b; print(b().to_json(), end="")'
    """
    worker, gateway = ident("example worker"), ident("example gateway")
    worker_addrs = ["/ip4/192.0.2.10/tcp/4001", "/ip4/192.0.2.10/udp/4001/quic-v1"]
    return build(
        make_record(worker, "register", worker_addrs, ["gpt2"], 1, 600, now=EXAMPLE_T,
                    role="worker"),
        make_record(gateway, "register", ["/ip4/192.0.2.20/tcp/4001"], [], 1, 600,
                    now=EXAMPLE_T + 5, role="gateway", gateway_url="https://gateway.example.org"),
        make_record(worker, "renew", worker_addrs, ["gpt2"], 2, 600, now=EXAMPLE_T + 300,
                    role="worker"),
    )


def test_documented_example_is_valid_and_current() -> None:
    example = build_example()
    text = EXAMPLE_FILE.read_text()
    assert text == example.to_json()
    assert verify_file(EXAMPLE_FILE)[0]
    assert set(verify_chain(text).nodes(EXAMPLE_T + 400)) == {
        ident("example worker").peer_id.to_base58(), ident("example gateway").peer_id.to_base58()}
    assert text.strip() in (ROOT / "docs" / "REGISTRY.md").read_text()


def test_a_span_workers_record_says_which_layers_of_which_weights() -> None:
    spans = {"smollm2": {"fingerprint": "sha256:" + "ab" * 32, "span": [10, 20], "layers": 30}}
    record = rec(A, 1, models=["smollm2"], spans=spans)
    chain = Chain().append(record)
    assert verify_chain(chain.to_json()).nodes(now=1001)[A.peer_id.to_base58()]["spans"] == spans
    bad = [
        {"gpt2": spans["smollm2"]},  # a model the record does not serve
        {"smollm2": {**spans["smollm2"], "span": [20, 10]}},
        {"smollm2": {**spans["smollm2"], "span": [0, 31]}},  # past the last layer
        {"smollm2": {**spans["smollm2"], "layers": True}},
        {"smollm2": {**spans["smollm2"], "extra": 1}},
        {},
    ]
    for spans_ in bad:
        with pytest.raises(InvalidRecord):
            rec(A, 1, models=["smollm2"], spans=spans_)
