"""A node's credits on the network: its ledger, what it knows of its peers' ledgers, and
``/dllm/ledger/1.0.0``, which serves its ledger to anyone who wants to check a balance.

Every node that keeps a ledger (workers and gateways) runs one ``LedgerService``:

* its heartbeats carry ``ledger.summary()``; the summaries it hears are checked for forks
  (``PeerLedgers``), and the ledgers of peers whose head changed are fetched and verified
  (at most one fetch per peer per ``REFETCH_S``, a few at a time), so ``balance(peer)``
  is computed from receipts, not from what the peer says of itself;
* a worker orders its queue by ``priority(requester)`` and appends countersigned
  receipts with ``append``; a client countersigns with ``countersign``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from . import credits, wire
from .heartbeat import Heartbeat
from .host import reset_quietly
from .identity import Identity
from .registry.chain import DEFAULT_POW_BITS

log = logging.getLogger("dllm_p2p.ledger")

#: Seconds between two fetches of one peer's ledger.
REFETCH_S = 10.0
#: Ledger fetches at a time.
MAX_FETCHES = 4
#: Peers waiting for a fetch (others are dropped until their next heartbeat).
MAX_WANTED = 256
FETCH_TIMEOUT_S = 10.0


class LedgerService:
    def __init__(self, identity: Identity, data_dir: str | Path, pow_bits: int = DEFAULT_POW_BITS) -> None:
        self.identity = identity
        self.data_dir = data_dir
        #: The network's proof of work: what a peer's allowance costs it (docs/CREDITS.md).
        self.pow_bits = pow_bits
        self.peer_id = identity.peer_id.to_base58()
        self.ledger = credits.Ledger(data_dir, identity)
        self.peers = credits.PeerLedgers(data_dir)
        self._wanted: dict[str, tuple[list[str], str]] = {}
        #: Peers that asked us for work lately: whose balances we need (besides gateways').
        self._requesters: OrderedDict[str, None] = OrderedDict()
        self._fetched_at: dict[str, float] = {}
        self._wake = trio.Event()
        self._unsaved = trio.Event()
        self._flushed = trio.Event()
        #: Our ledger frame as last encoded, by the (seq, proof) it was made at.
        self._frame: tuple[tuple[int, Any], bytes] | None = None
        self.host: IHost | None = None

    # --- what heartbeats carry and bring ------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return self.ledger.summary()

    def on_heartbeat(self, beat: Heartbeat) -> None:
        if beat.ledger is None or beat.peer_id == self.peer_id:
            return
        if self.peers.take_summary(beat.peer_id, beat.ledger, beat.signed) is not None:
            self._unsaved.set()  # the write loop saves forks.json too: wake it now
        verified = self.peers.verified.get(beat.peer_id)
        # Fetched again when its head moved, or when it served no valid proof of work yet
        # (a node solves it after it starts): at most every REFETCH_S.
        # Only peers that asked us for work lately: a heartbeat costs nothing to send,
        # a ledger verification up to 600 signature checks.
        if (verified is None or verified[1] != beat.ledger["head"] or not verified[3]) and beat.addrs and (
            beat.peer_id in self._requesters
        ):
            if len(self._wanted) < MAX_WANTED or beat.peer_id in self._wanted:
                self._wanted[beat.peer_id] = (list(beat.addrs), beat.ledger["head"])
                self._wake.set()

    def note_requester(self, peer: str) -> None:
        """``peer`` asked us for work: keep its verified balance up to date."""
        self._requesters[peer] = None
        self._requesters.move_to_end(peer)
        while len(self._requesters) > MAX_WANTED:
            self._requesters.popitem(last=False)

    def priority(self, peer: str) -> int:
        """The peer's balance as we verified it (the allowance included when its proof of
        work holds); 0 for a peer we have not checked yet; the lowest there is for a fork."""
        balance = self.peers.balance(peer)
        return 0 if balance is None else balance

    def fork(self, peer: str) -> credits.Fork | None:
        return self.peers.forks.get(peer)

    # --- receipts ----------------------------------------------------------------------

    async def append(self, receipt: dict[str, Any]) -> dict[str, Any]:
        """Append a countersigned receipt to our ledger: in memory now (about 0.5 ms: two
        signatures checked, one made), on disk within moments (``_write_loop``). Raises
        ``DuplicateReceipt`` for a receipt we hold."""
        record = self.ledger.append(receipt, save=False)
        self._unsaved.set()
        return record

    async def durable(self, seq: int) -> None:
        """Wait until our ledger is on disk up to record ``seq``."""
        while self.ledger.durable_seq < seq:
            self._unsaved.set()
            await self._flushed.wait()

    async def countersign(self, receipt: dict[str, Any]) -> dict[str, Any]:
        """The requester's side: countersign a checked offer, append it, wait until it is
        on disk (the record goes to the worker: we must never sign another record with
        its number, even after a crash), and return what to send back:
        ``{"type": "countersign", "requester_sig", "record"}``."""
        full = credits.countersign(self.identity, receipt)
        record = await self.append(full)
        await self.durable(record["seq"])
        return {"type": "countersign", "requester_sig": full["requester_sig"], "record": record}

    def take_countersign(self, offer: dict[str, Any], frame: Any, requester: str) -> dict[str, Any]:
        """The worker's side: the receipt countersigned by ``frame``, checked, with the
        requester's own ledger record of it (kept: the requester must publish it, and a
        different record with its number is a fork). Raises ``InvalidReceipt``."""
        if not isinstance(frame, dict) or frame.get("type") != "countersign":
            raise credits.InvalidReceipt("expected a countersign frame")
        try:
            full = credits.check_receipt({**offer, "requester_sig": frame.get("requester_sig")})
            record = credits.check_record_signature(frame.get("record"), owner=requester)
            if record["kind"] != "receipt" or credits.receipt_id(credits.check_receipt(record["receipt"])) != credits.receipt_id(full):
                raise credits.InvalidReceipt("the requester's record holds another receipt")
        except credits.InvalidReceipt:
            raise
        except Exception as exc:  # anything else a peer's frame can raise is its fault too
            raise credits.InvalidReceipt(f"a malformed countersignature: {type(exc).__name__}") from None
        if self.peers.take_record(record, given=True) is not None:
            self._unsaved.set()
        return full

    # --- /dllm/ledger/1.0.0 ------------------------------------------------------------

    async def handle(self, stream: INetStream) -> None:
        """Serve our ledger: one frame, ``{"type": "ledger", "owner", "records"}``."""
        try:
            at = (self.ledger.seq, self.ledger.pow)
            if self._frame is None or self._frame[0] != at:  # encoded once per change (180 KB at most)
                frame = {"type": "ledger", "owner": self.peer_id, "records": self.ledger.snapshot(), "pow": self.ledger.pow}
                self._frame = (at, wire.encode_frame(frame))
            with trio.fail_after(FETCH_TIMEOUT_S):
                await stream.write(self._frame[1])
                await stream.close()
        except Exception as exc:  # never let a peer's stream kill the host
            log.debug("ledger stream failed: %r", exc)
            await reset_quietly(stream)

    async def fetch(self, client: Any, peer: str, addrs: list[str]) -> credits.Totals:
        """Fetch ``peer``'s ledger and verify it; raises on any failure."""
        # A requester is connected to us already (its requests came that way, perhaps
        # through a relay): ask on that connection, never dial a path of our own beside it.
        from libp2p.peer.id import ID

        if not client.host.get_network().get_connections(ID.from_base58(peer)):
            await client.connect_any(addrs)
        stream = await client.open_stream(addrs[0], wire.LEDGER_PROTOCOL)
        try:
            with trio.fail_after(FETCH_TIMEOUT_S):
                frame = await wire.FrameReader(stream, wire.MAX_RESPONSE_FRAME).read_frame()
        finally:
            await reset_quietly(stream)
        if not isinstance(frame, dict) or frame.get("owner") != peer or not isinstance(frame.get("records"), list):
            raise credits.InvalidLedger("not a ledger frame of this peer")
        if len(frame["records"]) > credits.CHECKPOINT_EVERY + 1:
            raise credits.InvalidLedger(f"{len(frame['records'])} records: a ledger holds at most {credits.CHECKPOINT_EVERY + 1} after a checkpoint")
        # 200 records take about 90 ms to verify (600 signatures): off the event loop. A
        # checkpoint's credit is the owner's word: only its debt counts.
        totals = await trio.to_thread.run_sync(
            functools.partial(credits.verify_records, frame["records"], peer, trust_checkpoint=False)
        )
        for record in frame["records"][-credits.CHECKPOINT_EVERY:]:
            if self.peers.take_record(record) is not None:
                self._unsaved.set()
        head = credits.record_hash(frame["records"][-1]) if frame["records"] else credits.GENESIS
        self.peers.set_verified(peer, totals, head, credits.allowance_holds(peer, frame.get("pow"), self.pow_bits))
        return totals

    async def run(self, host: IHost, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from .client import Client

        self.host = host
        host.set_stream_handler(TProtocol(wire.LEDGER_PROTOCOL), self.handle)
        client = Client(host, connect_timeout=FETCH_TIMEOUT_S)
        limit = trio.Semaphore(MAX_FETCHES)
        # Started before the proof of work: nothing else of the node may wait for it (a
        # peer that connects before our pubsub runs never gossips with us).
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            if self.ledger.pow is None or not credits.allowance_holds(self.peer_id, self.ledger.pow, self.pow_bits):
                from .membership import proof_of_work  # the registry's: solved once, kept in pow.json

                nonce = await trio.to_thread.run_sync(proof_of_work, self.data_dir, self.peer_id, self.pow_bits)
                self.ledger.set_pow({"bits": self.pow_bits, "nonce": nonce})
                self._unsaved.set()
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                now = time.monotonic()
                for peer, (addrs, head) in list(self._wanted.items()):
                    if now - self._fetched_at.get(peer, -REFETCH_S) < REFETCH_S:
                        continue
                    del self._wanted[peer]
                    self._fetched_at[peer] = now
                    nursery.start_soon(self._fetch_guarded, limit, client, peer, addrs)
                if self._wanted:
                    nursery.start_soon(self._wake_later, REFETCH_S / 2)
                if len(self._fetched_at) > 4 * MAX_WANTED:
                    self._fetched_at = {p: t for p, t in self._fetched_at.items() if now - t < REFETCH_S}

    async def _write_loop(self) -> None:
        """Write the ledger whenever receipts arrived: one write for all that came while
        the last one ran. On the way out (cancelled), what is left is written at once."""
        try:
            while True:
                if self.peers.forks_dirty:
                    try:
                        await trio.to_thread.run_sync(self.peers.save_forks)
                    except Exception as exc:  # evidence we cannot write must not stop the node
                        log.error("could not write forks.json: %r", exc)
                with trio.move_on_after(5 if self.peers.forks_dirty else 60):
                    await self._unsaved.wait()
                self._unsaved = trio.Event()
                try:
                    await trio.to_thread.run_sync(self.ledger.flush)
                except Exception as exc:  # a full disk, a bug: never stop writing later receipts
                    log.error("could not write %s: %r; retrying in 1 s", self.ledger.path, exc)
                    await trio.sleep(1)
                    self._unsaved.set()
                self._flushed.set()
                self._flushed = trio.Event()
        finally:
            if self.ledger.dirty:
                try:
                    self.ledger.flush()
                except OSError as exc:
                    log.error("could not write %s at exit: %s", self.ledger.path, exc)

    async def _wake_later(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self._wake.set()

    async def _fetch_guarded(self, limit: trio.Semaphore, client: Any, peer: str, addrs: list[str]) -> None:
        async with limit:
            try:
                totals = await self.fetch(client, peer, addrs)
                log.debug("ledger of %s verified: %s", peer, totals)
            except credits.InvalidLedger as exc:
                log.warning("the ledger of %s does not verify: %s", peer, exc)
            except Exception as exc:  # unreachable, slow, or gone: try at its next change
                log.debug("fetching the ledger of %s failed: %r", peer, exc)

    def peer_credits(self, peer: str) -> dict[str, Any] | None:
        """What we know of one peer's credits: its gossiped totals, the balance we verified."""
        summary = self.peers.summaries.get(peer)
        if summary is None:
            return None
        return {
            "earned_mc": summary["earned"], "spent_mc": summary["spent"], "seq": summary["seq"],
            "verified_balance_mc": self.peers.balance(peer), "forked": peer in self.peers.forks,
        }

    def brief(self) -> dict[str, Any]:
        """For the info frame: our totals, and the balances we verified lately (32 at most)."""
        verified = list(self.peers.verified.items())[-32:]
        return {
            **{f"{k}_mc" if k != "receipts" else k: v for k, v in self.ledger.totals.to_json().items()},
            "seq": self.ledger.seq, "verified_mc": {peer: self.peers.balance(peer) for peer, _ in verified},
            "forked": sorted(self.peers.forks)[:32],
        }

    def describe(self) -> dict[str, Any]:
        """For the page and the CLI: our totals and what we know of others."""
        peers = []
        for peer, summary in list(self.peers.summaries.items())[-256:]:
            peers.append({
                "peer_id": peer, "seq": summary["seq"], "earned": summary["earned"], "spent": summary["spent"],
                "verified_balance": self.peers.balance(peer),
                "forked": peer in self.peers.forks,
            })
        return {
            "peer_id": self.peer_id, "unit": "millicredits", **self.ledger.totals.to_json(), "seq": self.ledger.seq,
            "peers": peers, "forks": [f.to_json() for f in self.peers.forks.values()],
        }
