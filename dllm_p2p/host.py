"""libp2p host factory: Noise only, yamux, real announce addresses, optional private network.

py-libp2p's default host also speaks ``/plaintext/2.0.0``, secio and TLS; a dllm node offers
Noise alone so that no peer can talk to it unencrypted or unauthenticated.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import ifaddr
import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from .identity import Identity

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"
_UNSPECIFIED = {"0.0.0.0", "::"}


class AddressError(ValueError):
    """A multiaddr could not be parsed or lacks what is needed to dial it."""


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:
        raise AddressError(f"invalid multiaddr {text!r}: {exc}") from None


def peer_info(text: str) -> PeerInfo:
    """PeerInfo from a dialable multiaddr that ends in ``/p2p/<peer-id>``."""
    addr = parse_multiaddr(text)
    try:
        return info_from_p2p_addr(addr)
    except Exception:
        raise AddressError(
            f"{text!r} has no /p2p/<peer-id> part; use the full address a worker prints"
        ) from None


def local_ip_addresses() -> list[str]:
    """This machine's IPv4 addresses, loopback first; never the unspecified address.

    Read from the interfaces (the host name often resolves to 127.0.1.1 only, so peers on
    the LAN would be given nothing they can dial)."""
    found = ["127.0.0.1"]
    try:
        adapters = ifaddr.get_adapters()
    except OSError:
        adapters = []
    for adapter in adapters:
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip not in found and not ip.ip.startswith(("127.", "169.254.")):
                found.append(ip.ip)
    return found


def expand_unspecified(addrs: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Replace ``/ip4/0.0.0.0/...`` by one address per local interface (peers can't dial 0.0.0.0)."""
    out: list[multiaddr.Multiaddr] = []
    for addr in addrs:
        text = str(addr)
        parts = text.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] in _UNSPECIFIED:
            for ip in local_ip_addresses():
                parts[2] = ip
                out.append(multiaddr.Multiaddr("/".join(parts)))
        else:
            out.append(addr)
    return out


def check_psk(value: str | None) -> str | None:
    """A private-network key from ``--psk`` or the ``DLLM_PSK`` environment variable
    (preferred: command lines are visible to every user of the machine)."""
    value = value or os.environ.get("DLLM_PSK") or None
    if value is None:
        return None
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise AddressError("a private network key must be 64 hex characters (32 bytes); make one with: python -c 'import secrets; print(secrets.token_hex(32))'")
    return value


def make_host(
    identity: Identity,
    *,
    announce: Sequence[str] = (),
    psk: str | None = None,
    relay: bool = False,
) -> IHost:
    """A host that speaks Noise + yamux only.

    ``announce`` replaces the advertised addresses (e.g. a public IP behind NAT); by default
    the listen addresses are advertised with 0.0.0.0 expanded to this machine's addresses.
    ``psk`` (64 hex chars) turns on a libp2p private network: peers without it can't connect.
    """
    psk = check_psk(psk)
    noise = NoiseTransport(identity.key_pair, noise_privkey=create_x25519_key_pair().private_key)
    announce_addrs = [parse_multiaddr(a) for a in announce] or None
    host = new_host(
        key_pair=identity.key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        psk=psk,
        announce_addrs=announce_addrs,
        addrs_factory=None if announce_addrs else expand_unspecified,
        disable_identify_address_discovery=True,
        connection_config=connection_limits(relay),
    )
    network = host.get_network()
    network.auto_connector = NoAutoConnect(network, network.connection_config.auto_connect_interval)
    return host


class NoAutoConnect(AutoConnector):
    """py-libp2p's auto-connector, which never dials.

    Stock, it dials peers from the peerstore until the connection count reaches the
    midpoint of the watermarks (52 for a worker, 204 for a relay): with 50 relays on one
    machine every node held a connection to every other (2,500 sockets), each with its
    keep-alive and RTT pings, and scanning the peerstore cost a relay 15% of its CPU.
    Which peers to keep is chosen from the registry instead (``Membership._mesh_loop``)."""

    async def maybe_connect(self) -> None:
        return None


def connection_limits(relay: bool = False) -> ConnectionConfig:
    """A bounded set of connections: py-libp2p's connection manager prunes the least
    useful above the high watermark (dialing is left to the registry, see NoAutoConnect).
    A relay holds one connection per node behind NAT it serves."""
    if relay:
        return ConnectionConfig(min_connections=8, low_watermark=8, high_watermark=400, max_connections=600)
    return ConnectionConfig(min_connections=4, low_watermark=8, high_watermark=96, max_connections=192)


def host_addrs(host: IHost) -> list[str]:
    """The full dialable addresses (with ``/p2p/<id>``) a started host advertises."""
    return [str(a) for a in host.get_addrs()]


def peer_id_of(host: IHost) -> ID:
    return host.get_id()


def connected_peers(host: IHost) -> set[ID]:
    """The peers ``host`` holds at least one open connection to."""
    return {peer for peer, conns in host.get_network().connections.items() if conns}


async def end_quietly(end: Callable[[], Awaitable[object]]) -> None:
    """Close or reset a stream within 2 s, even when cancelled; its errors are moot."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await end()
        except Exception:
            pass


async def reset_quietly(stream: Any) -> None:
    await end_quietly(stream.reset)
