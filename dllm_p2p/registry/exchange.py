"""A node's own part in IPFS, with no daemon: bitswap, provider records and IPNS on the
network's Kademlia DHT.

Every node (worker, relay, gateway) runs one :class:`IpfsPeer` beside its host:

* **Blocks**: :class:`~dllm_p2p.registry.bitswap.Bitswap` serves the blocks of the node's
  recent registry publications from its embedded store, and fetches a DAG by CID.
* **Providers**: after a publication has stood for a moment, a few of the nodes that
  hold it announce a provider record for its CID on the DHT (py-libp2p's ``kad_dht``,
  protocol ``/ipfs/kad/1.0.0``, server mode); a node looks providers up there when no
  connected peer has a CID it needs. So a peer that knows only a CID and one node of the
  network can find who holds it.
* **Names**: the node signs an IPNS record (:mod:`dllm_p2p.registry.ipns`) pointing its
  name, ``/ipns/k51...`` of its own peer id, at a recent publication (kept in its store
  while named), stores it in the DHT, republishes it on a schedule, and resolves other
  names through the DHT.

This DHT is the network's own: its nodes are dllm nodes. Records use the key formats of
py-libp2p's DHT (``/ipns/<base58 peer id>``), not the public Amino DHT's binary keys.
With a Kubo daemon a node still adds and pins through Kubo as before; this runs as well,
so peers without a daemon can fetch from it.

Connections the DHT dials are handed to ``on_dialed`` so the node can close them once
they are idle (the membership's hang-up rule), instead of letting every lookup grow a
full mesh.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio
from libp2p.kad_dht import value_store as _value_store
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from ..host import connected_peers
from ..identity import Identity
from . import ipns
from .bitswap import PROTOCOLS as BITSWAP_PROTOCOLS
from .bitswap import Bitswap, BitswapError
from .ipfs import ContentNotFound, EmbeddedStore, IpfsUnavailable

log = logging.getLogger("dllm_p2p.registry.exchange")

KAD_PROTOCOL = "/ipfs/kad/1.0.0"
#: Protocols whose streams do not keep a connection busy (see Membership._hang_up_idle).
IDLE_PROTOCOLS = frozenset({KAD_PROTOCOL, *BITSWAP_PROTOCOLS})
#: Peers asked at once for a block: connected ones first, then providers.
ASK_AT_MOST = 8
#: How long connected peers get to answer before the DHT is asked for providers.
CONNECTED_TIMEOUT = 5.0
#: Bound on a provider lookup, and on a name lookup.
LOOKUP_TIMEOUT = 30.0
#: A publication is announced once it has stood this long (a busy node publishes every
#: few seconds while records arrive; announcing each would flood the DHT).
SETTLE = 10.0
SETTLE_MAX = 60.0
#: At most one announcement of a new CID per this many seconds.
PROVIDE_EVERY = 60.0
#: Providers a CID should have: each node announces with this over the live nodes.
PROVIDERS_WANTED = 4
#: IPNS: records live a day and ask resolvers to cache a minute; a node points its name
#: at a new CID at most every 10 minutes (the CID it names stays in its store), and signs
#: it again every 4 hours when nothing changed.
IPNS_LIFETIME = 24 * 3600.0
IPNS_TTL = 60.0
IPNS_EVERY = 600.0
IPNS_REPUBLISH = 4 * 3600.0
#: Values (IPNS records, at most 10 KiB each) a node keeps for others: py-libp2p's 50,000
#: would let fresh keys fill 500 MB. Set on the module, whose eviction reads it.
MAX_DHT_VALUES = 4096
_value_store.MAX_VALUE_STORE_SIZE = MAX_DHT_VALUES


class IpfsPeer:
    """Bitswap and the DHT for ``host``; ``run`` until cancelled."""

    def __init__(
        self,
        host: Any,
        store: EmbeddedStore,
        identity: Identity | None = None,
        *,
        on_dialed: Callable[[Iterable[ID]], None] | None = None,
        crowd: Callable[[], int] = lambda: 1,
        server: bool = True,
    ) -> None:
        """``server=False`` for a short-lived peer (``registry show --bootstrap``): it
        queries the DHT but does not answer for it, nor sit in others' routing tables.
        ``crowd()`` is how many live nodes the registry lists (see ``_provide``)."""
        self.host = host
        self.store = store
        self.identity = identity
        self.on_dialed = on_dialed
        self.crowd = crowd
        self.bitswap = Bitswap(host, store)
        # strict_validation: only keys with a validator (/ipns/, /pk/) are stored for peers;
        # py-libp2p otherwise keeps any un-namespaced value up to 1 MiB, 50,000 of them.
        self.dht = _Dht(
            self, host, DHTMode.SERVER if server else DHTMode.CLIENT, enable_random_walk=False, strict_validation=True,
        )
        self.name = ipns.ipns_name(host.get_id()) if identity is not None else None
        #: The CIDs we hold and announce, newest last; set by ``published``.
        self.providing: list[str] = []
        self.provided: str | None = None
        self._considered: str | None = None
        self.named: tuple[str, float] | None = None  # (cid, when signed)
        #: Called after our name moved (the publisher records it for `registry show`).
        self.on_named: Callable[[], None] | None = None
        self._changed = trio.Event()
        self._ready = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.bitswap.install()
        async with background_trio_service(self.dht):
            await self.add_connected()
            self._ready.set()
            task_status.started()
            await self._announce_loop()

    async def add_connected(self) -> None:
        """Put the peers we are connected to (that speak the DHT) in the routing table:
        py-libp2p's DHT learns peers only from its own queries and inbound streams."""
        for peer in connected_peers(self.host):
            try:
                await self.dht.add_peer(peer)
            except Exception as exc:
                log.debug("adding %s to the routing table failed: %r", peer, exc)

    # --- announcing ---

    def published(self, recent: list[str]) -> None:
        """The node's publications changed (newest last): serve and announce them."""
        self.providing = list(recent)
        self._changed.set()

    @property
    def pinned(self) -> tuple[str, ...]:
        """CIDs the store must keep although newer ones came: the one we announced as a
        provider and the one our name points to (the publisher's garbage collection)."""
        return tuple(c for c in (self.provided, self.named[0] if self.named else None) if c)

    async def _announce_loop(self) -> None:
        while True:
            with trio.move_on_after(IPNS_EVERY):
                await self._changed.wait()
            # Wait for the publication to settle: another change restarts the wait, up to
            # SETTLE_MAX (a large network's CID may change every few seconds for ever).
            started = trio.current_time()
            while True:
                self._changed = trio.Event()
                with trio.move_on_after(min(SETTLE, max(0.0, started + SETTLE_MAX - trio.current_time()))):
                    await self._changed.wait()
                    continue
                break
            if not self.providing:
                continue
            cid = self.providing[-1]
            try:
                await self.add_connected()
                await self._provide(cid)
                await self._name(cid)
            except Exception as exc:
                log.warning("announcing %s on the DHT failed: %r", cid, exc)
            await trio.sleep(PROVIDE_EVERY)

    async def _provide(self, cid: str) -> None:
        """Announce ``cid`` as a provider, if this node is one of the few that should.

        Every node of a network converges on the same CID, and a lookup needs only a few
        providers: each node announces with probability PROVIDERS_WANTED / live nodes, so
        a change costs the network about PROVIDERS_WANTED announcements, not one per node
        (on 50 relays, one per node slowed convergence from 163 s to over 300 s)."""
        if cid == self._considered:
            return
        self._considered = cid
        if random.random() >= PROVIDERS_WANTED / max(1, self.crowd()):
            return
        with self._noting_dials(), trio.move_on_after(LOOKUP_TIMEOUT):
            ok = await self.dht.provide(cid)
            self.provided = cid
            # Only what we announced is re-announced by the DHT's own republisher.
            self.dht.provider_store.providing_keys.intersection_update({_key(cid)})
            log.info("provider record for %s %s", cid, "announced" if ok else "kept locally (no DHT peer took it)")

    async def _name(self, cid: str) -> None:
        """Point our name at ``cid``: at once the first time, then at most every
        IPNS_EVERY for a new CID, and every IPNS_REPUBLISH regardless."""
        if self.identity is None:
            return
        now = time.time()
        if self.named is not None:
            named, at = self.named
            if now - at < (IPNS_EVERY if named != cid else IPNS_REPUBLISH):
                return
        record = ipns.make_record(
            self.identity, f"/ipfs/{cid}", sequence=time.time_ns() // 1_000_000, lifetime=IPNS_LIFETIME, ttl=IPNS_TTL,
        )
        with self._noting_dials(), trio.move_on_after(LOOKUP_TIMEOUT):
            await self.dht.put_value(ipns.dht_key(self.host.get_id()), record)
        self.named = (cid, now)
        log.info("IPNS name /ipns/%s -> /ipfs/%s", self.name, cid)
        if self.on_named is not None:
            self.on_named()

    # --- fetching ---

    async def fetch(self, cid: str) -> None:
        """Bring the DAG under ``cid`` into the store: from connected peers, else from
        the providers the DHT names. Raises ContentNotFound when nobody has it."""
        await self._ready.wait()
        connected = list(connected_peers(self.host))[:ASK_AT_MOST]
        if connected:
            try:
                count = await self.bitswap.fetch_dag(cid, connected, timeout=CONNECTED_TIMEOUT)
                log.info("fetched %s (%d blocks) from connected peers", cid, count)
                return
            except (BitswapError, trio.TooSlowError) as exc:
                log.info("connected peers do not have %s (%s); asking the DHT for providers", cid, exc)
        providers = await self.find_providers(cid)
        if not providers:
            raise ContentNotFound(f"no peer has {cid}: {len(connected)} connected peer(s) and the DHT know no provider")
        try:
            count = await self.bitswap.fetch_dag(cid, providers, timeout=LOOKUP_TIMEOUT)
        except (BitswapError, trio.TooSlowError) as exc:
            raise ContentNotFound(f"{len(providers)} provider(s) of {cid} did not give it: {exc}") from None
        log.info("fetched %s (%d blocks) from %d provider(s) found in the DHT", cid, count, len(providers))

    async def find_providers(self, cid: str) -> list[ID]:
        """Providers of ``cid`` we could connect to (ourselves excluded)."""
        await self.add_connected()
        with self._noting_dials(), trio.move_on_after(LOOKUP_TIMEOUT):
            infos = await self.dht.find_providers(cid, count=ASK_AT_MOST)
            reached: list[ID] = []
            for info in infos:
                if info.peer_id == self.host.get_id() or info.peer_id in reached:
                    continue
                try:
                    with trio.fail_after(10):
                        await self.host.connect(info)
                    reached.append(info.peer_id)
                except Exception as exc:
                    log.debug("provider %s unreachable: %r", info.peer_id, exc)
            return reached
        return []

    async def resolve(self, name: str) -> str:
        """``/ipns/<name>`` -> ``/ipfs/<cid>`` through the DHT, the record checked."""
        await self._ready.wait()
        peer = ipns.peer_id_of_name(name)
        await self.add_connected()
        value = None
        with self._noting_dials(), trio.move_on_after(LOOKUP_TIMEOUT):
            value = await self.dht.get_value(ipns.dht_key(peer))
        if value is None:
            raise IpfsUnavailable(f"no IPNS record for {name} in the DHT")
        record = ipns.verify_record(peer, value)
        return record.value

    # --- connection hygiene ---

    def _noting_dials(self) -> _NoteDials:
        return _NoteDials(self)


class _Dht(KadDHT):
    """py-libp2p's DHT, except that its 10-minute routing-table refresh takes the peers we
    are connected to instead of walking the network for random keys: those walks dial
    peers that nothing would hang up on (on 50 nodes, a full mesh again). Lookups for
    providers and names still walk the network; their dials are noted."""

    def __init__(self, owner: IpfsPeer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    async def refresh_routing_table(self) -> None:
        await self._owner.add_connected()


class _NoteDials:
    """Around a DHT operation: tell ``on_dialed`` which peers it connected us to."""

    def __init__(self, peer: IpfsPeer) -> None:
        self.peer = peer
        self.before: set[ID] = set()

    def __enter__(self) -> None:
        self.before = connected_peers(self.peer.host)

    def __exit__(self, *exc: object) -> None:
        new = connected_peers(self.peer.host) - self.before
        if new and self.peer.on_dialed is not None:
            self.peer.on_dialed(new)


def _key(cid: str) -> bytes:
    from libp2p.kad_dht.kad_dht import _encode_key

    return _encode_key(cid)
