"""Generate through a route: a chain of spans of one model, planned and driven by the client.

A span worker holds decoder layers ``start..end-1`` of a model and serves them over
``/dllm/forward/1.0.0`` (docs/PROTOCOL.md). A *route* is a chain of such spans, all of
one model fingerprint, that covers every layer. This module

* plans the cheapest route from what the network offers (``plan_route``: Dijkstra over
  layer boundaries, as Petals routes by measured latency), and
* drives one generation through it (``generate_route``): the prompt's tokens into the
  first span, each span's hidden states into the next, the last span's token back into
  the first, one stream (one session) per span. When a span fails mid-answer, another
  peer serving the same layers takes over: it gets every input the failed one had, from
  position 0, and the answer goes on as if nothing happened. That is why the driver keeps
  each hop's inputs: token ids for the first, the raw bytes of the hidden states it sent
  for the others (row-major ``[T, hidden]``, so a history is their concatenation).

No torch here: the client never computes, it only moves bytes, so the gateway and
``dllm_p2p query`` can drive routes without a model.
"""

from __future__ import annotations

import heapq
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from . import wire
from .client import Client, ClientError
from .host import end_quietly, reset_quietly

FORWARD_PROTOCOL: str = getattr(wire, "FORWARD_PROTOCOL", "/dllm/forward/1.0.0")
#: Largest forward request frame a span reads (and the largest reply we read).
MAX_FORWARD_FRAME: int = getattr(wire, "MAX_FORWARD_FRAME", 8 * 2**20)
#: New positions one forward frame may hold.
MAX_FORWARD_POSITIONS: int = getattr(wire, "MAX_FORWARD_POSITIONS", 4096)
#: Hidden states per frame we send to a span that is not the last: long prompts go in
#: chunks, so one frame never holds a span (and every session it batches) for long.
HIDDEN_CHUNK_BYTES = 2 * 2**20
#: Room in a frame for everything but the hidden states (keys, ``generated``, ``sample``).
FRAME_SLACK = 64 * 1024
#: Bytes per value of the dtypes hidden states travel in.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: Cost added per hop when planning, in the units of ``Hop.cost`` (ms for a typical
#: answer): a hop costs a network round trip per token, so of two chains with the same
#: compute the shorter wins.
HOP_COST = 100.0
#: ``max_new_tokens`` when the request leaves it out (as a full worker's default).
DEFAULT_MAX_NEW_TOKENS = 64
#: Hidden width assumed to size the first span's chunks when no heartbeat said it.
_WIDTH_GUESS = 8192
#: Longest text one reply of the last span may carry, and most prompt tokens accepted.
_MAX_TEXT = 1 << 20
_MAX_PROMPT_TOKENS = 1 << 20
_FINISHES = (None, "stop", "length")


class RouteError(Exception):
    """A generation through a route failed; ``code`` is one of ``wire.ERROR_CODES``,
    ``no_live_node`` (no route) or ``node_failed`` (spans failed, replacements ran out)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Hop:
    """A peer serving layers ``start..end-1`` of the model ``fingerprint`` (of ``layers``
    in all): a candidate for a route, and a step of a planned one. ``cost`` is what
    routing minimizes, lower is better (the gateway: expected ms for a typical answer)."""

    peer_id: str
    addrs: tuple[str, ...]
    start: int
    end: int
    fingerprint: str
    layers: int
    hidden: int | None = None
    cost: float = 1.0

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.end)

    def describe(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "span": [self.start, self.end]}


# --- planning -------------------------------------------------------------------------------


def plan_route(candidates: Iterable[Hop], total_layers: int, *, hop_cost: float = HOP_COST, exclude: Iterable[str] = ()) -> list[Hop]:
    """The cheapest chain of spans of one fingerprint covering layers ``0..total_layers``,
    or ``[]`` when no fingerprint's spans cover them all.

    Spans are exact: a hop from layer boundary ``b`` must start at ``b`` (a span that
    holds more layers than needed is not cut short). That keeps a session's inputs
    meaningful to any replacement with the same span, and routing a shortest path.
    Each fingerprint is planned on its own; the cheapest complete chain wins.
    """
    excluded = set(exclude)
    groups: dict[str, list[Hop]] = {}
    for hop in candidates:
        if hop.peer_id not in excluded and hop.layers == total_layers and 0 <= hop.start < hop.end <= total_layers:
            groups.setdefault(hop.fingerprint, []).append(hop)
    best: list[Hop] = []
    best_cost = float("inf")
    for fingerprint in sorted(groups):
        path, cost = _cheapest_chain(groups[fingerprint], total_layers, hop_cost)
        if path and cost < best_cost:
            best, best_cost = path, cost
    return best


def plan_best(candidates: Iterable[Hop], *, hop_cost: float = HOP_COST, exclude: Iterable[str] = ()) -> list[Hop]:
    """``plan_route`` for whatever layer count the candidates say their model has."""
    candidates = list(candidates)
    routes = [plan_route(candidates, layers, hop_cost=hop_cost, exclude=exclude) for layers in sorted({c.layers for c in candidates})]
    routes = [r for r in routes if r]
    return min(routes, key=lambda r: route_cost(r, hop_cost), default=[])


def route_cost(route: Sequence[Hop], hop_cost: float = HOP_COST) -> float:
    return sum(max(0.0, hop.cost) + hop_cost for hop in route)


def _cheapest_chain(hops: list[Hop], total: int, hop_cost: float) -> tuple[list[Hop], float]:
    """Dijkstra from boundary 0 to ``total``; each hop is an edge ``start -> end``."""
    leaving: dict[int, list[Hop]] = {}
    for hop in sorted(hops, key=lambda h: (h.cost, h.peer_id)):  # ties: the same choice every time
        leaving.setdefault(hop.start, []).append(hop)
    best = {0: 0.0}
    came_by: dict[int, Hop] = {}
    queue = [(0.0, 0)]
    while queue:
        cost, boundary = heapq.heappop(queue)
        if boundary == total:
            break
        if cost > best.get(boundary, float("inf")):
            continue
        for hop in leaving.get(boundary, ()):
            reached = cost + max(0.0, hop.cost) + hop_cost
            if reached < best.get(hop.end, float("inf")):
                best[hop.end] = reached
                came_by[hop.end] = hop
                heapq.heappush(queue, (reached, hop.end))
    if total not in came_by:
        return [], float("inf")
    path, boundary = [], total
    while boundary != 0:
        hop = came_by[boundary]
        path.append(hop)
        boundary = hop.start
    return path[::-1], best[total]


def replacement(candidates: Iterable[Hop], hop: Hop, exclude: Iterable[str] = ()) -> Hop | None:
    """The cheapest other peer serving exactly ``hop``'s layers of its fingerprint."""
    excluded = set(exclude) | {hop.peer_id}
    spares = [
        c for c in candidates
        if c.span == hop.span and c.fingerprint == hop.fingerprint and c.layers == hop.layers and c.peer_id not in excluded
    ]
    return min(spares, key=lambda c: (c.cost, c.peer_id), default=None)


# --- what travels: token ids or hidden states -----------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """New positions for one span: token ids (the first span) or ``rows`` hidden states
    of ``width`` values in ``dtype``, row-major little-endian bytes (the others)."""

    rows: int
    tokens: tuple[int, ...] | None = None
    data: bytes = b""
    width: int = 0
    dtype: str = "float32"

    @property
    def row_bytes(self) -> int:
        return self.width * DTYPE_BYTES[self.dtype]

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.tokens is None else 5 * self.rows

    def to_wire(self) -> dict[str, Any]:
        if self.tokens is not None:
            return {"tokens": list(self.tokens)}
        return {"hidden": {"dtype": self.dtype, "shape": [self.rows, self.width], "data": self.data}}

    def rows_slice(self, begin: int, end: int) -> _Chunk:
        if self.tokens is not None:
            return _Chunk(end - begin, tokens=self.tokens[begin:end])
        rb = self.row_bytes
        return replace(self, rows=end - begin, data=self.data[begin * rb : end * rb])

    def split(self, limit: int) -> list[_Chunk]:
        return [self.rows_slice(i, min(i + limit, self.rows)) for i in range(0, self.rows, max(1, limit))]


def _concat(chunks: Sequence[_Chunk]) -> _Chunk:
    first = chunks[0]
    if first.tokens is not None:
        return _Chunk(sum(c.rows for c in chunks), tokens=tuple(t for c in chunks for t in c.tokens or ()))
    return replace(first, rows=sum(c.rows for c in chunks), data=b"".join(c.data for c in chunks))


class _HopFailed(Exception):
    """One span failed (reset, EOF, timeout, error frame, a reply that breaks the protocol)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class _HopSession:
    """One hop of a generation: the peer's stream and every input it was sent."""

    hop: Hop
    first: bool
    last: bool
    stream: Any = None
    reader: wire.FrameReader | None = None
    opened: bool = False  # a first forward frame went out on this stream
    history: list[_Chunk] = field(default_factory=list)
    length: int = 0  # positions the peer holds: the rows of ``history``
    prefill_s: float = 0.0
    steps: int = 0
    step_s: float = 0.0

    def remember(self, chunk: _Chunk) -> None:
        self.history.append(chunk)
        self.length += chunk.rows


@dataclass
class RouteResult:
    """The end of a generation through a route (what a ``done`` frame says of a full
    worker's answer, plus ``route``: the hops that served the end of the answer)."""

    text: str
    finish_reason: str
    tokens: list[int]
    fingerprint: str
    usage: dict[str, int]
    timing: dict[str, Any]
    route: list[dict[str, Any]]
    #: Spans replaced mid-answer, and the peers that failed.
    replacements: int = 0
    failed: list[str] = field(default_factory=list)


#: ``(hop, prefill_ms, decode_steps, decode_s)`` for each hop of a finished answer.
OnSuccess = Callable[[Hop, float, int, float], None]
#: ``(hop, code, message)`` for each span that failed.
OnFailure = Callable[[Hop, str, str], None]


def generate_route(
    client: Client,
    request: wire.Request,
    route: Sequence[Hop],
    *,
    candidates: Iterable[Hop] | Callable[[], Iterable[Hop]] = (),
    max_replacements: int = 3,
    step_timeout: float = 60.0,
    dial_timeout: float = 10.0,
    wire_dtype: str = "float32",
    on_success: OnSuccess | None = None,
    on_failure: OnFailure | None = None,
) -> AsyncIterator[str | RouteResult]:
    """Generate ``request`` through ``route``: yield text pieces as the last span makes
    them, then one ``RouteResult``; raise ``RouteError`` when it cannot go on.

    ``candidates`` (a list, or a callable asked at each failure) holds the spare spans:
    a failed hop is replaced by the cheapest other peer with its span and fingerprint,
    at most ``max_replacements`` times per generation. ``step_timeout`` bounds each
    reply. Wrap the iteration in ``contextlib.aclosing``: leaving it early resets the
    streams, which frees the sessions on the spans at once.
    """
    return _RouteGeneration(
        client, request, route, candidates=candidates, max_replacements=max_replacements, step_timeout=step_timeout,
        dial_timeout=dial_timeout, wire_dtype=wire_dtype, on_success=on_success, on_failure=on_failure,
    ).run()


class _RouteGeneration:
    def __init__(
        self,
        client: Client,
        request: wire.Request,
        route: Sequence[Hop],
        *,
        candidates: Iterable[Hop] | Callable[[], Iterable[Hop]],
        max_replacements: int,
        step_timeout: float,
        dial_timeout: float,
        wire_dtype: str,
        on_success: OnSuccess | None,
        on_failure: OnFailure | None,
    ) -> None:
        if not route:
            raise RouteError("no_live_node", "no route: no chain of spans covers the model's layers")
        if wire_dtype not in DTYPE_BYTES:
            raise ValueError(f"wire_dtype must be one of {', '.join(DTYPE_BYTES)}")
        self.client = client
        self.request = request
        self.hops = [_HopSession(hop, i == 0, i == len(route) - 1) for i, hop in enumerate(route)]
        self.fingerprint = route[0].fingerprint
        self._candidates = candidates
        self.max_replacements = max_replacements
        self.step_timeout = step_timeout
        self.dial_timeout = dial_timeout
        self.wire_dtype = wire_dtype
        self.on_success = on_success
        self.on_failure = on_failure
        self.session = secrets.token_hex(8)
        self.max_new_tokens = request.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        self.max_length = 0
        self.tokens: list[int] = []
        self.replacements = 0
        self.failed: list[str] = []
        # Sampling without a seed: pick one here, so a replacement last span draws the
        # tokens the failed one would have (the span seeds token n from seed and n).
        self.seed = request.seed if request.seed is not None or request.temperature == 0 else secrets.randbits(62)
        known = next((h.hidden for h in route if h.hidden), None)
        #: The hidden width, to size the first span's frames (a guess when no heartbeat said).
        self.width = known or _WIDTH_GUESS
        self._width_known = known is not None

    # --- the generation --------------------------------------------------------------------

    async def run(self) -> AsyncIterator[str | RouteResult]:
        started = time.perf_counter()
        try:
            prompt = await self._tokenize()
            tokenized = time.perf_counter()
            self.max_length = len(prompt) + self.max_new_tokens
            self._check_prompt_fits(len(prompt))
            reply = await self._push(_Chunk(len(prompt), tokens=tuple(prompt)), prefill=True)
            first_token = time.perf_counter()
            text: list[str] = []
            while True:
                token, piece, finish = reply["token"], reply["text"], reply["finish"]
                if token is not None:  # None: the model's end-of-text token, not part of the answer
                    self.tokens.append(token)
                if piece:
                    text.append(piece)
                    yield piece
                if finish is None and len(self.tokens) >= self.max_new_tokens:
                    finish = "length"  # a last span that does not count: we do
                if finish is not None:
                    break
                reply = await self._push(_Chunk(1, tokens=(token,)))
            done = time.perf_counter()
            result = RouteResult(
                text="".join(text),
                finish_reason=finish,
                tokens=list(self.tokens),
                fingerprint=self.fingerprint,
                usage={"prompt_tokens": len(prompt), "completion_tokens": len(self.tokens)},
                timing={
                    "tokenize_ms": round((tokenized - started) * 1000, 2),
                    "first_token_ms": round((first_token - started) * 1000, 2),
                    "total_ms": round((done - started) * 1000, 2),
                    "hops_ms": [round(self._ms_per_step(hs), 2) for hs in self.hops],
                    "prefill_ms": [round(hs.prefill_s * 1000, 2) for hs in self.hops],
                },
                route=[hs.hop.describe() for hs in self.hops],
                replacements=self.replacements,
                failed=list(self.failed),
            )
            # Before the result goes out: a consumer may stop iterating once it has it.
            await self._close(finished=True)
            self._report_success()
            yield result
        finally:
            await self._close(finished=False)

    async def _close(self, *, finished: bool) -> None:
        """End every session: closing our side frees the span's cache; a reset when the
        generation failed or was abandoned (the span stops whatever it was doing)."""
        for hs in self.hops:
            if hs.stream is not None:
                stream, hs.stream = hs.stream, None
                await end_quietly(stream.close if finished else stream.reset)

    @staticmethod
    def _ms_per_step(hs: _HopSession) -> float:
        return hs.step_s * 1000 / hs.steps if hs.steps else hs.prefill_s * 1000

    def _report_success(self) -> None:
        if self.on_success is None:
            return
        for hs in self.hops:
            try:
                self.on_success(hs.hop, hs.prefill_s * 1000, hs.steps, hs.step_s)
            except Exception:  # bookkeeping must not fail an answer
                pass

    # --- tokenize on the first span ----------------------------------------------------------

    async def _tokenize(self) -> list[int]:
        request = self.request
        text = {"messages": [dict(m) for m in request.messages]} if request.messages is not None else {"prompt": request.prompt}
        message = {"session": self.session, "tokenize": text}
        hs = self.hops[0]
        while True:
            try:
                frame = await self._exchange(hs, message)
                return self._check_tokens(frame)
            except _HopFailed as exc:
                if exc.code == "too_large":  # the prompt is over the model's context: anywhere
                    raise RouteError("too_large", exc.message) from None
                await self._replace(hs, exc)

    @staticmethod
    def _check_tokens(frame: dict[str, Any]) -> list[int]:
        tokens = frame.get("tokens")
        if not isinstance(tokens, list) or len(tokens) > _MAX_PROMPT_TOKENS or not all(_whole(t) and 0 <= t < 2**31 for t in tokens):
            raise _HopFailed("bad_reply", "the tokenize reply is not a list of token ids")
        if not tokens:
            raise RouteError("bad_request", "the prompt has no tokens")
        return tokens

    # --- one step through every hop ----------------------------------------------------------

    async def _push(self, chunk: _Chunk, *, prefill: bool = False) -> dict[str, Any]:
        """Run ``chunk`` (token ids) through every hop; the last hop's reply."""
        pieces = chunk.split(self._rows_per_frame(self.width))
        for hs in self.hops:
            began = time.perf_counter()
            if hs.last:
                reply = await self._forward(hs, self._one_frame(_concat(pieces), hs, replay=False))
            else:
                pieces = [_hidden_of(await self._forward(hs, piece), self.wire_dtype) for piece in pieces]
            spent = time.perf_counter() - began
            if prefill:
                hs.prefill_s += spent
            else:
                hs.steps += 1
                hs.step_s += spent
        return reply

    def _rows_per_frame(self, width: int) -> int:
        """Positions per frame so that a frame's hidden states stay within HIDDEN_CHUNK_BYTES."""
        return max(1, min(MAX_FORWARD_POSITIONS, HIDDEN_CHUNK_BYTES // (width * DTYPE_BYTES[self.wire_dtype])))

    def _check_prompt_fits(self, rows: int) -> None:
        """Refuse a prompt the last span could not take in one frame before any span works
        on it (when the heartbeats said how wide the hidden states are)."""
        last = self.hops[-1]
        if last.first:
            self._one_frame(_Chunk(rows, tokens=(0,) * rows), last, replay=False)
        elif self._width_known:
            self._one_frame(_Chunk(rows, data=b"", width=self.width, dtype=self.wire_dtype), last, replay=False, nbytes=rows * self.width * DTYPE_BYTES[self.wire_dtype])

    def _one_frame(self, chunk: _Chunk, hs: _HopSession, *, replay: bool, nbytes: int | None = None) -> _Chunk:
        """The last span samples a token for every frame it gets, so all its new positions
        must travel in one frame: refuse what cannot."""
        if chunk.rows > MAX_FORWARD_POSITIONS or (chunk.nbytes if nbytes is None else nbytes) > MAX_FORWARD_FRAME - FRAME_SLACK:
            what = f"replaying {chunk.rows} positions to a new span {hs.hop.start}:{hs.hop.end}" if replay else f"a prompt of {chunk.rows} tokens"
            raise RouteError(
                "too_large" if not replay else "node_failed",
                f"{what} does not fit one forward frame (at most {MAX_FORWARD_POSITIONS} positions and "
                f"{MAX_FORWARD_FRAME // 2**20} MiB), which the last span of a route needs",
            )
        return chunk

    async def _forward(self, hs: _HopSession, chunk: _Chunk) -> dict[str, Any]:
        """Send ``chunk`` to ``hs``; on failure, replay to a replacement. The reply."""
        try:
            reply = await self._exchange(hs, self._forward_message(hs, hs.length, chunk), rows=chunk.rows)
        except _HopFailed as exc:
            reply = await self._failover(hs, chunk, exc)
        hs.remember(chunk)
        return reply

    def _forward_message(self, hs: _HopSession, start: int, chunk: _Chunk) -> dict[str, Any]:
        message: dict[str, Any] = {"session": self.session, "start": start, **chunk.to_wire()}
        if not hs.opened:
            message.update(model=self.fingerprint, span=[hs.hop.start, hs.hop.end], max_length=self.max_length, wire_dtype=self.wire_dtype)
            if hs.last:
                message["sample"] = self._sample()
                if self.tokens:
                    message["generated"] = list(self.tokens)
        return message

    def _sample(self) -> dict[str, Any]:
        r = self.request
        sample: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": r.temperature}
        if r.top_p != 1.0:
            sample["top_p"] = r.top_p
        if r.top_k:
            sample["top_k"] = r.top_k
        if self.seed is not None:
            sample["seed"] = self.seed
        if r.min_new_tokens:
            sample["min_new_tokens"] = r.min_new_tokens
        if r.stop:
            sample["stop"] = list(r.stop)
        return sample

    # --- failover ----------------------------------------------------------------------------

    async def _failover(self, hs: _HopSession, chunk: _Chunk, failure: _HopFailed) -> dict[str, Any]:
        """Replace ``hs``'s peer and replay its whole input, ``chunk`` included; the reply
        for ``chunk`` (for a span before the last: the hidden states of its rows only)."""
        while True:
            await self._replace(hs, failure)
            try:
                return await self._replay(hs, chunk)
            except _HopFailed as exc:
                failure = exc

    async def _replace(self, hs: _HopSession, failure: _HopFailed) -> None:
        """Give up on ``hs``'s peer; move ``hs`` to another peer with its span (not yet dialed)."""
        failed = hs.hop
        self.failed.append(failed.peer_id)
        if self.on_failure is not None:
            try:
                self.on_failure(failed, failure.code, failure.message)
            except Exception:
                pass
        if hs.stream is not None:
            await reset_quietly(hs.stream)
        hs.stream, hs.reader, hs.opened = None, None, False
        where = f"span {failed.start}:{failed.end} on {failed.peer_id[:16]}…"
        if self.replacements >= self.max_replacements:
            raise RouteError(
                "too_large" if failure.code == "too_large" else "node_failed",
                f"{where} failed ({failure}); gave up after {self.replacements} replacement(s)",
            )
        candidates = self._candidates() if callable(self._candidates) else self._candidates
        spare = replacement(candidates, failed, exclude=self.failed)
        if spare is None:
            raise RouteError(
                "too_large" if failure.code == "too_large" else "node_failed",
                f"{where} failed ({failure}) and no other peer serves those layers",
            )
        self.replacements += 1
        hs.hop = spare
        hs.prefill_s = hs.step_s = 0.0
        hs.steps = 0

    async def _replay(self, hs: _HopSession, chunk: _Chunk) -> dict[str, Any]:
        everything = _concat([*hs.history, chunk])
        if hs.last:
            return await self._exchange(hs, self._forward_message(hs, 0, self._one_frame(everything, hs, replay=True)), rows=everything.rows)
        # Before the last span: frames of at most a chunk each, the last one ending with
        # ``chunk`` whole, so its reply holds the rows the next hop is waiting for.
        limit = max(chunk.rows, self._rows_per_frame(everything.width or self.width))
        tail = everything.rows - min(everything.rows, limit)
        frames = everything.rows_slice(0, tail).split(limit) if tail else []
        frames.append(everything.rows_slice(tail, everything.rows))
        start = 0
        reply: dict[str, Any] = {}
        for frame in frames:
            reply = await self._exchange(hs, self._forward_message(hs, start, frame), rows=frame.rows)
            start += frame.rows
        hidden = _hidden_of(reply, self.wire_dtype)
        keep = hidden.rows_slice(hidden.rows - chunk.rows, hidden.rows)
        return {**reply, "hidden": keep.to_wire()["hidden"], "length": start}

    # --- one frame out, one frame back -------------------------------------------------------

    async def _exchange(self, hs: _HopSession, message: dict[str, Any], *, rows: int = 0) -> dict[str, Any]:
        """Send ``message`` on ``hs``'s stream (opening it first) and read the reply,
        within ``step_timeout``; any failure of the peer raises ``_HopFailed``."""
        payload = wire.encode_frame(message)
        addr = await self._dial(hs.hop) if hs.stream is None else ""
        with trio.move_on_after(self.step_timeout) as deadline:
            try:
                if hs.stream is None:
                    hs.stream, hs.reader = await self.client.open_session(
                        addr, FORWARD_PROTOCOL, payload, max_frame=MAX_FORWARD_FRAME + FRAME_SLACK
                    )
                else:
                    await hs.stream.write(payload)
                assert hs.reader is not None
                frame = await hs.reader.read_frame()
            except wire.WireError as exc:
                raise _HopFailed("bad_reply", f"broken frame: {exc}") from None
            except ClientError as exc:
                raise _HopFailed("dial", str(exc)) from None
            except Exception as exc:  # reset, EOF mid-frame, closed connection: all the peer's
                raise _HopFailed("failed", f"stream failed: {exc!r}") from None
        if deadline.cancelled_caught:
            raise _HopFailed("timeout", f"no reply within {self.step_timeout:g} s")
        if frame is None:
            raise _HopFailed("failed", "the span closed the stream without a reply")
        if frame.get("type") == "error":
            code = frame.get("code")
            message_text = frame.get("message")
            raise _HopFailed(
                code if isinstance(code, str) and code in wire.ERROR_CODES else "internal",
                message_text[:300] if isinstance(message_text, str) else "",
            )
        if "tokenize" in message:
            return frame
        reply = self._check_reply(hs, frame, message["start"] + rows, rows)
        hs.opened = True  # the session is open on this stream: no first-frame keys from now on
        return reply

    async def _dial(self, hop: Hop) -> str:
        """Connect to ``hop``'s peer (its addresses tried together); the address that worked."""
        chosen = None
        with trio.move_on_after(self.dial_timeout):
            try:
                chosen = await self.client.connect_any(list(hop.addrs), self.dial_timeout)
            except ClientError as exc:
                raise _HopFailed("dial", str(exc)) from None
            except Exception as exc:
                raise _HopFailed("dial", f"cannot dial: {exc!r}") from None
        if chosen is None:
            raise _HopFailed("dial", f"no address answered within {self.dial_timeout:g} s")
        return chosen

    def _check_reply(self, hs: _HopSession, frame: dict[str, Any], length: int, rows: int) -> dict[str, Any]:
        """A reply as the protocol says, or ``_HopFailed``: nothing a span sends is trusted."""
        if frame.get("length") != length or not _whole(frame.get("length")):
            raise _HopFailed("bad_reply", f"the reply says the session holds {frame.get('length')!r} positions, not {length}")
        if hs.last:
            token, text, finish = frame.get("token"), frame.get("text"), frame.get("finish")
            ended = token is None and finish == "stop"  # the end-of-text token, which a span may leave out
            if not (ended or _whole(token) and 0 <= token < 2**31) or not isinstance(text, str) or len(text) > _MAX_TEXT or finish not in _FINISHES:
                raise _HopFailed("bad_reply", "the last span's reply needs 'token', 'text' and 'finish'")
            return {"token": token, "text": text, "finish": finish, "length": length}
        hidden = frame.get("hidden")
        if not isinstance(hidden, dict) or set(hidden) != {"dtype", "shape", "data"}:
            raise _HopFailed("bad_reply", "the reply has no 'hidden' tensor map")
        shape, data = hidden["shape"], hidden["data"]
        if hidden["dtype"] != self.wire_dtype:
            raise _HopFailed("bad_reply", f"hidden states in {hidden['dtype']!r}, not the {self.wire_dtype} asked for")
        if not (isinstance(shape, list) and len(shape) == 2 and shape[0] == rows and _whole(shape[1]) and 0 < shape[1] <= 65536):
            raise _HopFailed("bad_reply", f"hidden states of shape {shape!r}, not [{rows}, hidden]")
        if hs.hop.hidden and shape[1] != hs.hop.hidden:
            raise _HopFailed("bad_reply", f"hidden states {shape[1]} wide, not {hs.hop.hidden}")
        if not isinstance(data, bytes) or len(data) != rows * shape[1] * DTYPE_BYTES[self.wire_dtype]:
            raise _HopFailed("bad_reply", "hidden 'data' does not match its shape")
        return {"hidden": hidden, "length": length}


def _hidden_of(reply: dict[str, Any], dtype: str) -> _Chunk:
    hidden = reply["hidden"]
    rows, width = hidden["shape"]
    return _Chunk(rows, data=hidden["data"], width=width, dtype=dtype)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
