"""What the registry and heartbeat gossip costs: records travel in announcements, heads
are announced by Trickle, and nodes that beat at different rates judge each other by the
sender's rate. In process, with real py-libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from dllm_p2p import heartbeat
from dllm_p2p import membership as membership_mod
from dllm_p2p.host import host_addrs, make_host, parse_multiaddr
from dllm_p2p.identity import generate
from dllm_p2p.membership import ANNOUNCE_IMAX, ANNOUNCE_K, Membership, MembershipConfig, parse_announcement
from dllm_p2p.registry.chain import MAX_CLOCK_SKEW, InvalidRecord, make_record, record_chain, solve_pow
from dllm_p2p.registry.store import ChainStore
from gateway.nodes import NodeState


def member(tmp_path: Path, name: str, **config: Any) -> Membership:
    return Membership(
        generate(), MembershipConfig(role="relay", pow_bits=0, heartbeat_interval=30, **config), ChainStore(tmp_path / name)
    )


async def test_a_renewal_reaches_a_peer_in_its_announcement_without_a_fetch(tmp_path: Path) -> None:
    a = member(tmp_path, "a")
    fetched: list[str] = []
    listen = [parse_multiaddr("/ip4/127.0.0.1/tcp/0")]
    host_a = make_host(a.identity)
    async with host_a.run(listen), trio.open_nursery() as nursery:
        await nursery.start(a.run, host_a)
        b = member(tmp_path, "b", bootstrap=[host_addrs(host_a)[0]])
        host_b = make_host(b.identity)
        async with host_b.run(listen):
            await nursery.start(b.run, host_b)
            with trio.fail_after(30):
                while not (a.chain.head == b.chain.head and len(a.chain.nodes()) == 2):
                    await trio.sleep(0.05)  # polling in-process state, bounded by fail_after
                # From here on, count what b fetches from a.
                original = b._fetch_chain

                async def counting(addr: str) -> Any:
                    fetched.append(addr)
                    return await original(addr)

                b._fetch_chain = counting  # type: ignore[method-assign]
                before = a.chain.nodes()[a.peer_id]["seq"]
                await a._append_own("renew")
                while b.chain.head != a.chain.head:
                    await trio.sleep(0.05)
            assert b.chain.nodes()[a.peer_id]["seq"] > before
            assert fetched == []  # the record came with the announcement
            nursery.cancel_scope.cancel()


def test_an_announced_record_is_checked_like_a_chain_block() -> None:
    me = generate()
    record = make_record(me, "register", [], [], seq=1, ttl=600, pow=solve_pow(me.peer_id.to_base58(), 8))
    assert record_chain(record, 0, 8).nodes()[me.peer_id.to_base58()]["seq"] == 1
    with pytest.raises(InvalidRecord):
        record_chain(record, 0, 16)  # not enough work for this network
    with pytest.raises(InvalidRecord):
        record_chain({**record, "seq": 2}, 0, 8)  # the signature no longer matches
    with pytest.raises(InvalidRecord):
        record_chain(record, "soon", 8)
    # A stamp far ahead would expire every record before it: held to the clock skew.
    far = record_chain(record, int(time.time()) + 10**6, 8)
    assert far.compacted_at <= time.time() + MAX_CLOCK_SKEW + 1


def test_announcements_with_malformed_records_are_refused() -> None:
    import msgpack

    for bad in ({"head": "h", "record": "x", "at": 1}, {"head": "h", "record": {}, "at": True}, {"head": "h", "at": 1.5}):
        with pytest.raises(ValueError):
            parse_announcement(msgpack.packb(bad))
    ok = parse_announcement(msgpack.packb({"head": "h", "addrs": ["/ip4/1.2.3.4/tcp/1"]}))
    assert ok.record is None and ok.addrs == ["/ip4/1.2.3.4/tcp/1"]


async def _count_announcements(tmp_path: Path, seconds: float, heard_from_peers: bool) -> int:
    node = member(tmp_path, "trickle")
    sent: list[float] = []

    async def announce(**_: Any) -> None:
        sent.append(trio.current_time())

    node._announce = announce  # type: ignore[method-assign]

    async def peers() -> None:  # peers that announce our head every 0.2 s
        while True:
            node._heard_same = ANNOUNCE_K
            await trio.sleep(0.2)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            if heard_from_peers:
                nursery.start_soon(peers)
            nursery.start_soon(node._announce_loop)
    return len(sent)


async def test_a_quiet_network_announces_less_and_less(tmp_path: Path, autojump_clock: Any) -> None:
    alone = await _count_announcements(tmp_path, 600, heard_from_peers=False)
    # Intervals of 1, 2, 4, 8, 16 s, then 32 s: about 23 in ten minutes (every 30 s was 20,
    # from every node; here the next test shows most nodes keep quiet).
    assert 5 <= alone <= 5 + 600 / (ANNOUNCE_IMAX / 2)
    assert await _count_announcements(tmp_path, 600, heard_from_peers=True) == 0


async def test_a_peer_that_lacks_our_records_hears_from_us_within_a_second(tmp_path: Path, autojump_clock: Any) -> None:
    node = member(tmp_path, "trickle")
    sent: list[float] = []

    async def announce(**_: Any) -> None:
        sent.append(trio.current_time())

    node._announce = announce  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node._announce_loop)
        await trio.sleep(300)  # long quiet: the interval is at its largest
        quiet = len(sent)
        node._changed.set()  # what a fetch that finds the peer behind us does
        await trio.sleep(membership_mod.ANNOUNCE_IMIN + 0.01)
        assert len(sent) == quiet + 1
        nursery.cancel_scope.cancel()


def test_a_node_that_beats_slowly_is_online_by_its_own_interval(tmp_path: Path) -> None:
    me = generate()
    slow = heartbeat.parse(heartbeat.make(me, 1, role="relay", models=[], addrs=[], load={}, every=30.0))
    assert slow.every == 30.0 and slow.ttl(7.0) == 91.0
    old = heartbeat.parse(heartbeat.make(me, 2, role="relay", models=[], addrs=[], load={}))
    assert old.every == 0.0 and old.ttl(7.0) == 7.0  # an older sender: the receiver's own TTL
    with pytest.raises(heartbeat.InvalidHeartbeat, match="every"):
        heartbeat.parse(heartbeat.make(me, 3, role="relay", models=[], addrs=[], load={}, every=10**6))

    receiver = member(tmp_path, "gateway", ttl=7.0)
    receiver.last_seen[me.peer_id.to_base58()] = heartbeat.Heartbeat(
        me.peer_id.to_base58(), 1, time.time(), "relay", [], [], {}, every=30.0, seen_at=time.time() - 60
    )
    assert receiver.online(me.peer_id.to_base58())
    assert not receiver.online(me.peer_id.to_base58(), now=time.time() + 60)
    # The gateway's table judges workers the same way.
    worker = NodeState("w", last_seen=100.0, every=10.0)
    assert worker.online(120.0, ttl=7.0) and not worker.online(132.0, ttl=7.0)


async def test_a_node_whose_bootstrap_peers_were_all_down_keeps_trying_until_one_answers(
    tmp_path: Path, autojump_clock: Any
) -> None:
    node = member(tmp_path, "late", bootstrap=["/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"])
    tries: list[float] = []
    up_at = 200.0  # the bootstrap peer comes up long after the node's quick tries ended

    async def fetch(addr: str) -> None:
        tries.append(trio.current_time())
        if trio.current_time() < up_at:
            raise OSError("connection refused")

    node._fetch_chain = fetch  # type: ignore[method-assign]
    start = trio.current_time()
    assert await node._join() is False
    assert len(tries) == 5
    with trio.fail_after(up_at + 2 * membership_mod.REJOIN_MAX):
        await node._rejoin_loop()  # returns once a try succeeded
    later = [t - start for t in tries[5:]]
    assert later[-1] >= up_at and later[-1] - up_at <= membership_mod.REJOIN_MAX  # joined soon after it came up
    gaps = [b - a for a, b in zip(later, later[1:])]
    assert gaps == sorted(gaps) and max(gaps) <= membership_mod.REJOIN_MAX  # backing off, bounded
    assert len(tries) <= 5 + 6  # slowly: not a dial loop
