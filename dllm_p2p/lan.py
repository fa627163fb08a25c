"""LAN discovery: nodes on one network find each other with mDNS, no ``--bootstrap``.

py-libp2p 0.8.1's ``MDNSDiscovery`` (on zeroconf) does the multicast; what it lacks is
done here (each seen in namespaces on one bridge):

- It advertises the raw listen addresses, ``/ip4/0.0.0.0/...``, which nobody can dial:
  we hand it this node's interface addresses (no loopback) instead.
- It runs in zeroconf's threads and reports peers through a process-wide event: the
  callback hands each peer to trio with ``run_sync_soon`` and never raises there.
- Registering blocks for about 1.6 s (zeroconf probes the name): it runs in a thread.
- ``host.run`` skips stopping it when its body fails: we stop it in ``finally``.
- A private network (``--psk``) advertises under its own service name, so nodes of
  different networks do not try to handshake with each other.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.peerinfo import PeerInfo

from .host import host_addrs

log = logging.getLogger(__name__)

QUEUE = 256


def lan_addrs(host: IHost) -> list[str]:
    """Addresses worth advertising on the LAN: ours, no loopback, no circuits."""
    return [a for a in host_addrs(host) if not a.startswith("/ip4/127.") and "/p2p-circuit" not in a]


class LanDiscovery:
    """Advertise this node on the LAN and call ``on_peer(info)`` for each node found."""

    def __init__(self, host: IHost, on_peer: Callable[[PeerInfo], Awaitable[None]], psk: str | None = None) -> None:
        self.host = host
        self.on_peer = on_peer
        self.psk = psk
        self.found: dict[str, list[str]] = {}

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.discovery.events.peerDiscovery import peerDiscovery
        from libp2p.discovery.mdns.mdns import create_mdns_discovery

        addrs = lan_addrs(self.host)
        if not addrs:
            log.info("mDNS off: this node has no LAN address to advertise")
            task_status.started()
            return
        token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[PeerInfo](QUEUE)

        def enqueue(info: PeerInfo) -> None:  # in trio: must never raise
            try:
                send.send_nowait(info)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass

        def discovered(info: PeerInfo) -> None:  # in a zeroconf thread
            try:
                token.run_sync_soon(enqueue, info)
            except trio.RunFinishedError:
                pass

        fingerprint = hashlib.sha256(self.psk.encode()).hexdigest()[:8] if self.psk else None
        port = int(addrs[0].split("/tcp/", 1)[1].split("/", 1)[0]) if "/tcp/" in addrs[0] else 4001

        def start() -> Any:
            mdns = create_mdns_discovery(self.host.get_network(), port=port, listen_addrs=addrs, private_network_fingerprint=fingerprint)
            mdns.broadcaster.register()
            return mdns

        peerDiscovery.register_peer_discovered_handler(discovered)
        mdns = None
        try:
            mdns = await trio.to_thread.run_sync(start)
            log.info("mDNS: advertising %s on the LAN", ", ".join(addrs))
            task_status.started()
            async with trio.open_nursery() as nursery:
                async for info in receive:
                    if info.peer_id == self.host.get_id():
                        continue  # the event is process-wide
                    fresh = str(info.peer_id) not in self.found
                    self.found[str(info.peer_id)] = [f"{a}/p2p/{info.peer_id}" for a in info.addrs][:8]
                    if fresh:
                        log.info("mDNS: found %s on the LAN", info.peer_id)
                    nursery.start_soon(self._call, info)
        finally:
            peerDiscovery.unregister_peer_discovered_handler(discovered)
            if mdns is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await trio.to_thread.run_sync(_stop, mdns)

    async def _call(self, info: PeerInfo) -> None:
        try:
            await self.on_peer(info)
        except Exception as exc:
            log.debug("mDNS peer %s: %r", info.peer_id, exc)


def _stop(mdns: Any) -> None:
    try:
        mdns.broadcaster.unregister()
        mdns.listener.stop()
        mdns.zeroconf.close()
    except Exception as exc:
        log.debug("stopping mDNS: %r", exc)
