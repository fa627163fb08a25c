"""A registry that strangers cannot jam: size, capacity, expiry and time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol

from dllm_p2p.heartbeat import Heartbeat
from dllm_p2p.host import host_addrs, make_host, parse_multiaddr
from dllm_p2p.identity import generate
from dllm_p2p.membership import REGISTRY_PROTOCOL, Membership, MembershipConfig
from dllm_p2p.registry import chain as chain_mod
from dllm_p2p.registry.chain import MAX_RECORD_TTL, Chain, InvalidChain, InvalidRecord, canonical, make_record, signing_bytes, verify_chain
from dllm_p2p.registry.store import ChainStore


def big_record(now: float) -> dict[str, Any]:
    """A valid record close to the 2 KiB maximum, from a fresh key."""
    me = generate()
    addrs = [f"/dns4/{'relay-' * 17}{i}.example/tcp/4001/p2p/{me.peer_id}" for i in range(9)]
    record = make_record(me, "register", addrs, ["smollm2"], seq=1, ttl=600, now=now)
    assert 1900 < len(canonical(record)) <= 2048
    return record


def test_a_record_cannot_live_for_ever_nor_come_from_the_future() -> None:
    me = generate()
    with pytest.raises(InvalidRecord, match="at most"):
        make_record(me, "register", [], ["tiny"], seq=1, ttl=2**52)
    make_record(me, "register", [], ["tiny"], seq=1, ttl=MAX_RECORD_TTL)  # the cap itself is fine
    later = make_record(me, "register", [], ["tiny"], seq=2, ttl=600, now=time.time() + 2 * chain_mod.MAX_ISSUED_SKEW)
    with pytest.raises(InvalidRecord, match="future"):
        Chain().append(later)
    # Signed by its owner, but claiming a century: a chain holding it does not verify.
    forever = {k: v for k, v in make_record(me, "register", [], ["tiny"], seq=3, ttl=600).items() if k != "signature"}
    forever["expires"] = forever["issued"] + 100 * 365 * 86400
    import base64

    forever["signature"] = base64.b64encode(me.sign(signing_bytes(forever))).decode()
    doc = Chain().to_dict()
    doc["blocks"].append({"index": 1, "prev": doc["blocks"][0]["hash"], "record": forever, "hash": "0" * 64})
    with pytest.raises(InvalidChain, match="block 1: a record may live at most"):
        verify_chain(__import__("json").dumps(doc))


async def test_a_chain_of_large_records_replicates(tmp_path: Path) -> None:
    """1,800 near-maximum records: over the 4 MiB the exchange used to refuse."""
    now = time.time()
    records = sorted((big_record(now) for _ in range(1800)), key=lambda r: r["peer_id"])
    big = Chain._trusted(0, records)
    assert len(big.to_json()) > 4 * 1024 * 1024
    a_store, b_store = ChainStore(tmp_path / "a"), ChainStore(tmp_path / "b")
    a_store.save(big)
    a = Membership(generate(), MembershipConfig(role="observer", pow_bits=0), a_store)
    b = Membership(generate(), MembershipConfig(role="observer", pow_bits=0), b_store)
    host_a, host_b = make_host(a.identity), make_host(b.identity)
    host_a.set_stream_handler(TProtocol(REGISTRY_PROTOCOL), a._serve_chain)
    async with host_a.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]), host_b.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]):
        a.host, b.host = host_a, host_b
        with trio.fail_after(60):
            theirs = await b._fetch_chain(host_addrs(host_a)[0])
    assert theirs == big and b.chain.head == big.head
    assert verify_chain(b_store.path.read_bytes()).head == big.head  # saved, whole


async def test_a_full_chain_still_takes_our_own_renewal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain_mod, "MAX_BLOCKS", 6)
    now = time.time()
    friend, strangers = generate(), [generate() for _ in range(5)]
    flood = [make_record(s, "register", [], ["x"], seq=1, ttl=3600, now=now) for s in strangers]
    friendly = make_record(friend, "register", [], ["tiny"], seq=1, ttl=600, now=now - 100)
    full = Chain._trusted(0, sorted(flood + [friendly], key=lambda r: (r["issued"], r["peer_id"]))[:5])
    store = ChainStore(tmp_path)
    store.save(full)
    me = Membership(generate(), MembershipConfig(role="worker", pow_bits=0), store, models=lambda: ["tiny"])
    me.last_seen[friend.peer_id.to_base58()] = Heartbeat(  # heard from lately
        friend.peer_id.to_base58(), seq=1, ts=time.time(), role="worker", models=["tiny"], addrs=[], load={}, seen_at=time.time()
    )
    host = make_host(me.identity)
    async with host.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]):
        me.host = host
        with pytest.raises(chain_mod.ChainFull):
            full.append(make_record(me.identity, "register", [], ["tiny"], seq=1, ttl=600))  # what used to happen
        await me._append_own("register")
        await me._append_own("renew")
    held = me.chain.nodes()
    assert me.peer_id in held and held[me.peer_id]["op"] == "renew"
    assert friend.peer_id.to_base58() in held  # a peer that heartbeats outranks the flood
    assert len(me.chain.records) <= 5


async def test_the_embedded_store_keeps_only_recent_publications(tmp_path: Path) -> None:
    from dllm_p2p.registry.ipfs import ContentNotFound
    from dllm_p2p.registry.publish import KEEP_PUBLICATIONS, Publisher

    publisher = Publisher(tmp_path, None)
    me = generate()
    chain = Chain()
    cids = []
    for seq in range(1, 11):
        chain = chain.append(make_record(me, "renew" if seq > 1 else "register", [], ["tiny"], seq=seq, ttl=600))
        cids.append(await publisher.publish(chain))
    blocks = list((tmp_path / "ipfs" / "blocks").iterdir())
    assert len(blocks) <= 2 * KEEP_PUBLICATIONS  # a folder block and a file block each
    for cid in cids[-KEEP_PUBLICATIONS:]:
        assert verify_chain(publisher.store.get_file(f"{cid}/blockchain.json"))
    with pytest.raises(ContentNotFound):
        publisher.store.get_file(f"{cids[0]}/blockchain.json")


# --- proof of work ------------------------------------------------------------------


def test_registering_costs_work_and_checking_it_costs_a_hash() -> None:
    from dllm_p2p.registry.chain import OtherNetwork, merge, pow_ok, solve_pow

    me = generate()
    peer = me.peer_id.to_base58()
    started = time.perf_counter()
    nonce = solve_pow(peer, 12)
    assert pow_ok(peer, nonce, 12) and not pow_ok(generate().peer_id.to_base58(), nonce, 12)  # bound to the key
    checks = time.perf_counter()
    for _ in range(1000):
        pow_ok(peer, nonce, 12)
    per_check = (time.perf_counter() - checks) / 1000
    assert per_check < 1e-4  # microseconds, whatever the difficulty

    network = Chain(pow_bits=12)
    with pytest.raises(InvalidRecord, match="no proof of work of 12 bits"):
        network.append(make_record(me, "register", [], ["tiny"], seq=1, ttl=600))
    chain = network.append(make_record(me, "register", [], ["tiny"], seq=1, ttl=600, pow=nonce))
    again = verify_chain(chain.to_json())
    assert again.pow_bits == 12 and again.head == chain.head
    # The difficulty is in the hashed checkpoint: lowering it in the file breaks the chain.
    lowered = chain.to_json().replace('"pow_bits": 12', '"pow_bits": 1')
    with pytest.raises(InvalidChain, match="block 0"):
        verify_chain(lowered)
    # A record that lacks the work does not verify in such a chain.
    doc = chain.to_dict()
    doc["blocks"][1]["record"]["pow"] = "0"
    with pytest.raises(InvalidChain, match="block 1"):
        verify_chain(__import__("json").dumps(doc))
    # Chains of different difficulty are different networks: no merge can raise (and so
    # wipe) or lower the bar. The empty chain of a node that has not joined yet takes it.
    other = Chain().append(make_record(generate(), "register", [], ["tiny"], seq=1, ttl=600))
    with pytest.raises(OtherNetwork):
        merge(chain, other)
    assert merge(Chain(), chain) == chain and merge(chain, Chain()).pow_bits == 12


async def test_a_node_ignores_a_chain_of_another_difficulty(tmp_path: Path) -> None:
    rich = Chain(pow_bits=1)
    a_store = ChainStore(tmp_path / "a")
    from dllm_p2p.registry.chain import solve_pow

    me = generate()
    a_store.save(rich.append(make_record(me, "register", [], ["tiny"], seq=1, ttl=600, pow=solve_pow(me.peer_id.to_base58(), 1))))
    a = Membership(generate(), MembershipConfig(role="observer", pow_bits=1), a_store)
    b = Membership(generate(), MembershipConfig(role="observer", pow_bits=2), ChainStore(tmp_path / "b"))
    host_a, host_b = make_host(a.identity), make_host(b.identity)
    host_a.set_stream_handler(TProtocol(REGISTRY_PROTOCOL), a._serve_chain)
    async with host_a.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]), host_b.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]):
        a.host, b.host = host_a, host_b
        with trio.fail_after(30):
            assert await b._fetch_chain(host_addrs(host_a)[0]) is None
    assert not b.chain.records


def test_the_proof_is_solved_once_per_identity_and_kept_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dllm_p2p import membership as membership_module

    peer = generate().peer_id.to_base58()
    first = membership_module.proof_of_work(tmp_path, peer, 10)
    monkeypatch.setattr(membership_module, "solve_pow", lambda *a: pytest.fail("solved again"))
    assert membership_module.proof_of_work(tmp_path, peer, 10) == first


def test_a_node_whose_clock_is_slow_still_takes_honest_chains() -> None:
    now = time.time()
    me = generate()
    honest = chain_mod.compact(Chain().append(make_record(me, "register", [], ["tiny"], seq=1, ttl=600, now=now)), now)
    data = honest.to_json()
    for slow in (300 + 30, 600, 1800):  # minutes behind the network
        with pytest.raises(InvalidChain, match="future"):
            verify_chain(data, now=now - slow)  # `registry verify` stays strict
        taken = verify_chain(data, now=now - slow, clamp=True)
        assert taken.records == honest.records and taken.compacted_at <= now - slow + chain_mod.MAX_CLOCK_SKEW
    # A chain stamped a day ahead cannot expire records beyond the bound either.
    ahead = Chain._trusted(int(now + 86_400), [make_record(generate(), "register", [], ["x"], seq=1, ttl=400, now=now)])
    kept = verify_chain(ahead.to_json(), now=now, clamp=True)
    assert len(kept.records) == 1 and kept.compacted_at == int(now + chain_mod.MAX_CLOCK_SKEW)


async def test_chain_work_runs_off_the_event_loop_and_each_signature_is_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verifying a chain (about 1 s when full) and saving it with fsync would stall every
    stream and heartbeat of the node: both run in threads, and a record verified once is
    not verified again when the next peer sends the same chain."""
    import threading

    now = time.time()
    chain = Chain._trusted(0, sorted((big_record(now) for _ in range(40)), key=lambda r: r["peer_id"]))
    on_loop: dict[str, list[bool]] = {"verify": [], "save": []}
    real_verify, real_save = chain_mod._identity.verify, ChainStore.save

    def verify(*args: Any) -> bool:
        on_loop["verify"].append(threading.current_thread() is threading.main_thread())
        return real_verify(*args)

    def save(self: ChainStore, chain: Chain) -> None:
        on_loop["save"].append(threading.current_thread() is threading.main_thread())
        real_save(self, chain)

    stores = [ChainStore(tmp_path / name) for name in "abc"]
    stores[0].save(chain)
    monkeypatch.setattr(chain_mod._identity, "verify", verify)
    monkeypatch.setattr(ChainStore, "save", save)
    monkeypatch.setattr(chain_mod, "_verified", type(chain_mod._verified)())  # signing filled it
    nodes = [Membership(generate(), MembershipConfig(role="observer", pow_bits=0), store) for store in stores]
    hosts = [make_host(n.identity) for n in nodes]
    hosts[0].set_stream_handler(TProtocol(REGISTRY_PROTOCOL), nodes[0]._serve_chain)
    listen = [parse_multiaddr("/ip4/127.0.0.1/tcp/0")]
    async with hosts[0].run(listen), hosts[1].run(listen), hosts[2].run(listen):
        for node, host in zip(nodes, hosts):
            node.host = host
        with trio.fail_after(60):
            await nodes[1]._fetch_chain(host_addrs(hosts[0])[0])
            assert len(on_loop["verify"]) == 40  # every record checked once...
            await nodes[2]._fetch_chain(host_addrs(hosts[0])[0])
    assert len(on_loop["verify"]) == 40  # ...and not again for the second node
    assert nodes[2].chain.head == chain.head
    assert on_loop["save"] and not any(on_loop["verify"]) and not any(on_loop["save"]), on_loop
