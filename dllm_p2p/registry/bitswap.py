"""Bitswap for the registry: every node serves its publications' blocks, and fetches by CID.

Without a Kubo daemon a node's registry blocks live in its :class:`EmbeddedStore`. This
module makes them reachable over IPFS's block exchange, ``/ipfs/bitswap/1.2.0`` (also 1.1.0
and 1.0.0), so any IPFS node that can dial one of ours (Kubo, Helia, another dllm node)
can fetch ``<cid>/blockchain.json`` and check it by hash. It speaks the protocol as Kubo
and Helia do, which py-libp2p 0.8.1's own ``libp2p.bitswap`` does not (Helia fetched
nothing from it):

* Answers travel on a stream the *responder* opens to the requester, one per answer,
  closed after writing. Helia closes a wantlist stream for reading and aborts an idle
  accepted stream after 10 s, so writing blocks back on the wantlist's stream, or
  keeping one stream open for later answers, loses them.
* Every block carries its CID prefix (1.1.0+); for a CIDv0 that is ``00 70 12 20``
  (version 0, dag-pb, sha2-256, 32 bytes), not an empty prefix.
* A want for a block we do not hold is answered ``DONT_HAVE`` when the requester asks
  for it (1.2.0), so it can ask elsewhere at once instead of timing out.

The node does not keep other peers' wants: the registry is a few blocks, held whole or
not at all, so each wantlist is answered at once from what is in the store.

Fetching (:meth:`Bitswap.fetch_dag`) sends a wantlist for the blocks still missing to
each peer asked, waits for the answers that arrive on streams they open to us, checks
each block against its hash, stores it, and walks down the links until the whole DAG is
local; then the usual :func:`cat_dag` reads the file from the store.

Wire format: each message is a uvarint length then a protobuf ``bitswap.message.pb``
(py-libp2p's generated class), at most 4 MiB.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from libp2p.bitswap.pb.bitswap_pb2 import Message
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ..host import end_quietly, reset_quietly
from ..wire import FrameReader, frame_of
from .ipfs import (
    ContentError,
    ContentNotFound,
    EmbeddedStore,
    _b58decode,
    _b58encode,
    _decode_node,
    is_cid,
)

log = logging.getLogger("dllm_p2p.registry.bitswap")

PROTOCOL_120 = TProtocol("/ipfs/bitswap/1.2.0")
PROTOCOL_110 = TProtocol("/ipfs/bitswap/1.1.0")
PROTOCOL_100 = TProtocol("/ipfs/bitswap/1.0.0")
PROTOCOLS = (PROTOCOL_120, PROTOCOL_110, PROTOCOL_100)
#: The spec's limit on one message.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Blocks put into one answer before starting another (messages stay well under 4 MiB).
ANSWER_BYTES = 1024 * 1024
#: Wantlist entries looked at in one message; a registry is a handful of blocks.
MAX_ENTRIES = 1024
#: Answers being written at once, all peers together.
MAX_ANSWERING = 16
#: Longest we spend opening a stream to a requester and writing an answer.
ANSWER_TIMEOUT = 10.0
#: Blocks one fetch may bring; with 256 KiB chunks this bounds a file far above 16 MiB.
MAX_FETCH_BLOCKS = 1024

_DAG_PB = 0x70
_RAW = 0x55
_SHA2_256 = 0x12
_V0_PREFIX = bytes([0x00, _DAG_PB, _SHA2_256, 0x20])


class BitswapError(ContentError):
    """A fetch over bitswap failed: nobody had the block, or nobody answered in time."""


# --- CIDs in binary ---------------------------------------------------------------------


def _uvarint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(at, min(at + 9, len(data))):
        value |= (data[i] & 0x7F) << shift
        shift += 7
        if not data[i] & 0x80:
            return value, i + 1
    raise ValueError("bad varint")


def _encode_uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


@dataclass(frozen=True)
class WantedCid:
    """A CID as a requester sent it: what we look the block up by, and how to answer."""

    digest: bytes  #: the sha2-256 digest: blocks are stored (as CIDv0) by it
    prefix: bytes  #: the CID prefix to send with the block (version, codec, hash, length)
    raw: bytes  #: the CID's bytes, as the requester sent them

    @property
    def v0(self) -> str:
        return _b58encode(bytes([_SHA2_256, 32]) + self.digest)


def parse_binary_cid(raw: bytes) -> WantedCid:
    """A binary CIDv0 (a bare sha2-256 multihash) or CIDv1 (dag-pb or raw over sha2-256);
    ValueError for anything else (other hashes or codecs are not blocks we could hold)."""
    if len(raw) == 34 and raw[0] == _SHA2_256 and raw[1] == 32:
        return WantedCid(raw[2:], _V0_PREFIX, raw)
    version, at = _uvarint(raw, 0)
    if version != 1:
        raise ValueError(f"CID version {version}")
    codec, at = _uvarint(raw, at)
    if codec not in (_DAG_PB, _RAW):
        raise ValueError(f"codec 0x{codec:x}")
    if raw[at:at + 2] != bytes([_SHA2_256, 32]) or len(raw) != at + 34:
        raise ValueError("not a sha2-256 multihash")
    return WantedCid(raw[at + 2:], raw[:at] + bytes([_SHA2_256, 32]), raw)


def binary_cid(cid: str) -> bytes:
    """The binary form of one of our CIDv0 strings (``Qm...``)."""
    if not is_cid(cid):
        raise ValueError(f"{cid!r} is not a CIDv0")
    return _b58decode(cid)


# --- the exchange -----------------------------------------------------------------------


@dataclass
class _Want:
    """One block we are waiting for, and the peers that said they do not have it."""

    cid: str
    done: trio.Event = field(default_factory=trio.Event)
    block: bytes | None = None
    refused: set[ID] = field(default_factory=set)
    asked: set[ID] = field(default_factory=set)
    nobody: trio.Event = field(default_factory=trio.Event)


@dataclass
class BitswapStats:
    blocks_sent: int = 0
    bytes_sent: int = 0
    dont_have_sent: int = 0
    blocks_received: int = 0
    unwanted_received: int = 0
    bad_messages: int = 0


class Bitswap:
    """Serve the blocks of ``store`` to any peer, and fetch blocks by CID from peers.

    ``install()`` sets the stream handlers on ``host``; the object needs no task of its
    own (answers are written by the handler that read the wantlist)."""

    def __init__(self, host: Any, store: EmbeddedStore) -> None:
        self.host = host
        self.store = store
        self.stats = BitswapStats()
        self._wants: dict[bytes, _Want] = {}
        self._answering = trio.CapacityLimiter(MAX_ANSWERING)

    def install(self) -> None:
        for protocol in PROTOCOLS:
            self.host.set_stream_handler(protocol, self._handle)

    # --- serving ---

    async def _handle(self, stream: Any) -> None:
        """Read messages until the peer closes; never lets an error out (it would take
        the host down with it)."""
        try:
            peer = stream.muxed_conn.peer_id
            protocol = stream.get_protocol() or PROTOCOL_120
            reader = FrameReader(stream, MAX_MESSAGE_BYTES)
            while True:
                body = await reader.read_body()
                if body is None:
                    break
                try:
                    message = Message.FromString(body)
                except Exception as exc:
                    self.stats.bad_messages += 1
                    log.debug("bitswap: bad message from %s: %r", peer, exc)
                    break
                self._take_blocks(peer, message)
                answers = await trio.to_thread.run_sync(self._answers, protocol, message)
                for answer in answers:
                    await self._send(peer, protocol, answer)
            await end_quietly(stream.close)
        except Exception as exc:
            log.debug("bitswap stream ended: %r", exc)
            await reset_quietly(stream)

    def _answers(self, protocol: str, message: Message) -> list[Message]:
        """The messages that answer ``message``'s wantlist from the store (in a thread:
        it reads block files)."""
        answers: list[Message] = []
        current = Message()
        size = 0
        for entry in list(message.wantlist.entries)[:MAX_ENTRIES]:
            if entry.cancel:
                continue
            try:
                wanted = parse_binary_cid(entry.block)
                block = self.store.get_block(wanted.v0)
            except (ValueError, ContentError):
                block = None
            if block is not None and hashlib.sha256(block).digest() != wanted.digest:
                block = None  # a damaged file is not the block
            if protocol == PROTOCOL_100:
                if block is not None:
                    current.blocks.append(block)
            elif block is None:
                if entry.sendDontHave:
                    presence = current.blockPresences.add()
                    presence.cid = entry.block
                    presence.type = Message.DontHave
                    self.stats.dont_have_sent += 1
            elif entry.wantType == Message.Wantlist.Have:
                presence = current.blockPresences.add()
                presence.cid = entry.block
                presence.type = Message.Have
            else:
                payload = current.payload.add()
                payload.prefix = wanted.prefix
                payload.data = block
            if block is not None and entry.wantType != Message.Wantlist.Have:
                self.stats.blocks_sent += 1
                self.stats.bytes_sent += len(block)
                size += len(block)
            if size >= ANSWER_BYTES:
                answers.append(current)
                current, size = Message(), 0
        if current.ByteSize():
            answers.append(current)
        return answers

    async def _send(self, peer: ID, protocol: str, message: Message) -> None:
        """Write one message on a stream of our own to ``peer``, then close it."""
        async with self._answering:
            with trio.move_on_after(ANSWER_TIMEOUT) as scope:
                stream = None
                try:
                    stream = await self.host.new_stream(peer, [TProtocol(protocol)])
                    await stream.write(frame_of(message.SerializeToString()))
                    await stream.close()
                    return
                except Exception as exc:
                    log.debug("bitswap: could not send to %s: %r", peer, exc)
            if scope.cancelled_caught:
                log.debug("bitswap: sending to %s timed out", peer)
            if stream is not None:
                await reset_quietly(stream)

    # --- fetching ---

    def _take_blocks(self, peer: ID, message: Message) -> None:
        """Hand the blocks and DONT_HAVEs in ``message`` to whoever waits for them."""
        datas = [payload.data for payload in message.payload] + list(message.blocks)
        for data in datas:
            want = self._wants.get(hashlib.sha256(data).digest())
            if want is None or want.block is not None:
                self.stats.unwanted_received += 1
                continue
            want.block = data
            self.stats.blocks_received += 1
            want.done.set()
        for presence in message.blockPresences:
            if presence.type != Message.DontHave:
                continue
            try:
                want = self._wants.get(parse_binary_cid(presence.cid).digest)
            except ValueError:
                continue
            if want is not None:
                want.refused.add(peer)
                if want.asked and want.asked <= want.refused:
                    want.nobody.set()

    async def _ask(self, peer: ID, cids: Sequence[str]) -> None:
        """Send ``peer`` a wantlist for ``cids`` (blocks, with DONT_HAVE asked for)."""
        message = Message()
        for cid in cids:
            entry = message.wantlist.entries.add()
            entry.block = binary_cid(cid)
            entry.priority = 1
            entry.wantType = Message.Wantlist.Block
            entry.sendDontHave = True
        stream = None
        try:
            with trio.fail_after(ANSWER_TIMEOUT):
                stream = await self.host.new_stream(peer, list(PROTOCOLS))
                await stream.write(frame_of(message.SerializeToString()))
                await stream.close()
        except Exception as exc:
            log.debug("bitswap: could not ask %s: %r", peer, exc)
            for cid in cids:
                want = self._wants.get(binary_cid(cid)[2:])
                if want is not None:
                    want.refused.add(peer)
                    if want.asked <= want.refused:
                        want.nobody.set()
            if stream is not None:
                await reset_quietly(stream)

    async def get_blocks(self, cids: Iterable[str], peers: Sequence[ID], *, timeout: float = 20.0) -> dict[str, bytes]:
        """The blocks ``cids`` from whichever of ``peers`` has them, each checked against
        its hash. Raises :class:`BitswapError` when every peer said it does not have one,
        or when one has not come in ``timeout`` seconds."""
        cids = list(dict.fromkeys(cids))
        if not peers:
            raise BitswapError("no peer to ask for " + ", ".join(cids))
        wants: list[_Want] = []
        for cid in cids:
            digest = binary_cid(cid)[2:]
            want = self._wants.get(digest)
            if want is None:
                want = self._wants[digest] = _Want(cid)
            want.asked.update(peers)
            wants.append(want)
        try:
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(self._ask, peer, cids)
            with trio.move_on_after(timeout):
                for want in wants:
                    async with trio.open_nursery() as race:
                        race.start_soon(_first, want.done, race.cancel_scope)
                        race.start_soon(_first, want.nobody, race.cancel_scope)
                    if want.block is None:
                        raise BitswapError(f"none of {len(peers)} peer(s) has block {want.cid}")
            missing = [want.cid for want in wants if want.block is None]
            if missing:
                raise BitswapError(f"no answer within {timeout:g} s for block(s) {', '.join(missing)}")
            return {want.cid: want.block for want in wants if want.block is not None}
        finally:
            for want in wants:
                self._wants.pop(binary_cid(want.cid)[2:], None)

    async def fetch_dag(self, root: str, peers: Sequence[ID], *, timeout: float = 30.0) -> int:
        """Bring every block under ``root`` that the store lacks into it; returns how many
        blocks came. Walks level by level, asking for a whole level at once."""
        fetched = 0
        level = [root]
        with trio.fail_after(timeout):
            while level:
                missing = [cid for cid in level if not self.store.has(cid)]
                if fetched + len(missing) > MAX_FETCH_BLOCKS:
                    raise BitswapError(f"{root} has more than {MAX_FETCH_BLOCKS} blocks")
                if missing:
                    blocks = await self.get_blocks(missing, peers, timeout=timeout)
                    for cid, block in blocks.items():
                        await trio.to_thread.run_sync(self.store.put_block, cid, block)
                    fetched += len(blocks)
                nodes = await trio.to_thread.run_sync(partial(_links, self.store, level))
                level = list(dict.fromkeys(nodes))
        return fetched


async def _first(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _links(store: EmbeddedStore, cids: list[str]) -> list[str]:
    out: list[str] = []
    for cid in cids:
        try:
            out.extend(link.cid for link in _decode_node(cid, store.get_block(cid)).links)
        except ContentNotFound:
            raise BitswapError(f"block {cid} went missing from the store") from None
    return out
