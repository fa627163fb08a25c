"""How a node is reached and how it reaches others: directly, or through a relay.

A node behind a home router can dial out but nobody can dial in. It learns that from a
dial-back (``/dllm/dialback/1.0.0``: a peer it is connected to opens a *fresh* connection
to each of its listen addresses and checks the Noise handshake names it), then holds a
circuit-relay-v2 reservation on a relay it knows and advertises
``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<self>`` beside its own addresses. Dialers try
direct addresses first and the circuit a moment later, whichever answers first wins.

py-libp2p 0.8.1 has the relay protocol but not the glue, and some of it needs fixing
(each measured in isolation; details in docs/NETWORKS.md):

- ``host.connect`` drops every ``/p2p-circuit`` address: circuits are dialed here, with
  ``CircuitV2Transport``, and with the private-network key applied on the dialing side
  (upstream applies it only on the accepting side, so a ``--psk`` network's circuits fail).
- AutoNAT v1's server "dials back" with ``host.connect``, which returns the connection it
  already has: any port on the right IP is reported reachable. Hence the dial-back here.
- The relay's per-destination circuit limit is checked before an await and counted after
  it (6 concurrent circuits passed a limit of 2), and closing one circuit to a peer closes
  every other circuit to it: ``_Hop`` counts around the whole circuit and tracks none by peer.
- A yamux stream reset locally never wakes its reader, so each circuit that hit a limit
  kept its slot for good: ``_patch_yamux``.
- The library's reservation refresher stops for good once a reservation lapses and never
  reconnects to the relay: ``Reach._hold`` does both.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2 import dcutr as _dcutr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import write_delimited_msg
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from .host import AddressError, host_addrs, peer_info, reset_quietly

log = logging.getLogger(__name__)

DIALBACK_PROTOCOL = "/dllm/dialback/1.0.0"
#: What a relay grants: a reservation lives 5 minutes (renewed at half), a circuit 10
#: minutes and 64 MiB (an answer is a few KiB), 16 circuits to one peer, 128 in all.
RELAY_LIMITS = RelayLimits(duration=600, data=64 << 20, max_circuit_conns=16, max_reservations=128, reservation_ttl=300)
MAX_CIRCUITS = 128
#: Dialing: direct addresses first, one every STAGGER seconds, circuits after; at most
#: this many of each kind.
STAGGER = 0.25
MAX_DIRECT, MAX_CIRCUIT = 4, 2
#: Relays a private node holds reservations on.
RESERVATIONS = 2


def is_circuit(addr: str) -> bool:
    return "/p2p-circuit" in addr


def path_of(host: IHost, peer_id: ID) -> str | None:
    """``direct``, ``hole-punched`` or ``relayed``: how we are connected to ``peer_id``
    now (None: not connected)."""
    conns = host.get_network().get_connections(peer_id)
    if not conns:
        return None
    if all(_is_relayed(c) for c in conns):
        return "relayed"
    punched = getattr(getattr(host, "_dllm_reach", None), "punched", set())
    return "hole-punched" if peer_id in punched else "direct"


def _is_relayed(conn: Any) -> bool:
    try:
        return any(is_circuit(str(a)) for a in conn.get_transport_addresses())
    except Exception:
        return False


# --- the relay (hop) side ---------------------------------------------------------------------


class _NoStore(dict):  # type: ignore[type-arg]
    """Upstream keys live circuits by destination peer and closes them all when one ends."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


class _Hop(CircuitV2Protocol):
    """The relay protocol with limits that hold under concurrency (see the module doc)."""

    def __init__(self, host: IHost, limits: RelayLimits, allow_hop: bool, max_circuits: int = MAX_CIRCUITS) -> None:
        super().__init__(host, limits=limits, allow_hop=allow_hop)
        self.max_circuits = max_circuits
        self._circuits: Counter[ID] = Counter()
        self._active_relays = _NoStore()

    async def _handle_connect(self, stream: Any, msg: Any) -> None:
        dst = ID(msg.peer.id)
        if self._circuits[dst] >= self.limits.max_circuit_conns or sum(self._circuits.values()) >= self.max_circuits:
            try:
                await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=to_proto_status(StatusCode.RESOURCE_LIMIT_EXCEEDED)))
            finally:
                await stream.reset()
            return
        self._circuits[dst] += 1
        try:
            await super()._handle_connect(stream, msg)
        finally:
            self._circuits[dst] -= 1
            if self._circuits[dst] <= 0:
                del self._circuits[dst]

    @property
    def reservations(self) -> int:
        try:
            return len(self.resource_manager._reservations)
        except AttributeError:
            return 0


_patched = False


def _patch_libp2p() -> None:
    """Fixes to py-libp2p 0.8.1 that the relay needs (see the module doc)."""
    global _patched
    if _patched:
        return
    _patched = True
    from libp2p.stream_muxer.yamux.yamux import Yamux

    finalize = Yamux._finalize_stream_locked

    def _finalize_stream_locked(self: Any, stream: Any, *, fully_closed: bool) -> None:
        event = self.stream_events.get(stream.stream_id)
        finalize(self, stream, fully_closed=fully_closed)
        if event is not None and self.stream_events.get(stream.stream_id) is not event:
            event.set()  # wake the reader: it finds the stream gone and sees EOF

    Yamux._finalize_stream_locked = _finalize_stream_locked
    _dcutr._local_tcp_listen_addrs = _local_tcp_listen_addrs
    # Every circuit that ends normally is logged as an ERROR by the library.
    logging.getLogger("libp2p.relay.circuit_v2.protocol").setLevel(logging.CRITICAL)
    logging.getLogger("libp2p.relay.circuit_v2.transport").setLevel(logging.CRITICAL)


class _HolePunch(DCUtRProtocol):
    """DCUtR (direct connection upgrade through relay) that tells the other side where
    our router maps us: the IP the dial-back saw us at, with our listen port (home
    routers keep it). The library would read that from identify's observed addresses,
    which dllm hosts turn off (a peer could otherwise make us advertise anything)."""

    def __init__(self, host: IHost, reach: Reach) -> None:
        super().__init__(host, dial_timeout=3)
        self.reach = reach

    async def _get_observed_addrs(self) -> list[bytes]:
        if self.reach.observed_ip and self.reach.reachability == "private":
            ports = sorted({port for family, _ip, port in _dcutr._local_tcp_listen_addrs(self.host) if family == 4})
            return [multiaddr.Multiaddr(f"/ip4/{self.reach.observed_ip}/tcp/{port}").to_bytes() for port in ports]
        return await super()._get_observed_addrs()

    async def initiate_hole_punch(self, peer_id: ID) -> bool:
        ok = await super().initiate_hole_punch(peer_id)
        self.reach._punched(peer_id, ok)
        return ok

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        await super()._handle_dcutr_stream(stream)
        self.reach._punched(peer_id, peer_id in self._direct_connections)


def _local_tcp_listen_addrs(host: IHost) -> list[tuple[int, str, int]]:
    """Where hole-punch dials leave from: our listening sockets (0.0.0.0 is fine, they
    are SO_REUSEPORT), never loopback; upstream takes the first advertised address,
    127.0.0.1 for dllm hosts, and every punch fails with EINVAL."""
    found = []
    for addr in host.get_transport_addrs():
        parsed = _dcutr._tcp_ip_port(addr)
        if parsed is not None and not parsed[1].startswith("127.") and parsed[1] != "::1":
            found.append(parsed)
    return found


# --- dialing ----------------------------------------------------------------------------------


class Reach:
    """One per host: dials (direct or circuit), answers dial-backs, relays for others
    when asked to, and keeps this node reachable through relays when it is not directly.

    ``relays`` gives candidate relay addresses (bootstrap peers, registered relays);
    ``hop`` offers reservations to others: True (a relay), False, or "auto" (when a
    dial-back proves this node reachable). ``hole_punch`` tries DCUtR on relayed
    connections, which shows our public address to the other side.
    """

    def __init__(
        self,
        host: IHost,
        *,
        psk: str | None = None,
        relays: Callable[[], Sequence[str]] = tuple,
        hop: bool | str = False,
        hole_punch: bool = True,
    ) -> None:
        _patch_libp2p()
        self.host = host
        self.psk = psk or getattr(host.get_network(), "psk", None)
        self.relays = relays
        self.hop_wanted = hop
        self.reachability = "unknown"  # "public" | "private" | "unknown"
        self.observed_ip: str | None = None
        self._protocol = _Hop(host, RELAY_LIMITS, allow_hop=hop is True)
        self._transport = CircuitV2Transport(host, self._protocol, RelayConfig(roles=RelayRole.STOP))
        self._circuits: dict[ID, str] = {}  # relay -> our circuit address through it
        self._hole_punch = _HolePunch(host, self) if hole_punch and hop is not True else None
        self.punched: set[ID] = set()  # peers we reached by hole punching
        self.changed = trio.Event()
        setattr(host, "_dllm_reach", self)

    # --- what we advertise

    def addrs(self) -> list[str]:
        """Our addresses for records and heartbeats: circuits first when we are private."""
        direct = host_addrs(self.host)
        circuits = list(self._circuits.values())
        return circuits + direct if self.reachability == "private" else direct + circuits

    @property
    def hop(self) -> bool:
        return self._protocol.allow_hop

    def describe(self) -> dict[str, Any]:
        return {
            "reachability": self.reachability,
            "observed_ip": self.observed_ip,
            "relaying_for_others": self.hop,
            "reservations_held": sorted(str(r) for r in self._circuits),
            "reservations_granted": self._protocol.reservations if self.hop else 0,
        }

    # --- running

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(TProtocol(DIALBACK_PROTOCOL), self._serve_dialback)
        async with background_trio_service(self._protocol), trio.open_nursery() as nursery:
            if self._hole_punch is not None:
                nursery.start_soon(self._run_hole_punch)
            task_status.started()
            if self.hop_wanted is True:
                self.reachability = "public"
                await trio.sleep_forever()
            await self._find_out(nursery)

    async def _run_hole_punch(self) -> None:
        assert self._hole_punch is not None
        async with background_trio_service(self._hole_punch):
            await trio.sleep_forever()

    def _punched(self, peer_id: ID, ok: bool) -> None:
        if ok and peer_id not in self.punched:
            self.punched.add(peer_id)
            log.info("hole punched: %s is now reached directly", peer_id)
        elif not ok:
            log.debug("hole punching to %s failed", peer_id)

    async def _find_out(self, nursery: trio.Nursery) -> None:
        """Ask relays to dial us back until one answers; then relay for others (public) or
        hold reservations (private)."""
        holding: set[str] = set()
        delay = 1.0
        while True:
            if self.reachability == "unknown":
                for addr in list(self.relays())[:4]:
                    try:
                        verdict = await self.dialback(addr)
                    except Exception as exc:
                        log.debug("dial-back from %s failed: %r", addr, exc)
                        continue
                    self.reachability = "public" if verdict else "private"
                    log.info("reachability: %s (dial-back from %s; we are seen as %s)", self.reachability, addr[:60], self.observed_ip)
                    if verdict and self.hop_wanted == "auto":
                        self._protocol.allow_hop = True
                        log.info("relaying for others (circuit relay v2 hop)")
                    self.changed.set()
                    break
            if self.reachability == "private":
                for addr in list(self.relays()):
                    if len(holding) >= RESERVATIONS:
                        break
                    if addr not in holding:
                        holding.add(addr)
                        nursery.start_soon(self._hold, addr, holding)
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def dialback(self, addr: str, timeout: float = 20.0) -> bool:
        """Ask the peer at ``addr`` to dial our direct addresses on fresh connections;
        True when one of them answered."""
        info = peer_info(addr)
        with trio.fail_after(timeout):
            await self.connect(info.peer_id, [addr])
            stream = await self.host.new_stream(info.peer_id, [TProtocol(DIALBACK_PROTOCOL)])
            try:
                # All of them: the peer dials only those on the IP it sees us at.
                await stream.write(encode_varint_prefixed(json.dumps({"addrs": host_addrs(self.host)}).encode()))
                answer = json.loads(await read_varint_prefixed_bytes_limited(stream, 16 * 1024))
            finally:
                with trio.move_on_after(2):
                    await stream.close()
        self.observed_ip = answer.get("observed") if isinstance(answer.get("observed"), str) else None
        results = answer.get("results") if isinstance(answer.get("results"), dict) else {}
        return any(v == "ok" for v in results.values())

    async def _serve_dialback(self, stream: INetStream) -> None:
        """Dial each address the asker gave, on the IP we see it at (so nobody can aim
        us at a third party), with a fresh connection and the Noise handshake checking
        its peer id; nothing is kept."""
        try:
            with trio.fail_after(30):
                request = json.loads(await read_varint_prefixed_bytes_limited(stream, 16 * 1024))
                peer = stream.muxed_conn.peer_id
                remote = stream.get_remote_address()
                observed = remote[0] if remote and not _is_relayed(stream.muxed_conn) else None
                results: dict[str, str] = {}
                addrs = request.get("addrs") if isinstance(request, dict) else None
                for text in (addrs if isinstance(addrs, list) else [])[:8]:
                    if not isinstance(text, str) or len(text) > 512:
                        continue
                    results[text] = await self._probe(peer, text, observed)
                await stream.write(encode_varint_prefixed(json.dumps({"observed": observed, "results": results}).encode()))
                await stream.close()
        except Exception as exc:
            log.debug("dial-back request failed: %r", exc)
            await reset_quietly(stream)

    async def _probe(self, peer: ID, text: str, observed: str | None) -> str:
        try:
            addr = multiaddr.Multiaddr(text)
            ip = addr.value_for_protocol("ip4")
        except Exception:
            return "not an /ip4 address"
        if observed is None or ip != observed:
            return f"refused: not the address we see ({observed})"
        if addr.get_peer_id() is not None:
            addr = addr.decapsulate(multiaddr.Multiaddr(f"/p2p/{addr.get_peer_id()}"))
        network = self.host.get_network()
        transport = network.transport_manager.transport_for_dialing(addr)
        if transport is None:
            return "no transport"
        raw = None
        try:
            with trio.fail_after(5):
                raw = await transport.dial(addr)
                conn = new_protected_conn(raw, network.psk) if getattr(network, "psk", None) else raw
                secured = await network.upgrader.upgrade_security(conn, True, peer)
                await secured.close()
            return "ok"
        except trio.TooSlowError:
            return "timeout"
        except Exception as exc:
            return f"{type(exc).__name__}"
        finally:
            if raw is not None:
                with trio.move_on_after(2):
                    try:
                        await raw.close()
                    except Exception:
                        pass

    async def _hold(self, addr: str, holding: set[str]) -> None:
        """Hold a reservation on the relay at ``addr``: connect, reserve, renew at half its
        life, and start again as soon as the connection drops (the relay honours a
        reservation only while we stay connected)."""
        try:
            info = peer_info(addr)
        except AddressError:
            holding.discard(addr)
            return
        relay = info.peer_id
        self.host.get_peerstore().add_addrs(relay, info.addrs, 2**31 - 1)
        network = self.host.get_network()
        if hasattr(network, "protect"):  # the connection manager never prunes it
            network.protect(relay, "dllm-reservation")
        failures = 0
        try:
            while failures < 5:
                expiry = None
                try:
                    with trio.fail_after(20):
                        await self.connect(relay, [addr])
                        stream = await self.host.new_stream(relay, [HOP_PROTOCOL_ID])
                        try:
                            if await self._transport._make_reservation(stream, relay):
                                expiry = self._transport._reservations.get(relay)
                        finally:
                            await stream.close()
                except Exception as exc:
                    log.debug("reservation on %s failed: %r", addr, exc)
                if expiry is None:
                    failures += 1
                    self._drop_circuit(relay)
                    await trio.sleep(2.0 * failures)
                    continue
                failures = 0
                base = addr.rsplit("/p2p/", 1)[0]
                circuit = f"{base}/p2p/{relay}/p2p-circuit/p2p/{self.host.get_id()}"
                if self._circuits.get(relay) != circuit:
                    self._circuits[relay] = circuit
                    log.info("reachable through relay %s: %s", relay, circuit)
                    self.changed.set()
                renew_at = trio.current_time() + max(5.0, (expiry - time.time()) / 2)
                while trio.current_time() < renew_at and self.host.get_network().get_connections(relay):
                    await trio.sleep(1.0)
        finally:
            self._drop_circuit(relay)
            holding.discard(addr)  # another candidate may be tried
            if hasattr(network, "unprotect"):
                network.unprotect(relay, "dllm-reservation")

    def _drop_circuit(self, relay: ID) -> None:
        if self._circuits.pop(relay, None) is not None:
            log.info("lost the reservation on relay %s", relay)
            self.changed.set()

    # --- dialing

    async def connect(self, peer_id: ID, addrs: Sequence[str], timeout: float = 10.0) -> str:
        """Connect to ``peer_id`` unless connected: direct addresses first, one every
        STAGGER s, then its circuits; the first to succeed wins. Returns the path."""
        path = path_of(self.host, peer_id)
        if path is not None:
            return path
        direct = [a for a in addrs if not is_circuit(a)][:MAX_DIRECT]
        circuits = [a for a in addrs if is_circuit(a)][:MAX_CIRCUIT]
        attempts = direct + circuits
        if not attempts:
            raise ConnectionError(f"{peer_id} has no address we can dial")
        errors: list[str] = []
        won: list[str] = []
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for i, addr in enumerate(attempts):
                    nursery.start_soon(self._attempt, peer_id, addr, i * STAGGER + (0.75 if is_circuit(addr) and direct else 0), won, errors, nursery.cancel_scope)
        if not won:
            raise ConnectionError(f"cannot reach {peer_id}: {'; '.join(errors) or f'timed out after {timeout:g} s'}")
        return "relayed" if is_circuit(won[0]) else "direct"

    async def _attempt(self, peer_id: ID, addr: str, delay: float, won: list[str], errors: list[str], scope: trio.CancelScope) -> None:
        await trio.sleep(delay)
        if self.host.get_network().get_connections(peer_id):
            won.append(addr)
            scope.cancel()
            return
        try:
            if is_circuit(addr):
                await self._dial_circuit(addr)
            else:
                await self._dial_direct(peer_id, addr)
        except Exception as exc:
            errors.append(f"{addr[:80]}: {exc}"[:200])
            return
        won.append(addr)
        scope.cancel()

    async def _dial_direct(self, peer_id: ID, addr: str) -> None:
        """This address only (``host.connect`` would dial every address the peerstore
        holds for the peer, dead ones first, and give up after the first few)."""
        maddr = multiaddr.Multiaddr(addr)
        if maddr.get_peer_id() is not None:
            maddr = maddr.decapsulate(multiaddr.Multiaddr(f"/p2p/{maddr.get_peer_id()}"))
        conn = await self.host.get_network().dial_addr(maddr, peer_id)
        started = getattr(conn, "event_started", None)
        if started is not None:
            await started.wait()

    async def _dial_circuit(self, addr: str) -> None:
        maddr = multiaddr.Multiaddr(addr)
        relay_ma, dest = self._transport.parse_circuit_ma(maddr)
        relay = ID.from_base58(relay_ma.get_peer_id())
        self._forget_failure(relay)
        raw = await self._transport.dial_peer_info(PeerInfo(dest, [maddr]), relay_info=PeerInfo(relay, [relay_ma]))
        if self.psk:
            raw = new_protected_conn(raw, self.psk)
        await self.host.upgrade_outbound_connection(raw, dest)

    def _forget_failure(self, peer_id: ID) -> None:
        """The swarm refuses to dial a peer for 60 s after a failed dial; we keep our own
        deadlines and retry sooner (a relay that restarted, a link that came back)."""
        cache = getattr(self.host.get_network(), "_negative_peer_cache", None)
        if cache is not None:
            try:
                cache.evict(str(peer_id))
            except Exception:
                pass


def reach_of(host: IHost, psk: str | None = None) -> Reach:
    """The host's Reach; a dial-only one for hosts that never made their own."""
    reach = getattr(host, "_dllm_reach", None)
    return reach if reach is not None else Reach(host, psk=psk)


async def connect(host: IHost, peer_id: ID, addrs: Sequence[str], timeout: float = 10.0) -> str:
    return await reach_of(host).connect(peer_id, addrs, timeout)
