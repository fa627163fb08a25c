"""How nodes dial each other (dllm_p2p.reach), on 127.0.0.1: direct addresses first,
circuits a moment later, the dial-back that tells a node whether it is reachable."""

from __future__ import annotations

import trio
from libp2p.custom_types import TProtocol

from dllm_p2p.host import host_addrs, make_host, parse_multiaddr
from dllm_p2p.identity import generate
from dllm_p2p.reach import MAX_DIRECT, Reach, path_of

LOOPBACK = [parse_multiaddr("/ip4/127.0.0.1/tcp/0")]


async def test_direct_addresses_are_tried_first_and_together_and_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    me, them = make_host(generate()), make_host(generate())
    async with me.run(LOOPBACK), them.run(LOOPBACK):
        reach = Reach(me)
        real = host_addrs(them)[0]
        peer = them.get_id()
        dead = [f"/ip4/127.0.0.1/tcp/{1 + i}/p2p/{peer}" for i in range(8)]  # refused at once
        circuit = f"/ip4/127.0.0.1/tcp/9/p2p/{generate().peer_id}/p2p-circuit/p2p/{peer}"
        tried: dict[str, float] = {}  # address -> when it is dialed
        original = reach._attempt

        async def attempt(peer_id, addr, delay, won, errors, scope):  # type: ignore[no-untyped-def]
            tried[addr] = delay
            await original(peer_id, addr, delay, won, errors, scope)

        monkeypatch.setattr(reach, "_attempt", attempt)
        with trio.fail_after(10):
            path = await reach.connect(peer, [circuit, *dead[:3], real, *dead[3:]])
        assert path == "direct" and path_of(me, peer) == "direct"
        assert tried[circuit] > max(d for a, d in tried.items() if a != circuit)  # circuits after every direct address
        assert sum(a in dead for a in tried) <= MAX_DIRECT - 1 and real in tried


async def test_the_dial_back_says_reachable_only_for_an_address_that_answers_as_us() -> None:
    asker, server, bystander = make_host(generate()), make_host(generate()), make_host(generate())
    async with asker.run(LOOPBACK), server.run(LOOPBACK), bystander.run(LOOPBACK):
        reach, serving = Reach(asker), Reach(server)
        server.set_stream_handler(TProtocol("/dllm/dialback/1.0.0"), serving._serve_dialback)
        with trio.fail_after(20):
            assert await reach.dialback(host_addrs(server)[0]) is True
            assert reach.observed_ip == "127.0.0.1"
        # Advertising someone else's port (or a dead one) is not being reachable.
        lying = make_host(generate(), announce=[host_addrs(bystander)[0].rsplit("/p2p/", 1)[0], "/ip4/127.0.0.1/tcp/1"])
        async with lying.run(LOOPBACK):
            with trio.fail_after(20):
                assert await Reach(lying).dialback(host_addrs(server)[0]) is False


async def test_a_host_does_not_dial_the_peers_it_merely_knows_of() -> None:
    """py-libp2p's stock auto-connector dials peers from the peerstore up to the midpoint
    of the watermarks: with 50 relays on one machine that was every node to every other.
    Which peers to hold is the registry's choice (Membership._mesh_loop), not the
    peerstore's."""
    me, them = make_host(generate()), make_host(generate())
    async with me.run(LOOPBACK), them.run(LOOPBACK):
        me.get_peerstore().add_addrs(them.get_id(), them.get_addrs(), 3600)
        network = me.get_network()
        with trio.fail_after(10):
            await network.auto_connector.maybe_connect()  # py-libp2p's own awaits the dials it starts
        assert not network.connections.get(them.get_id())
