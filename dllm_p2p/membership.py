"""Joining the network: registry replication, registration and heartbeats over libp2p.

One ``Membership`` runs beside a worker's or gateway's host:

* GossipSub carries two topics: signed heartbeats (``/dllm/heartbeat/1``, liveness and
  load every few seconds) and registry head announcements (``/dllm/registry/1``).
* ``/dllm/registry/1.0.0`` is a stream protocol that hands out our verified chain. A peer
  that announces a head we don't have gets asked for its chain, which is verified and
  merged; an invalid chain is dropped and our last good one kept.
* A worker appends a signed ``register`` record at start, ``renew``s it before it
  expires and appends ``deregister`` on clean shutdown.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL_ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from . import heartbeat, reach, wire
from .host import connected_peers, host_addrs, peer_info, reset_quietly
from .identity import Identity
from .fsutil import write_json_atomic
from .registry.chain import (
    DEFAULT_POW_BITS,
    MAX_FILE_BYTES,
    MAX_POW_BITS,
    Chain,
    InvalidChain,
    Record,
    compact,
    make_record,
    merge,
    merge_fitting,
    pow_ok,
    record_chain,
    solve_pow,
)
from .registry import exchange
from .registry.publish import Publisher
from .registry.store import ChainStore

log = logging.getLogger("dllm_p2p.membership")

REGISTRY_TOPIC = "/dllm/registry/1"
#: Peers whose last heartbeat we keep (the least recently heard are forgotten first):
#: every fresh key that gossips would otherwise grow this for ever.
MAX_PEERS_TRACKED = 10_000
#: Chain fetches running at once, and how soon the same peer is asked again for the
#: same head (or, prompted by a heartbeat, at all). A new head is fetched at once (one
#: fetch per peer at a time; gossip's own rate limit bounds how often a peer announces).
MAX_FETCHES = 8
REFETCH_AFTER = 30.0
#: Registered nodes a node keeps connections to, at least (more come and go with
#: requests, gossip and peers that dial us).
MESH_TARGET = 8
#: Above this many connections, those dialed for a fetch are closed when idle (_hang_up_idle).
MESH_MAX = 2 * MESH_TARGET
#: How many of our past heads an announcement is checked against (see _consume_announcements).
MAX_HELD_HEADS = 256
#: Addresses of one peer tried per fetch.
MAX_DIAL_ADDRS = 4
#: A node that reached none of its bootstrap peers at start tries them again after
#: REJOIN_FIRST seconds, doubling to REJOIN_MAX, until one answers (in every 50-relay
#: converge run, 1-3 relays gave up on their 5 quick tries and stayed alone for good).
REJOIN_FIRST = 15.0
REJOIN_MAX = 300.0
#: A node announces its head (with its own record) at once when it changes its record,
#: and otherwise by Trickle (RFC 6206): in intervals from ANNOUNCE_IMIN doubling to
#: ANNOUNCE_IMAX, keeping quiet in an interval where ANNOUNCE_K peers announced its head
#: already, back to ANNOUNCE_IMIN when a fetch shows a peer lacks what we hold. A network
#: in agreement sends a few announcements per ANNOUNCE_IMAX whatever its size (each node
#: every 30 s was 1.7 messages/s at 50 nodes, each costing every node CPU to forward).
ANNOUNCE_IMIN = 1.0
ANNOUNCE_IMAX = 32.0
ANNOUNCE_K = 2
#: Seconds (random in this range) between hearing a head we cannot reach from its
#: announcement and fetching the announcer's chain, if heads still differ then.
FETCH_PAUSE = (1.0, 3.0)
REGISTRY_PROTOCOL = "/dllm/registry/1.0.0"
#: Streams that do not keep a connection open (see _hang_up_idle): gossip, identify and
#: the chain exchange itself.
IDLE_PROTOCOLS = frozenset(
    {GOSSIPSUB_PROTOCOL_ID, REGISTRY_PROTOCOL, "/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", *exchange.IDLE_PROTOCOLS}
)
#: Largest chain frame we accept over the registry protocol: any chain that verifies fits
#: (a full chain of the largest records is under MAX_FILE_BYTES even with indentation,
#: and it travels without), plus the frame's own fields.
MAX_CHAIN_BYTES = MAX_FILE_BYTES + 64 * 1024


@dataclass
class MembershipConfig:
    #: "worker" registers and heartbeats; "gateway" heartbeats (and registers when it
    #: has a public URL); "relay" registers and heartbeats, serving no model;
    #: "observer" only listens (the `nodes` command).
    role: str = "worker"
    bootstrap: list[str] = field(default_factory=list)
    heartbeat_interval: float = 2.0
    #: A node unseen for this long is offline. Default: three heartbeats and a margin.
    ttl: float | None = None
    #: Registry records expire after this long unless renewed (renewal at a third of it).
    record_ttl: float = 600.0
    gateway_url: str | None = None
    #: Proof of work a record of this network carries (the registry's checkpoint says it;
    #: every node of one network must use the same value).
    pow_bits: int = DEFAULT_POW_BITS

    def __post_init__(self) -> None:
        """Refuse settings that would only fail later, deep inside a loop."""
        if not 0 < self.heartbeat_interval <= 3600:
            raise ValueError(f"--heartbeat-interval must be between 0 and 3600 seconds, not {self.heartbeat_interval:g}")
        if self.ttl is not None and not self.ttl > 0:
            raise ValueError(f"--ttl must be positive, not {self.ttl:g}")
        if not self.record_ttl >= 10:
            raise ValueError(f"--record-ttl must be at least 10 seconds, not {self.record_ttl:g}")
        if not 0 <= self.pow_bits <= MAX_POW_BITS:
            raise ValueError(f"--pow-bits must be between 0 and {MAX_POW_BITS}, not {self.pow_bits}")

    @property
    def effective_ttl(self) -> float:
        return self.ttl if self.ttl is not None else 3 * self.heartbeat_interval + 1.0


class Membership:
    def __init__(
        self,
        identity: Identity,
        config: MembershipConfig,
        store: ChainStore,
        *,
        models: Callable[[], list[str]] = list,
        load: Callable[[], dict[str, Any]] = dict,
        model_info: Callable[[], dict[str, dict[str, Any]]] = dict,
        on_heartbeat: Callable[[heartbeat.Heartbeat], None] | None = None,
        on_chain: Callable[[Chain], None] | None = None,
        publisher: Publisher | None = None,
        on_bad_heartbeat: Callable[[str, str], None] | None = None,
        ledger: Callable[[], dict[str, Any]] | None = None,
        sinks: Any = None,
    ) -> None:
        self.identity = identity
        self.config = config
        self.store = store
        self.models = models
        self.load = load
        self.model_info = model_info
        self.on_heartbeat = on_heartbeat
        self.on_chain = on_chain
        self.on_bad_heartbeat = on_bad_heartbeat
        #: Our ledger summary for heartbeats (credits.Ledger.summary), when we keep one.
        self.ledger = ledger
        self.publisher = publisher
        #: Where each new CID is pushed after a publication (registry/sinks.py ``Sinks``).
        self.sinks = sinks
        #: Bitswap and the DHT, while ``run`` runs with a publisher (registry/exchange.py).
        self.ipfs: exchange.IpfsPeer | None = None
        self._unpublished = trio.Event()
        self.peer_id = identity.peer_id.to_base58()
        self.host: IHost | None = None
        self.pubsub: Pubsub | None = None
        #: peer id -> its latest heartbeat, ``seen_at`` on our clock; least recently heard first.
        self.last_seen: OrderedDict[str, heartbeat.Heartbeat] = OrderedDict()
        #: peer id -> the smallest (arrival - stamp) seen: its clock's offset from ours
        #: plus the fastest delivery; bounded with ``last_seen``.
        self._offsets: dict[str, float] = {}
        self._fetched_at: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._seq = int(time.time() * 1000)
        self._fetching: set[str] = set()
        self._again: set[str] = set()  # announced a head while we were fetching from it
        #: Set when a fetch showed that a peer lacks records we hold (Trickle's
        #: "inconsistency"); ``_heard_same`` counts announcements of our head.
        self._changed = trio.Event()
        self._heard_same = 0
        #: peer id -> the head it announced last (bounded like ``last_seen``).
        self._announced: OrderedDict[str, str] = OrderedDict()
        #: Peers we connected to only to fetch their chain (see _hang_up_idle).
        self._dialed_to_fetch: OrderedDict[ID, None] = OrderedDict()
        #: Sources of chains of another network (other proof of work) we warned about.
        self._other_networks: OrderedDict[str, None] = OrderedDict()
        #: The heads we held lately: everything in one is in our chain (or expired).
        self._held: OrderedDict[str, None] = OrderedDict()
        #: Held while the chain is merged and saved: two fetches must not both build on
        #: the same old chain, and saves (off the event loop) must land in order.
        self._chain_lock = trio.Lock()
        #: While leaving: our deregistration head, the peers that fetched it, and an
        #: event set at each fetch.
        self._leaving: tuple[str, set[Any], trio.Event] | None = None

    @property
    def registers(self) -> bool:
        return self.config.role in ("worker", "relay") or bool(self.config.gateway_url)

    @property
    def chain(self) -> Chain:
        return self.store.chain

    def addrs(self) -> list[str]:
        """What we advertise: our addresses, and circuits through relays when we hold
        reservations (dllm_p2p.reach)."""
        assert self.host is not None
        found = getattr(self.host, "_dllm_reach", None)
        return found.addrs()[:16] if found is not None else host_addrs(self.host)

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, host: IHost, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Join, then keep registering, announcing and heartbeating until cancelled."""
        self.host = host
        try:
            self.store.load()
        except InvalidChain as exc:
            log.warning("ignoring %s: %s; starting from an empty registry", self.store.path, exc)
        if self.chain.pow_bits != self.config.pow_bits:
            if self.chain.records:
                log.warning(
                    "%s asks for %d bits of proof of work, this node for %d: starting a new registry",
                    self.store.path, self.chain.pow_bits, self.config.pow_bits,
                )
            self.store.save(Chain(pow_bits=self.config.pow_bits))
        if self.on_chain is not None:
            self.on_chain(self.chain)
        router = GossipSub(
            [GOSSIPSUB_PROTOCOL_ID],
            degree=4,
            degree_low=2,
            degree_high=8,
            heartbeat_initial_delay=0.1,
            # py-libp2p's default of 120 s means meshes take minutes to form.
            heartbeat_interval=1,
            # Our own publishes count against this: heartbeats + head announcements with
            # room for bursts; anything above it from one peer is spam.
            max_messages_per_topic_per_second=max(10.0, 4.0 / self.config.heartbeat_interval),
        )
        self.pubsub = pubsub = _Pubsub(host, router)
        pubsub.set_topic_validator(heartbeat.TOPIC, self._validate_heartbeat, False)
        pubsub.set_topic_validator(REGISTRY_TOPIC, self._validate_announcement, False)
        host.set_stream_handler(TProtocol(REGISTRY_PROTOCOL), self._serve_chain)
        async with background_trio_service(pubsub), background_trio_service(router):
            await pubsub.wait_until_ready()
            heartbeats = await pubsub.subscribe(heartbeat.TOPIC)
            announcements = await pubsub.subscribe(REGISTRY_TOPIC)
            async with trio.open_nursery() as nursery:
                # Subscription queues hold 32 messages and drop the rest silently:
                # each is drained by its own task.
                nursery.start_soon(self._consume_heartbeats, heartbeats)
                nursery.start_soon(self._consume_announcements, announcements)
                if not await self._join():
                    nursery.start_soon(self._rejoin_loop)
                if self.registers:
                    await self._append_own("register")
                nursery.start_soon(self._heartbeat_loop)
                nursery.start_soon(self._renew_loop)
                nursery.start_soon(self._readdress_loop)
                nursery.start_soon(self._mesh_loop)
                nursery.start_soon(self._announce_loop)
                if self.publisher is not None:
                    await nursery.start(self._run_ipfs, self.publisher)
                    self._unpublished.set()
                    nursery.start_soon(self._publish_loop)
                    if self.sinks is not None:
                        nursery.start_soon(self.sinks.run)
                task_status.started()
                await trio.sleep_forever()

    async def _run_ipfs(self, publisher: Publisher, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve our publications over bitswap and the DHT; with no Kubo daemon, sign our
        own IPNS name. Then load a registry that was named only by CID or name at start
        (``publisher.pending``), now that there are peers to fetch it from."""
        assert self.host is not None
        self.ipfs = exchange.IpfsPeer(
            self.host, publisher.store, self.identity if publisher.kubo is None else None,
            on_dialed=self._dialed, crowd=lambda: len(self.chain.nodes()),
        )
        publisher.network = self.ipfs
        self.ipfs.on_named = publisher.save_state
        async with trio.open_nursery() as nursery:
            await nursery.start(self.ipfs.run)
            task_status.started()
            if publisher.pending is not None:
                await self._load_pending(publisher)

    def _dialed(self, peers: Any) -> None:
        """Connections opened for us (DHT lookups): closed when idle, like fetches'."""
        for peer in peers:
            _remember(self._dialed_to_fetch, peer, None, MAX_PEERS_TRACKED)

    async def _load_pending(self, publisher: Publisher) -> None:
        source, publisher.pending = publisher.pending, None
        for attempt in range(4):
            try:
                chain = await publisher.load(source)
            except Exception as exc:
                log.warning("registry %s: %s (try %d of 4)", source, exc, attempt + 1)
                await trio.sleep(5 * 2**attempt)
                continue
            if await self._take_chain(chain, f"the registry {source}"):
                log.info("registry %s loaded from peers: %d blocks", source, len(chain.blocks))
            return

    async def _join(self) -> bool:
        """Dial each bootstrap peer (a few tries each) and merge its chain; False when there
        were bootstrap peers and none answered."""
        joined = not self.config.bootstrap
        for addr in self.config.bootstrap:
            for attempt in range(5):
                try:
                    await self._fetch_chain(addr)
                    joined = True
                    break
                except Exception as exc:
                    log.warning("bootstrap %s: %s (try %d of 5)", addr, exc, attempt + 1)
                    await trio.sleep(0.5 * 2**attempt)
        return joined

    async def _rejoin_loop(self) -> None:
        """Keep trying the bootstrap peers, more and more slowly, until one answers (they may
        come up after us, or the network between may have been down) or another peer
        connects to us."""
        delay = REJOIN_FIRST
        while True:
            log.warning("no bootstrap peer answered; trying again in %.0f s", delay)
            await trio.sleep(delay)
            if self.host is not None and self.host.get_network().connections:
                return  # peers found us meanwhile (mDNS, a dial): gossip has reached us
            for addr in self.config.bootstrap:
                try:
                    await self._fetch_chain(addr)
                except Exception as exc:
                    log.info("bootstrap %s: %s", addr, exc)
                    continue
                log.warning("joined the network through %s", addr)
                return
            delay = min(2 * delay, REJOIN_MAX)

    async def meet(self, info: Any) -> None:
        """A peer found on the LAN (mDNS): connect, so gossip reaches it, and merge its
        chain (at most once per REFETCH_AFTER unless it announces a new head)."""
        addrs = [f"{a}/p2p/{info.peer_id}" for a in info.addrs][:MAX_DIAL_ADDRS]
        if addrs:
            await self._fetch_from_peer(str(info.peer_id), addrs)

    async def leave(self) -> None:
        """Sign a ``deregister`` record and spread it; call before cancelling ``run``.

        It has to run while the pubsub service is still up: once its tasks are cancelled
        a publish is only queued, never sent.
        """
        # A node stopped before its first record was made (it may still be solving its
        # proof of work) has nothing to take back.
        registered = any(r["peer_id"] == self.peer_id for r in self.chain.records)
        if self.registers and registered and self.host is not None and self.pubsub is not None:
            try:
                await self._append_own("deregister", announce=False)
                self._leaving = (self.chain.head, set(), trio.Event())
                # Without the record, so that peers fetch it from us and we know who has.
                await self._announce(with_record=False)
                # Peers fetch the new head from us on the announcement: stay up until the
                # peers we are connected to (up to 3) have, or 2.5 s; else they would
                # learn of our leaving only when the record expires.
                peers = len(self.host.get_network().connections)
                with trio.move_on_after(2.5):
                    while len(self._leaving[1]) < min(peers, 3):
                        await self._leaving[2].wait()
                        self._leaving = (self._leaving[0], self._leaving[1], trio.Event())
            except Exception as exc:
                log.warning("deregister failed: %r", exc)

    # --- our own records ----------------------------------------------------------------

    def _next_seq(self) -> int:
        # Milliseconds since the epoch, bumped when needed: grows across restarts even if
        # the node lost its copy of the chain.
        self._seq = max(self._seq + 1, int(time.time() * 1000), self.chain.next_seq(self.peer_id))
        return self._seq

    async def _append_own(self, op: str, *, announce: bool = True) -> None:
        assert self.host is not None
        extra: dict[str, Any] = {"role": self.config.role}
        spans = record_spans(self.model_info()) if self.config.role == "worker" else {}
        if spans:
            extra["spans"] = spans  # span workers only: a full worker's record is as before
        if self.config.gateway_url:
            extra["gateway_url"] = self.config.gateway_url
        if self.chain.pow_bits:
            # Abandoned on cancel: a node stopped while it solves (seconds) stops at once.
            extra["pow"] = await trio.to_thread.run_sync(
                proof_of_work, self.store.path.parent, self.peer_id, self.chain.pow_bits, abandon_on_cancel=True
            )
        record = make_record(
            self.identity,
            op,
            addrs=self.addrs(),
            models=self.models() if self.config.role == "worker" else [],
            seq=self._next_seq(),
            ttl=self.config.record_ttl,
            **extra,
        )
        # Compacting here keeps a long-lived node's file bounded: superseded renewals and
        # expired records go, every live record stays (see docs/REGISTRY.md). Our own
        # record always fits: a full chain gives up foreign peers first.
        async with self._chain_lock:
            own = merge_fitting(self.chain, Chain(self.chain.pow_bits).append(record), self.peer_id, self._rank)
            await self._accept(compact(own, time.time()))
        # Pushed at once, record included: every peer that held our previous head takes
        # it from the announcement alone.
        if announce:
            try:
                await self._announce()
            except Exception as exc:
                log.debug("announce failed: %r", exc)

    def _rank(self, peer_id: str, records: list[Record]) -> tuple[int, int, str]:
        """Which foreign peers a full chain keeps first: those heard from lately (a
        heartbeat costs a running node; a record costs only a key), then the most
        recently renewed."""
        beat = self.last_seen.get(peer_id)
        alive = beat is not None and time.time() - beat.seen_at < 10 * beat.ttl(self.config.effective_ttl)
        return (0 if alive else 1, -max(r["issued"] for r in records), peer_id)

    async def _accept(self, chain: Chain) -> bool:
        """Adopt ``chain`` if it changes our head; persist (off the event loop: fsync) and
        tell listeners. Call with ``_chain_lock`` held."""
        if chain.head == self.chain.head:
            return False
        _remember(self._held, self.chain.head, None, MAX_HELD_HEADS)
        await trio.to_thread.run_sync(self.store.save, chain)
        self._heard_same = 0
        self._unpublished.set()
        if self.on_chain is not None:
            self.on_chain(chain)
        return True

    # --- registry exchange --------------------------------------------------------------

    async def _serve_chain(self, stream: INetStream) -> None:
        try:
            chain = self.chain
            data = await trio.to_thread.run_sync(chain.to_compact_json)
            await stream.write(wire.encode_frame({"type": "chain", "head": chain.head, "data": data}))
            await stream.close()
            if self._leaving is not None and chain.head == self._leaving[0]:
                self._leaving[1].add(stream.muxed_conn.peer_id)
                self._leaving[2].set()
        except Exception as exc:
            log.debug("serving the chain failed: %r", exc)
            await reset_quietly(stream)

    async def _fetch_chain(self, addr: str) -> Chain | None:
        """Fetch, verify and merge the chain of the peer at ``addr``; return theirs
        (None when it was invalid)."""
        assert self.host is not None
        info = peer_info(addr)
        with trio.fail_after(10):
            if not self.host.get_network().connections.get(info.peer_id):
                _remember(self._dialed_to_fetch, info.peer_id, None, MAX_PEERS_TRACKED)
            await reach.connect(self.host, info.peer_id, [addr])
            stream = await self.host.new_stream(info.peer_id, [TProtocol(REGISTRY_PROTOCOL)])
            try:
                frame = await wire.FrameReader(stream, MAX_CHAIN_BYTES).read_frame()
            except wire.FrameTooLarge as exc:
                log.warning("refusing the chain of %s: %s", info.peer_id, exc)
                return None
            finally:
                with trio.move_on_after(2):
                    await stream.close()
        if not frame or not isinstance(frame.get("data"), bytes):
            raise ValueError("peer sent no chain")
        try:
            # Verification is CPU work (signatures of records not seen before): off the loop.
            theirs = await trio.to_thread.run_sync(functools.partial(Chain.from_json, frame["data"], clamp=True))
        except InvalidChain as exc:
            log.warning("ignoring an invalid chain from %s: %s", info.peer_id, exc)
            return None
        return theirs if await self._take_chain(theirs, f"the chain of {info.peer_id}") else None

    async def _take_chain(self, theirs: Chain, what: str) -> bool:
        """Merge a verified chain into ours; False when it belongs to another network."""
        if theirs.pow_bits != self.config.pow_bits:
            # Once per source at WARNING: a peer of another network is asked again at
            # every heartbeat it sends.
            level = logging.DEBUG if what in self._other_networks else logging.WARNING
            _remember(self._other_networks, what, None, MAX_PEERS_TRACKED)
            log.log(
                level, "ignoring %s: it asks for %d bits of proof of work, this network %d (another network?)",
                what, theirs.pow_bits, self.config.pow_bits,
            )
            return False
        async with self._chain_lock:
            merged = await trio.to_thread.run_sync(merge_fitting, self.chain, theirs, self.peer_id, self._rank)
            await self._accept(merged)
        if merged.head != theirs.head:
            # We hold records they lack: announce soon so that they fetch from us. (When
            # theirs held everything ours did, they announce the head we now share:
            # every fetcher announcing it too made each change cost N messages.)
            self._changed.set()
        return True

    async def push_to(self, addr: str, timeout: float = 15.0) -> bool:
        """Announce our head until the peer at ``addr`` holds everything we hold."""
        with trio.move_on_after(timeout):
            while True:
                await self._announce()
                theirs = await self._fetch_chain(addr)
                if theirs is not None and merge(theirs, self.chain) == theirs:
                    return True
                await trio.sleep(0.5)
        return False

    def _stamp(self, beat: heartbeat.Heartbeat, arrival: float) -> heartbeat.Heartbeat:
        """When the heartbeat was sent, on *our* clock.

        The sender's stamp is on its clock, which may be off by minutes; arrival time alone
        would count a delayed or replayed heartbeat as fresh. So each peer's offset (the
        smallest arrival - stamp seen, allowed to drift up by a second per heartbeat) maps
        its stamps onto our clock: a slow clock no longer hides a live node, and a
        heartbeat that arrives late counts from when it was sent.
        """
        offset = arrival - beat.ts
        known = self._offsets.get(beat.peer_id)
        if known is None:
            # First sight: no offset to go by yet. Gossip hands new peers the last few
            # messages it holds, maybe a dead node's: trust the stamp, which can only make
            # the heartbeat look older. A slow-clocked node shows at its second one.
            self._offsets[beat.peer_id] = offset
            return dataclasses.replace(beat, seen_at=min(arrival, beat.ts))
        base = self._offsets[beat.peer_id] = min(offset, known + 1.0)
        return dataclasses.replace(beat, seen_at=min(arrival, beat.ts + base))

    async def _fetch_from_peer(self, peer_id: str, addrs: list[str], head: str | None = None) -> None:
        """Fetch ``peer_id``'s chain when it announces a ``head`` we have not fetched from
        it, or, with no head (prompted by a heartbeat), at most once per 30 s. One fetch
        per peer at a time: a peer that announces during a fetch is asked again after it.
        (A leaving node stays up only a second after announcing its deregistration:
        its new head must not wait.)"""
        if peer_id == self.peer_id:
            return
        if peer_id in self._fetching:
            if head is not None:
                self._again.add(peer_id)
            return
        last, last_head = self._fetched_at.get(peer_id, (-REFETCH_AFTER, None))
        fresh = head is not None and head != last_head
        if len(self._fetching) >= MAX_FETCHES or (not fresh and trio.current_time() - last < REFETCH_AFTER):
            return
        self._fetching.add(peer_id)
        try:
            while True:
                _remember(self._fetched_at, peer_id, (trio.current_time(), head), MAX_PEERS_TRACKED)
                for addr in addrs[:MAX_DIAL_ADDRS]:
                    try:
                        await self._fetch_chain(addr)
                        break
                    except Exception as exc:
                        log.debug("fetching the chain from %s failed: %r", addr, exc)
                if peer_id not in self._again:
                    return
                self._again.discard(peer_id)
        finally:
            self._fetching.discard(peer_id)
            self._again.discard(peer_id)

    # --- gossip -------------------------------------------------------------------------

    def _validate_heartbeat(self, forwarder: ID, message: Any) -> bool:
        try:
            sender = ID(message.from_id).to_base58()
        except Exception:
            return False
        try:
            heartbeat.parse(message.data, sender=sender)
            return True
        except heartbeat.InvalidHeartbeat as exc:
            log.debug("rejected heartbeat from %s: %s", sender, exc)
            if self.on_bad_heartbeat is not None:
                # GossipSub's strict signing has authenticated the publisher: it is the
                # one that sent content we cannot use.
                self.on_bad_heartbeat(sender, str(exc))
            return False

    def _validate_announcement(self, forwarder: ID, message: Any) -> bool:
        try:
            parse_announcement(message.data)
            return True
        except Exception:  # an exception here would stop the pubsub service
            return False

    async def _consume_heartbeats(self, subscription: Any) -> None:
        async with trio.open_nursery() as nursery:
            async for message in subscription:
                try:
                    beat = heartbeat.parse(message.data, sender=ID(message.from_id).to_base58())
                except heartbeat.InvalidHeartbeat:
                    continue
                previous = self.last_seen.get(beat.peer_id)
                if previous is not None and beat.seq <= previous.seq:
                    continue  # replayed or reordered
                beat = self._stamp(beat, time.time())
                self.last_seen[beat.peer_id] = beat
                self.last_seen.move_to_end(beat.peer_id)
                while len(self.last_seen) > MAX_PEERS_TRACKED:
                    forgotten, _ = self.last_seen.popitem(last=False)
                    self._offsets.pop(forgotten, None)
                if self.on_heartbeat is not None:
                    self.on_heartbeat(beat)
                if beat.role == "worker" and beat.peer_id not in self.chain.nodes():
                    nursery.start_soon(self._fetch_from_peer, beat.peer_id, beat.addrs)

    async def _consume_announcements(self, subscription: Any) -> None:
        async with trio.open_nursery() as nursery:
            async for message in subscription:
                try:
                    announcement = parse_announcement(message.data)
                except ValueError:
                    continue
                sender = ID(message.from_id).to_base58()
                if sender == self.peer_id:
                    continue
                _remember(self._announced, sender, announcement.head, MAX_PEERS_TRACKED)
                if announcement.head == self.chain.head:
                    self._heard_same += 1
                elif announcement.head in self._held:
                    pass  # a head we held (a peer behind, or a late message): nothing new in it
                else:
                    nursery.start_soon(self._take_announcement_guarded, sender, announcement)

    async def _take_announcement_guarded(self, sender: str, announcement: Announcement) -> None:
        try:
            await self._take_announcement(sender, announcement)
        except Exception as exc:  # one announcement must never stop the node
            log.warning("handling the announcement of %s failed: %r", sender, exc)

    async def _take_announcement(self, sender: str, announcement: Announcement) -> None:
        """A head we do not hold. Take the sender's own record that came with it (a
        renewal or a new node reaches every peer in one message, no fetch); when our head
        still differs from theirs a moment later, fetch their chain (anti-entropy: a
        record gossip missed). The pause lets the records of a wave of changes arrive
        first, and the fetch is skipped when the sender has moved on or we caught up."""
        record, at = announcement.record, announcement.at
        if record is not None and record.get("peer_id") == sender and at is not None and isinstance(record.get("seq"), int):
            def held() -> bool:  # nothing new in it (the common case: heard from several peers)
                return record["seq"] < self.chain.next_seq(sender) and at <= self.chain.compacted_at

            def take() -> Chain | None:
                if held():
                    return None
                try:
                    theirs = record_chain(record, at, self.chain.pow_bits)
                    return merge_fitting(self.chain, theirs, self.peer_id, self._rank)
                except Exception as exc:  # InvalidRecord, or any surprise: fetch instead
                    log.debug("announced record of %s not taken: %r", sender, exc)
                    return None

            if not held():
                async with self._chain_lock:
                    merged = await trio.to_thread.run_sync(take)
                    if merged is not None:
                        await self._accept(merged)
            if self.chain.head == announcement.head:
                return
            await trio.sleep(random.uniform(*FETCH_PAUSE))
            if self._announced.get(sender) != announcement.head or self.chain.head == announcement.head:
                return
            # Any peer we are connected to that announced the same head will do: dialing
            # whoever announced it made every node connect to every other.
            nearby = self._connected_announcer(announcement.head)
            if nearby is not None:
                return await self._fetch_from_peer(*nearby, announcement.head)
        # (No record: a leaving node, which waits for peers to fetch its deregistration.)
        await self._fetch_from_peer(sender, announcement.addrs, announcement.head)

    def _connected_announcer(self, head: str) -> tuple[str, list[str]] | None:
        """A peer we are connected to whose latest announcement was ``head``, with an
        address (the open connection is what gets used)."""
        assert self.host is not None
        network = self.host.get_network()
        connected = {peer.to_base58(): peer for peer in connected_peers(self.host)}
        for peer_id, announced in reversed(self._announced.items()):
            peer = connected.get(peer_id)
            if announced == head and peer is not None:
                try:
                    addrs = network.peerstore.addrs(peer)
                except Exception:  # PeerStoreError: no address recorded
                    continue
                if addrs:
                    return peer_id, [f"{addrs[0]}/p2p/{peer_id}"]
        return None

    async def _announce(self, *, with_record: bool = True) -> None:
        if self.pubsub is None or self.host is None:
            return
        chain = self.chain
        message: dict[str, Any] = {"head": chain.head, "blocks": len(chain.blocks), "addrs": self.addrs()}
        own = next((r for r in reversed(chain.records) if r["peer_id"] == self.peer_id), None) if with_record else None
        if own is not None:
            message.update(record=own, at=chain.compacted_at)
        await self.pubsub.publish(REGISTRY_TOPIC, msgpack.packb(message))

    async def _announce_loop(self) -> None:
        """Announce our head by Trickle (RFC 6206; see ANNOUNCE_IMIN): at a random time in
        the second half of each interval unless ANNOUNCE_K peers announced it first; the
        interval doubles and falls back to ANNOUNCE_IMIN when ``_changed`` is set (which
        at ANNOUNCE_IMIN does not restart it: at most one announcement a second)."""
        interval = ANNOUNCE_IMIN
        while True:
            self._changed = trio.Event()
            self._heard_same = 0
            at = random.uniform(interval / 2, interval)
            if await self._wait_change(at, restart=interval > ANNOUNCE_IMIN):
                interval = ANNOUNCE_IMIN
                continue
            if self._heard_same < ANNOUNCE_K:
                try:
                    await self._announce()
                except Exception as exc:
                    log.debug("announce failed: %r", exc)
            if await self._wait_change(interval - at, restart=interval > ANNOUNCE_IMIN):
                interval = ANNOUNCE_IMIN
                continue
            interval = ANNOUNCE_IMIN if self._changed.is_set() else min(2 * interval, ANNOUNCE_IMAX)

    async def _wait_change(self, seconds: float, *, restart: bool) -> bool:
        """Wait ``seconds``; with ``restart``, end early when a change comes (True)."""
        if not restart:
            await trio.sleep(seconds)
            return False
        with trio.move_on_after(seconds):
            await self._changed.wait()
            return True
        return False

    async def _publish_loop(self) -> None:
        """Publish the chain after it changes (at most every 2 s). With Kubo, point the
        IPNS name at it at most once a minute, and republish the name hourly."""
        assert self.publisher is not None
        named: str | None = None
        named_at = -3600.0
        while True:
            with trio.move_on_after(60):
                await self._unpublished.wait()
            self._unpublished = trio.Event()
            try:
                chain = self.chain
                cid = await self.publisher.publish(chain)
                log.info("registry published: %s (%s)", cid, self.publisher.mode)
                if self.sinks is not None:
                    self.sinks.published(cid, chain.head)
                if self.ipfs is not None:
                    self.ipfs.published(self.publisher.recent)
                now = trio.current_time()
                due = (cid != named and now - named_at >= 60) or now - named_at >= 3600
                if self.publisher.kubo is not None and due:
                    name = await self.publisher.publish_name()
                    named, named_at = cid, now
                    log.info("IPNS name %s -> /ipfs/%s", name, cid)
            except Exception as exc:
                log.warning("publishing the registry failed: %s", exc)
            await trio.sleep(2)

    async def _heartbeat_loop(self) -> None:
        assert self.pubsub is not None and self.host is not None
        if self.config.role == "observer":
            return
        seq = 0
        while True:
            # Milliseconds since the epoch, so a restarted node's numbers carry on above
            # those its peers have seen (a counter from 0 would be dropped as a replay).
            seq = max(seq + 1, time.time_ns() // 1_000_000)
            try:
                data = heartbeat.make(
                    self.identity,
                    seq,
                    role=self.config.role,
                    models=self.models(),
                    addrs=self.addrs(),
                    load=self.load(),
                    meta=self.model_info(),
                    every=self.config.heartbeat_interval,
                    ledger=self.ledger() if self.ledger is not None else None,
                )
                await self.pubsub.publish(heartbeat.TOPIC, data)
            except Exception as exc:
                log.debug("heartbeat publish failed: %r", exc)
            await trio.sleep(self.config.heartbeat_interval)

    async def _renew_loop(self) -> None:
        if not self.registers:
            return
        while True:
            # Jittered: nodes started together would otherwise renew together for ever.
            await trio.sleep(self.config.record_ttl / 3 * random.uniform(0.8, 1.0))
            try:
                await self._append_own("renew")
            except Exception as exc:
                log.warning("renewal failed: %r", exc)

    async def _readdress_loop(self) -> None:
        """Renew our record when our addresses change (a relay reservation gained or
        lost), at most every 2 s: peers that only read the registry must dial what works."""
        found = getattr(self.host, "_dllm_reach", None)
        if not self.registers or found is None:
            return
        advertised = self.addrs()
        while True:
            await found.changed.wait()
            found.changed = trio.Event()
            if self.addrs() != advertised:
                advertised = self.addrs()
                try:
                    await self._append_own("renew")
                except Exception as exc:
                    log.warning("renewal with new addresses failed: %r", exc)
            await trio.sleep(2)

    async def _mesh_loop(self) -> None:
        """Keep gossip flowing with at least MESH_TARGET registered nodes, chosen at random
        among those we are not connected to: gossip spreads through them, so a network of
        thousands needs no full mesh (libp2p's connection manager prunes above its high
        watermark, see dllm_p2p.host)."""
        assert self.host is not None

        async def dial(peer: ID, addrs: list[str]) -> None:
            try:
                await reach.connect(self.host, peer, addrs, timeout=5)
            except Exception:
                pass

        while True:
            connected = connected_peers(self.host)
            if len(connected) > MESH_MAX:
                await self._hang_up_idle(connected)
            # Counted only where gossip flows: a connection whose pubsub stream failed to
            # open (10 s timeouts under load) carries nothing, and a node connected only
            # like that never heard from the network again.
            assert self.pubsub is not None
            missing = MESH_TARGET - len(connected & set(self.pubsub.peers))
            if missing > 0:
                candidates = [
                    (ID.from_base58(peer_id), record.get("addrs", []))
                    for peer_id, record in self.chain.nodes().items()
                    if peer_id != self.peer_id
                ]
                candidates = [(peer, addrs) for peer, addrs in candidates if peer not in connected]
                random.shuffle(candidates)
                async with trio.open_nursery() as nursery:
                    for peer, addrs in candidates[:missing]:
                        nursery.start_soon(dial, peer, addrs)
            await trio.sleep(max(1.0, self.config.heartbeat_interval))

    async def _hang_up_idle(self, connected: set[ID]) -> None:
        """Close connections dialed for a chain fetch, beyond MESH_MAX, once they carry
        only gossip and are not in our gossip mesh (nor a relay reservation). Keeping
        them made 50 relays a full mesh (2,500 sockets)."""
        assert self.host is not None and self.pubsub is not None
        network = self.host.get_network()
        for peer in [p for p in self._dialed_to_fetch if p not in connected]:
            del self._dialed_to_fetch[peer]
        meshed = set().union(*getattr(self.pubsub.router, "mesh", {}).values())
        idle = [
            peer for peer in self._dialed_to_fetch
            if peer not in meshed and not network.is_protected(peer) and all(
                stream.get_protocol() in IDLE_PROTOCOLS
                for conn in network.connections.get(peer, ()) for stream in conn.get_streams()
            )
        ]
        random.shuffle(idle)
        for peer in idle[: len(connected) - MESH_MAX]:
            with trio.move_on_after(2):
                try:
                    await self.host.disconnect(peer)
                    connected.discard(peer)
                    self._dialed_to_fetch.pop(peer, None)
                except Exception as exc:
                    log.debug("closing the idle connection to %s failed: %r", peer, exc)

    # --- liveness -----------------------------------------------------------------------

    def online(self, peer_id: str, now: float | None = None) -> bool:
        beat = self.last_seen.get(peer_id)
        now = time.time() if now is None else now
        return beat is not None and now - beat.seen_at <= beat.ttl(self.config.effective_ttl)


class _Pubsub(Pubsub):
    """py-libp2p's Pubsub catches stream and varint errors of a peer's RPCs but not a
    protobuf ``DecodeError``: one malformed RPC escaped the stream handler and stopped
    the whole node (seen with 50 relays on one machine). Any error of one peer's stream
    now ends that stream only, as upstream does for the errors it knows."""

    async def stream_handler(self, stream: INetStream) -> None:
        try:
            await super().stream_handler(stream)
        except Exception as exc:
            peer_id = stream.muxed_conn.peer_id
            log.debug("dropping the pubsub stream of %s: %r", peer_id, exc)
            await reset_quietly(stream)
            try:
                self._handle_dead_peer(peer_id)
            except Exception:
                pass


def record_spans(model_info: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ``spans`` of our registry record: the models we serve as a span of layers."""
    return {
        name: {"fingerprint": facts["fingerprint"], "span": list(facts["span"]), "layers": facts["layers"]}
        for name, facts in model_info.items()
        if facts.get("forward") and facts.get("fingerprint") and facts.get("span") and facts.get("layers")
    }


def _remember(memory: OrderedDict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """Set ``key`` as the newest entry of ``memory``, forgetting the oldest past ``limit``."""
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > limit:
        memory.popitem(last=False)


def deregistered(chain: Chain) -> set[str]:
    """Peers whose latest record in ``chain`` is a ``deregister``."""
    latest: dict[str, dict[str, Any]] = {}
    for record in chain.records:
        held = latest.get(record["peer_id"])
        if held is None or record["seq"] > held["seq"]:
            latest[record["peer_id"]] = record
    return {peer for peer, record in latest.items() if record["op"] == "deregister"}


@dataclass(frozen=True)
class Announcement:
    """A node's registry head, gossiped on REGISTRY_TOPIC, with where to fetch its chain
    and, optionally, its own latest record and its chain's checkpoint stamp (``at``):
    enough for a peer that held its previous head to reach this one with no fetch."""

    head: str
    addrs: list[str]
    record: dict[str, Any] | None = None
    at: int | None = None


def parse_announcement(data: bytes) -> Announcement:
    if len(data) > 8192:
        raise ValueError("announcement too large")
    try:
        message = msgpack.unpackb(data, raw=False)
    except Exception:
        raise ValueError("not msgpack") from None
    if not isinstance(message, dict) or not isinstance(message.get("head"), str):
        raise ValueError("no head")
    addrs = message.get("addrs", [])
    if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
        raise ValueError("bad addrs")
    record, at = message.get("record"), message.get("at")
    if record is not None and not isinstance(record, dict) or at is not None and (not isinstance(at, int) or isinstance(at, bool)):
        raise ValueError("bad record")
    return Announcement(message["head"], addrs[:16], record, at)


POW_FILE = "pow.json"


def proof_of_work(data_dir: Any, peer_id: str, bits: int) -> str:
    """This identity's proof of ``bits`` bits of work: from ``<data_dir>/pow.json`` when
    it holds one, else solved now (about a second at 20 bits) and saved. Blocking."""
    from pathlib import Path

    path = Path(data_dir).expanduser() / POW_FILE
    try:
        import json

        saved = json.loads(path.read_text())
        if saved.get("peer_id") == peer_id and pow_ok(peer_id, saved.get("nonce"), bits):
            return str(saved["nonce"])
    except (OSError, ValueError, AttributeError):
        pass
    started = time.perf_counter()
    nonce = solve_pow(peer_id, bits)
    log.info("proof of work of %d bits for %s in %.1f s", bits, peer_id, time.perf_counter() - started)
    try:
        write_json_atomic(path, {"peer_id": peer_id, "bits": bits, "nonce": nonce})
    except OSError as exc:
        log.warning("could not save the proof of work in %s: %s", path, exc)
    return nonce
