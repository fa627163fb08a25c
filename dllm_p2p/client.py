"""Talk to workers: dial, send one request frame, iterate the response frames.

Used by the CLI and the gateway. Connections are kept and reused: a Noise handshake costs
about 250 ms on py-libp2p. A request then needs a stream; its protocol proposal travels
with the request (``wire.multistream_proposal``). A long-running client (the gateway)
also asks workers to keep the stream open after the answer (``keep_alive``) and sends its
next request to that worker on it, which skips stream setup on both sides.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from . import answers, credits, reach, wire
from .host import end_quietly, make_host, parse_multiaddr, peer_info, reset_quietly
from .identity import Identity, generate

log = logging.getLogger("dllm_p2p.client")

#: Idle kept-alive streams are reused for this long: well inside the worker's own idle
#: limit (``wire.KEEP_ALIVE_IDLE``), so a reused stream is not one the worker is closing.
IDLE_REUSE_SECONDS = wire.KEEP_ALIVE_IDLE / 3
#: Seconds a countersignature may wait for our ledger to reach the disk.
RECEIPT_WRITE_TIMEOUT = 10.0
#: Idle streams kept per worker; more concurrent requests than this open new streams.
MAX_IDLE_PER_PEER = 8


class ClientError(Exception):
    """Base class for failures talking to a worker."""


class DialError(ClientError):
    """The worker could not be reached or refused the connection."""


class ProtocolError(ClientError):
    """The worker broke the wire protocol (bad frame, no final frame)."""


class WorkerError(ClientError):
    """The worker answered with an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(eq=False)
class _Idle:
    """A kept-alive generate stream between two requests."""

    stream: Any
    reader: wire.FrameReader
    since: float = field(default_factory=time.monotonic)


@functools.lru_cache(maxsize=1024)
def _peer_info(addr: str) -> Any:
    return peer_info(addr)  # parsing the multiaddr and its base58 peer id: ~0.3 ms


class Client:
    """A libp2p host used only to dial workers. Create with ``open_client()``.

    With ``keep_alive`` (for long-running clients such as the gateway) every request asks
    the worker to keep the stream open after its ``done`` frame, and the next request to
    that worker goes out on it: no new stream, no protocol negotiation.
    """

    def __init__(
        self, host: IHost, connect_timeout: float = 10.0, keep_alive: bool = False, verify_answers: bool = True,
        ledger: Any = None,
    ) -> None:
        self.host = host
        #: A ``LedgerService``: ask every worker for a receipt, countersign it, keep it.
        self.ledger = ledger
        #: Refuse a ``done`` frame unless the worker signed it, for this request and text.
        self.verify_answers = verify_answers
        self.connect_timeout = connect_timeout
        self.keep_alive = keep_alive
        self._locks: dict[ID, trio.Lock] = {}
        self._idle: dict[ID, list[_Idle]] = {}

    async def connect(self, addr: str) -> ID:
        """Dial ``addr`` (a multiaddr ending in /p2p/<id>) unless already connected."""
        try:
            info = _peer_info(addr)
        except Exception as exc:  # an address a peer gave us: any parse failure is its fault
            raise DialError(f"cannot dial {addr[:200]!r}: {exc}") from None
        lock = self._locks.setdefault(info.peer_id, trio.Lock())
        try:
            async with lock:  # one handshake per peer even when many requests start at once
                if self.host.get_network().get_connections(info.peer_id):
                    return info.peer_id
                try:
                    # Direct, or through the relay a /p2p-circuit address names.
                    await reach.connect(self.host, info.peer_id, [addr], self.connect_timeout)
                except Exception as exc:
                    raise DialError(f"cannot connect to {addr}: {exc}") from exc
            return info.peer_id
        finally:
            # Locks live only while someone dials: the table does not grow with every peer seen.
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(info.peer_id, None)

    async def connect_any(self, addrs: list[str], timeout: float | None = None) -> str:
        """Connect to the peer the ``addrs`` of one record name, trying them together
        (direct first, circuits a moment later); return one that names the peer."""
        if not addrs:
            raise DialError("no address to dial")
        try:
            info = _peer_info(addrs[0])
        except Exception as exc:
            raise DialError(f"cannot dial {addrs[0][:200]!r}: {exc}") from None
        try:
            await reach.connect(self.host, info.peer_id, addrs, timeout or self.connect_timeout)
        except Exception as exc:
            raise DialError(str(exc)) from exc
        return addrs[0]

    async def open_stream(self, addr: str, protocol: str) -> Any:
        """A stream negotiated the usual way (propose, wait for the echo), for raw use."""
        peer_id = await self.connect(addr)
        try:
            return await self.host.new_stream(peer_id, [TProtocol(protocol)])
        except Exception as exc:
            raise DialError(f"cannot open {protocol} to {addr}: {exc}") from exc

    async def generate(
        self, addr: str, request: wire.Request | dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield every response frame: ``token`` frames, then one ``done`` frame.

        An ``error`` frame raises ``WorkerError``. Leaving the iteration early resets the
        stream, which makes the worker stop generating; wrap the call in
        ``contextlib.aclosing`` so that happens at once and not when the generator is
        garbage-collected.
        """
        message = request.to_wire() if isinstance(request, wire.Request) else dict(request)
        if self.keep_alive:
            message["keep_alive"] = True
        if self.ledger is not None:
            message["receipt"] = True
        body = msgpack.packb(message, use_bin_type=True)
        payload = wire.frame_of(body)
        peer_id = await self.connect(addr)
        first: dict[str, Any] | None = None
        idle = self._take_idle(peer_id)
        if idle is not None:
            first = await self._first_answer_on(idle, payload)
        if first is not None and idle is not None:
            stream, reader = idle.stream, idle.reader
        else:
            # A receipt is countersigned on the stream: our side stays open until then.
            stream, reader = await self._open(
                addr, wire.GENERATE_PROTOCOL, payload, finish=not (self.keep_alive or self.ledger is not None)
            )
        finished = False
        try:
            while True:
                frame = first if first is not None else await _read_response(reader, addr)
                first = None
                kind = frame.get("type")
                if kind == "error":
                    finished = True
                    raise WorkerError(str(frame.get("code", "internal")), str(frame.get("message", "")))
                if kind == "done":
                    finished = True
                    frame.pop("credits", None)  # ours to say (below), never the worker's
                    if self.verify_answers:
                        try:
                            answers.check(frame.get("signature"), text=frame["text"], request_body=body, peer_id=peer_id.to_base58())
                        except answers.InvalidAnswer as exc:
                            raise ProtocolError(f"{addr} sent an answer whose signature does not hold: {exc}") from None
                    reusable = True
                    if self.ledger is not None and "receipt" in frame:
                        reusable = await self._countersign(frame, peer_id, stream, body)
                    if reusable and self.keep_alive and self._put_idle(peer_id, stream, reader):
                        stream = None  # kept for the next request: neither closed nor reset
                    yield frame
                    return
                yield frame
        finally:
            if stream is not None:
                if finished:
                    await _close_quietly(stream)
                else:
                    await reset_quietly(stream)

    async def _countersign(self, done: dict[str, Any], peer_id: ID, stream: Any, body: bytes) -> bool:
        """Check the worker's receipt, countersign it, keep it in our ledger and send the
        countersignature back; ``done["credits"]`` then says what the answer cost. A
        receipt we do not accept is left unsigned (and logged). Returns whether the
        stream may carry another request (not after a refusal: the worker still waits
        for a countersignature there)."""
        try:
            offer = credits.check_offer(
                done["receipt"], requester=self.ledger.peer_id, worker=peer_id.to_base58(), done=done,
                request_digest=answers.digest(body),
            )
            with trio.fail_after(RECEIPT_WRITE_TIMEOUT):
                reply = await self.ledger.countersign(offer)
        except credits.InvalidReceipt as exc:
            log.warning("not countersigning the receipt of %s: %s", peer_id, exc)
            return False
        except trio.TooSlowError:
            log.error("our ledger was not written within %g s: no countersignature sent", RECEIPT_WRITE_TIMEOUT)
            return False
        done["credits"] = {"amount_mc": offer["amount"], "params": offer["params"], "record": reply["record"]["seq"]}
        try:
            await stream.write(wire.encode_frame(reply))
        except Exception:
            return False
        return True

    def _take_idle(self, peer_id: ID) -> _Idle | None:
        """The most recently used idle stream to ``peer_id``, if it is fresh enough."""
        idle = self._idle.get(peer_id)
        if not idle:
            return None
        latest = idle.pop()
        if not idle:
            del self._idle[peer_id]  # no empty lists left behind for peers we no longer use
        if time.monotonic() - latest.since < IDLE_REUSE_SECONDS:
            return latest
        self._idle.pop(peer_id, None)  # the others are older still; the worker's idle limit closes them
        return None

    def _put_idle(self, peer_id: ID, stream: Any, reader: wire.FrameReader) -> bool:
        """Keep ``stream`` for the next request to ``peer_id``; False if enough are kept."""
        idle = self._idle.setdefault(peer_id, [])
        if len(idle) >= MAX_IDLE_PER_PEER:
            return False
        idle.append(_Idle(stream, reader))
        return True

    async def _first_answer_on(self, idle: _Idle, payload: bytes) -> dict[str, Any] | None:
        """Send ``payload`` on a kept stream and return the first answer frame, or None if
        the stream turned out to be gone (then the request goes out on a new stream).

        A worker ends a kept stream only while it waits for the next request, never after
        reading one without answering, so a stream that ends here did not carry the request.
        """
        try:
            await idle.stream.write(payload)
            return await _read_response(idle.reader, "")
        except Exception:
            await reset_quietly(idle.stream)
            return None
        except BaseException:  # cancelled: the stream is in an unknown state
            await reset_quietly(idle.stream)
            raise

    async def open_session(self, addr: str, protocol: str, payload: bytes, *, max_frame: int) -> tuple[Any, wire.FrameReader]:
        """A new stream speaking ``protocol`` with ``payload`` (the first request frame)
        sent with the proposal, our side left open for the frames that follow, and a
        reader that takes replies of up to ``max_frame`` bytes: a ``/dllm/forward``
        session, whose replies carry hidden states far larger than generate frames."""
        return await self._open(addr, protocol, payload, finish=False, max_frame=max_frame)

    async def _open(
        self, addr: str, protocol: str, payload: bytes = b"", *, finish: bool = True, max_frame: int = wire.MAX_RESPONSE_FRAME
    ) -> tuple[Any, wire.FrameReader]:
        """A new stream to ``addr`` speaking ``protocol``, with ``payload`` sent (and, with
        ``finish``, our side closed).

        The protocol proposal and the payload go out in one write (multistream-select's
        lazy negotiation, see ``wire.multistream_proposal``); the worker's two echo lines
        are checked before the first response frame is read from the returned reader.
        """
        peer_id = await self.connect(addr)
        try:
            stream = await self.host.get_network().new_stream(peer_id)
        except Exception as exc:
            raise DialError(f"cannot open a stream to {addr}: {exc}") from exc
        reader = wire.FrameReader(stream, max_frame)
        try:
            try:
                await stream.write(wire.multistream_proposal(protocol) + payload)
                if finish:
                    await stream.close_write()
            except Exception as exc:
                raise DialError(f"cannot send the request to {addr}: {exc}") from exc
            for expected in (wire.MULTISTREAM_PROTOCOL, protocol):
                try:
                    line = await reader.read_body()
                except Exception as exc:
                    raise DialError(f"cannot open {protocol} to {addr}: {exc!r}") from exc
                if line == b"na\n":
                    raise DialError(f"{addr} does not serve {protocol}")
                if line != expected.encode() + b"\n":
                    raise ProtocolError(f"{addr} answered {line!r} to the {protocol} proposal")
        except BaseException:
            await reset_quietly(stream)
            raise
        stream.set_protocol(TProtocol(protocol))
        return stream, reader

    async def complete(self, addr: str, request: wire.Request | dict[str, Any]) -> dict[str, Any]:
        """Send a request and return its ``done`` frame (token frames are dropped)."""
        async with aclosing(self.generate(addr, request)) as frames:
            async for frame in frames:
                if frame.get("type") == "done":
                    return frame
        raise ProtocolError("no final frame")  # unreachable: generate() raises first

    async def score(self, addr: str, scoring: wire.ScoreRequest) -> dict[str, Any]:
        """Ask the worker at ``addr`` to score tokens; the ``scores`` frame, checked.
        An error frame raises ``WorkerError``."""
        payload = wire.encode_frame(scoring.to_wire())
        await self.connect(addr)
        stream, reader = await self._open(addr, wire.SCORE_PROTOCOL, payload, finish=True)
        try:
            frame = await reader.read_frame()
        except Exception as exc:
            await reset_quietly(stream)
            raise ProtocolError(f"bad scores from {addr}: {exc}") from exc
        await _close_quietly(stream)
        if frame is None:
            raise ProtocolError(f"{addr} sent no scores")
        try:
            frame = wire.check_scores(frame, len(scoring.tokens))
        except wire.WireError as exc:
            raise ProtocolError(f"bad scores from {addr}: {exc}") from exc
        if frame["type"] == "error":
            raise WorkerError(frame["code"], frame["message"])
        return frame

    async def info(self, addr: str) -> dict[str, Any]:
        stream, reader = await self._open(addr, wire.INFO_PROTOCOL)
        try:
            frame = await reader.read_frame()
        except Exception as exc:
            raise ProtocolError(f"bad info frame from {addr}: {exc}") from exc
        finally:
            await _close_quietly(stream)
        if frame is None:
            raise ProtocolError(f"{addr} sent no info frame")
        return frame


async def _read_response(reader: wire.FrameReader, addr: str) -> dict[str, Any]:
    """The next response frame; a bad frame or a stream that ends first is a ProtocolError."""
    try:
        frame = await reader.read_frame()
    except wire.WireError as exc:
        raise ProtocolError(f"bad frame from {addr}: {exc}") from exc
    except Exception as exc:
        raise ProtocolError(f"stream from {addr} failed: {exc!r}") from exc
    if frame is None:
        raise ProtocolError(f"{addr} closed the stream without a final frame")
    try:
        return wire.check_response(frame)
    except wire.WireError as exc:
        raise ProtocolError(f"bad frame from {addr}: {exc}") from exc


async def _close_quietly(stream: Any) -> None:
    await end_quietly(stream.close)


@asynccontextmanager
async def open_client(
    identity: Identity | None = None,
    *,
    psk: str | None = None,
    listen: str = "/ip4/127.0.0.1/tcp/0",
    connect_timeout: float = 10.0,
    keep_alive: bool = False,
) -> AsyncIterator[Client]:
    """Start a dialing host for the duration of the block (``keep_alive``: see ``Client``)."""
    host = make_host(identity or generate(), psk=psk)
    async with host.run([parse_multiaddr(listen)]):
        yield Client(host, connect_timeout=connect_timeout, keep_alive=keep_alive)
