"""In-process fake span workers speaking ``/dllm/forward/1.0.0`` over real py-libp2p hosts.

Each fake computes something trivial but stateful, so that a session's cache matters and a
replay that left out or misplaced a position would change the answer:

* the first span (``start == 0``) keeps a running sum of the token ids; row ``p`` of its
  hidden states is ``[sum mod M, p, 0, ...]``;
* a middle span keeps a running sum of column 0 of its inputs; row ``p`` is
  ``[sum mod M, p, 0, ...]`` (it checks column 1 is the position it expects);
* the last span does the same and picks ``token = (sum * 7 + 3) mod VOCAB`` from the last
  position, its text one letter, ``finish`` ``"length"`` at ``max_new_tokens`` and
  ``"stop"`` at ``stop_token`` (a token that completes a stop string: counted, with its
  text) or ``end_token`` (the model's end-of-text token: ``token`` null, no text).

Frames are checked with the worker's own parser (``wire.parse_forward``), so a client
frame the real worker would refuse fails here too.
"""

from __future__ import annotations

import array
from contextlib import AsyncExitStack, asynccontextmanager
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from dllm_p2p import wire
from dllm_p2p.host import host_addrs, make_host, parse_multiaddr
from dllm_p2p.identity import generate
from dllm_p2p.route import FORWARD_PROTOCOL, MAX_FORWARD_FRAME, Hop

FINGERPRINT = "sha256:" + "ab" * 32
M = 9973
VOCAB = 50


def tokenize(prompt: str) -> list[int]:
    return [ord(c) % VOCAB for c in prompt]


def letter(token: int) -> str:
    return chr(ord("a") + token % 26)


def expected_tokens(prompt: str, new: int, middles: int = 1, stop_token: int | None = None) -> list[int]:
    """What a route of first, ``middles`` middle and last fake spans generates."""
    tokens = tokenize(prompt)
    out: list[int] = []
    sums = [0] * (middles + 2)
    feed = tokens
    while True:
        last = 0
        for t in feed:
            sums[0] += t
            value = sums[0] % M
            for i in range(1, middles + 2):
                sums[i] += value
                value = sums[i] % M
            last = value
        token = (last * 7 + 3) % VOCAB
        out.append(token)
        if len(out) >= new or token == stop_token:
            return out
        feed = [token]


class FakeSpan:
    """One fake span worker. ``die_after``: forward frames served (over all sessions)
    before it misbehaves as ``fault`` says: ``reset`` the stream, ``hang`` (never
    answer), ``error`` (an error frame), ``garbage`` (a reply of the wrong shape)."""

    def __init__(
        self,
        start: int,
        end: int,
        *,
        layers: int = 3,
        width: int = 4,
        die_after: int | None = None,
        fault: str = "reset",
        stop_token: int | None = None,
        end_token: int | None = None,
        fingerprint: str = FINGERPRINT,
    ) -> None:
        self.start, self.end, self.layers, self.width = start, end, layers, width
        self.die_after, self.fault, self.stop_token, self.end_token = die_after, fault, stop_token, end_token
        self.fingerprint = fingerprint
        self.identity = generate()
        self.host = make_host(self.identity)
        self.host.set_stream_handler(TProtocol(FORWARD_PROTOCOL), self.handle)
        #: Every forward request received, parsed (``wire.ForwardRequest``), per session stream.
        self.sessions: list[list[wire.ForwardRequest]] = []
        self.forwards = 0
        self.closed_cleanly = 0
        self.ended = 0  # streams whose handler returned, however
        #: What went wrong in a session (a frame the worker's parser refused, a bad replay).
        self.errors: list[Exception] = []

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id.to_base58()

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.end == self.layers

    def meta(self, model: str = "tiny") -> dict[str, Any]:
        """What this span's heartbeat would say of its model."""
        return {model: {"fingerprint": self.fingerprint, "chat": False, "span": [self.start, self.end], "layers": self.layers, "hidden": self.width}}

    def hop(self, cost: float = 1.0) -> Hop:
        return Hop(self.peer_id, tuple(host_addrs(self.host)), self.start, self.end, self.fingerprint, self.layers, self.width, cost)

    async def handle(self, stream: Any) -> None:
        try:
            await self._serve(stream)
        except Exception as exc:
            self.errors.append(exc)
            await stream.reset()
        finally:
            self.ended += 1

    async def _serve(self, stream: Any) -> None:
        reader = wire.FrameReader(stream, MAX_FORWARD_FRAME)
        received: list[wire.ForwardRequest] = []
        opened = False
        length, total, generated, sample = 0, 0, 0, None
        while True:
            message = await reader.read_frame()
            if message is None:
                self.closed_cleanly += 1
                await stream.close()
                return
            request = wire.parse_forward(message, first=not opened)
            if request.tokenize is not None:
                asked = request.tokenize
                text = "".join(m["content"] for m in asked.messages) if asked.messages is not None else asked.prompt
                await stream.write(wire.encode_frame({"tokens": tokenize(text)}))
                continue
            if not opened:
                opened = True
                self.sessions.append(received)
                assert request.model == self.fingerprint and request.span == (self.start, self.end)
                assert request.start == 0
                if self.last:
                    assert request.sample is not None
                    sample = request.sample
                    generated = len(request.generated)
            received.append(request)
            assert request.start == length, (request.start, length)
            self.forwards += 1
            if self.die_after is not None and self.forwards > self.die_after:
                if self.fault == "hang":
                    await trio.sleep_forever()
                if self.fault == "error":
                    await stream.write(wire.encode_frame(wire.error_frame("busy", "fake span is full")))
                    await stream.close()
                    return
                if self.fault == "garbage":
                    await stream.write(wire.encode_frame({"hidden": {"dtype": "float32", "shape": [1, 1], "data": b"\0" * 4}, "length": 1}))
                    continue
                await stream.reset()
                return
            if self.first:
                assert request.tokens is not None
                values = list(request.tokens)
            else:
                assert request.hidden is not None and request.hidden.shape[1] == self.width
                rows = array.array("f")
                rows.frombytes(request.hidden.data)
                values = []
                for i in range(request.hidden.shape[0]):
                    assert rows[i * self.width + 1] == length + i, "rows arrived out of place"
                    values.append(int(rows[i * self.width]))
            out = array.array("f")
            value = 0
            for i, v in enumerate(values):
                total += v
                value = total % M
                out.extend([float(value), float(length + i)] + [0.0] * (self.width - 2))
            length += len(values)
            if not self.last:
                reply = {"hidden": {"dtype": "float32", "shape": [len(values), self.width], "data": out.tobytes()}, "length": length}
            else:
                assert sample is not None
                token = (value * 7 + 3) % VOCAB
                generated += 1
                finish = "stop" if token in (self.stop_token, self.end_token) else "length" if generated >= sample.max_new_tokens else None
                reply = {"token": token, "text": letter(token), "finish": finish, "length": length}
                if token == self.end_token:  # the model's end-of-text token: no text, and not part of the answer
                    reply.update(token=None, text="")
            await stream.write(wire.encode_frame(reply))


@asynccontextmanager
async def running(spans: Sequence[FakeSpan]) -> AsyncIterator[None]:
    """Listen on 127.0.0.1 with every fake span for the duration of the block."""
    async with AsyncExitStack() as stack:
        for span in spans:
            await stack.enter_async_context(span.host.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]))
        yield
