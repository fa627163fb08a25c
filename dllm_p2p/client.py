"""Talk to workers: dial, send one request frame, iterate the response frames.

Used by the CLI and the gateway. Connections are kept and reused: a Noise handshake costs
about 250 ms on py-libp2p, a new stream on an open connection about 5 ms.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from . import wire
from .host import make_host, parse_multiaddr, peer_info
from .identity import Identity, generate


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


class Client:
    """A libp2p host used only to dial workers. Create with ``open_client()``."""

    def __init__(self, host: IHost, connect_timeout: float = 10.0) -> None:
        self.host = host
        self.connect_timeout = connect_timeout
        self._locks: dict[ID, trio.Lock] = {}

    async def connect(self, addr: str) -> ID:
        """Dial ``addr`` (a multiaddr ending in /p2p/<id>) unless already connected."""
        info = peer_info(addr)
        lock = self._locks.setdefault(info.peer_id, trio.Lock())
        async with lock:  # one handshake per peer even when many requests start at once
            if self.host.get_network().get_connections(info.peer_id):
                return info.peer_id
            with trio.move_on_after(self.connect_timeout) as scope:
                try:
                    await self.host.connect(info)
                except Exception as exc:
                    raise DialError(f"cannot connect to {addr}: {exc}") from exc
            if scope.cancelled_caught:
                raise DialError(f"cannot connect to {addr}: timed out after {self.connect_timeout:g} s")
        return info.peer_id

    async def open_stream(self, addr: str, protocol: str) -> Any:
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
        stream = await self.open_stream(addr, wire.GENERATE_PROTOCOL)
        finished = False
        try:
            try:
                await stream.write(wire.encode_frame(message))
                await stream.close_write()
            except Exception as exc:
                raise DialError(f"cannot send the request to {addr}: {exc}") from exc
            reader = wire.FrameReader(stream, wire.MAX_RESPONSE_FRAME)
            while True:
                try:
                    frame = await reader.read_frame()
                except wire.WireError as exc:
                    raise ProtocolError(f"bad frame from {addr}: {exc}") from exc
                except Exception as exc:
                    raise ProtocolError(f"stream from {addr} failed: {exc!r}") from exc
                if frame is None:
                    raise ProtocolError(f"{addr} closed the stream without a final frame")
                kind = frame.get("type")
                if kind == "error":
                    finished = True
                    raise WorkerError(str(frame.get("code", "internal")), str(frame.get("message", "")))
                yield frame
                if kind == "done":
                    finished = True
                    return
        finally:
            if not finished:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await stream.reset()
                    except Exception:
                        pass
            else:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await stream.close()
                    except Exception:
                        pass

    async def complete(self, addr: str, request: wire.Request | dict[str, Any]) -> dict[str, Any]:
        """Send a request and return its ``done`` frame (token frames are dropped)."""
        async with aclosing(self.generate(addr, request)) as frames:
            async for frame in frames:
                if frame.get("type") == "done":
                    return frame
        raise ProtocolError("no final frame")  # unreachable: generate() raises first

    async def info(self, addr: str) -> dict[str, Any]:
        stream = await self.open_stream(addr, wire.INFO_PROTOCOL)
        try:
            frame = await wire.FrameReader(stream, wire.MAX_RESPONSE_FRAME).read_frame()
        except Exception as exc:
            raise ProtocolError(f"bad info frame from {addr}: {exc}") from exc
        finally:
            with trio.move_on_after(2):
                try:
                    await stream.close()
                except Exception:
                    pass
        if frame is None:
            raise ProtocolError(f"{addr} sent no info frame")
        return frame


@asynccontextmanager
async def open_client(
    identity: Identity | None = None,
    *,
    psk: str | None = None,
    listen: str = "/ip4/127.0.0.1/tcp/0",
    connect_timeout: float = 10.0,
) -> AsyncIterator[Client]:
    """Start a dialing host for the duration of the block."""
    host = make_host(identity or generate(), psk=psk)
    async with host.run([parse_multiaddr(listen)]):
        yield Client(host, connect_timeout=connect_timeout)
