"""Send one request to a live worker, failing over to another until the first token; or
generate it through a route of spans (``relay_route``).

Once a token has reached the HTTP client the answer can't be restarted elsewhere without
the client seeing text twice, so failover stops there and the error is relayed instead.
A route is different: a failed span is replaced and its session replayed mid-answer
(``dllm_p2p.route``), so the text goes on where it was.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import trio

from dllm_p2p import wire
from dllm_p2p.client import Client, ClientError, DialError, WorkerError
from dllm_p2p.route import Hop, RouteError, RouteResult, generate_route

from .nodes import NodeTable, NoLiveNode

#: Worker error codes that say "this node, not this request": try another node.
RETRYABLE = {"busy", "timeout", "internal", "unknown_model"}


@dataclass
class Token:
    text: str


@dataclass
class Done:
    frame: dict[str, Any]
    #: The worker that answered; None for an answer made by a route of spans.
    node: str | None
    attempts: int
    #: For a route: ``[{"peer_id", "span": [start, end]}, ...]``, the spans that served
    #: the end of the answer. Such an answer is not signed (``frame["signature"]`` is None).
    route: list[dict[str, Any]] | None = None


class RelayError(Exception):
    """The request failed; ``status`` is the HTTP status to answer with."""

    STATUS = {"bad_request": 400, "too_large": 413, "busy": 503, "timeout": 504, "unknown_model": 503, "no_live_node": 503}

    def __init__(self, code: str, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.node = node

    @property
    def status(self) -> int:
        return self.STATUS.get(self.code, 502)


async def relay(
    table: NodeTable,
    client: Client,
    request: wire.Request,
    *,
    max_attempts: int = 3,
    first_token_timeout: float = 120.0,
    answer_timeout: float = 330.0,
) -> AsyncIterator[Token | Done]:
    """Yield ``Token``s then one ``Done``; raise ``RelayError`` when no node could answer.

    With ``request.stream`` the worker streams and failover stops at the first token
    (the client has seen text: restarting elsewhere would show it twice). Without it the
    client sees nothing until the end, so any failure can be retried on another node, and
    the worker sends one frame instead of one per token (measured: per-token frames cost
    the worker's engine thread GIL time, about 45 ms per 32 tokens on the tiny model).
    """
    tried: list[str] = []
    last: RelayError | None = None
    first_frame_timeout = first_token_timeout if request.stream else answer_timeout
    for attempt in range(1, max_attempts + 1):
        try:
            node = table.choose(request.model, exclude=tried)
        except NoLiveNode as exc:
            if last is not None:
                raise last
            raise RelayError("no_live_node", str(exc)) from None
        tried.append(node.peer_id)
        started = time.perf_counter()
        first_token_at: float | None = None
        token_frames = 0
        try:
            async with aclosing(_frames(client, node.addrs, request, first_frame_timeout, answer_timeout)) as frames:
                async for frame in frames:
                    if frame["type"] == "token":
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        token_frames += 1
                        yield Token(frame["text"])
                    elif frame["type"] == "done":
                        _record(table, node.peer_id, frame, started, first_token_at, token_frames)
                        yield Done(frame, node.peer_id, attempt)
                        return
        except WorkerError as exc:
            retry = exc.code in RETRYABLE and first_token_at is None
            table.record_failure(node.peer_id, f"{exc.code}: {exc.message}", backoff=exc.code != "busy")
            last = RelayError(exc.code, exc.message, node.peer_id)
            if not retry:
                raise last from None
        except (ClientError, _Stalled) as exc:
            table.record_failure(node.peer_id, str(exc))
            last = RelayError("node_failed", f"node {node.peer_id[:16]}… failed: {exc}", node.peer_id)
            if first_token_at is not None:
                raise last from None
    assert last is not None
    raise last


def _record(table: NodeTable, peer_id: str, frame: dict[str, Any], started: float, first_token_at: float | None, frames: int) -> None:
    """Feed latency and speed to the node table, from our clock or the worker's timing."""
    now = time.perf_counter()
    timing, usage = frame.get("timing") or {}, frame.get("usage") or {}
    if first_token_at is None:  # not streamed: place the first token using the worker's timing
        total_s = float(timing.get("total_ms", 0.0)) / 1000
        first_s = float(timing.get("first_token_ms", 0.0)) / 1000
        first_token_at = max(started, now - total_s + first_s)
    # A token frame may carry several tokens (the worker joins what piled up during a write).
    tokens = int(usage.get("completion_tokens", frames))
    table.record_success(peer_id, (first_token_at - started) * 1000, tokens, now - first_token_at)


#: Seconds all the addresses of one node may take (they are tried together, a few of
#: each kind: dllm_p2p.reach): a record listing many dead addresses must not hold a
#: request for 10 s per address.
DIAL_BUDGET = 10.0
#: Longest silence between two frames of an answer once it has started.
FRAME_IDLE_TIMEOUT = 60.0


class _Stalled(Exception):
    pass


async def _frames(
    client: Client, addrs: list[str], request: wire.Request, first_frame_timeout: float, answer_timeout: float = 330.0
) -> AsyncIterator[dict[str, Any]]:
    """Frames from the first of ``addrs`` that can be dialed, each within its deadline:
    the first within ``first_frame_timeout``, the next ones within ``FRAME_IDLE_TIMEOUT``
    of the previous, and all of them within ``answer_timeout``."""
    chosen = None
    with trio.move_on_after(DIAL_BUDGET):
        chosen = await client.connect_any(addrs, DIAL_BUDGET)
    if chosen is None:
        raise DialError(f"no address answered within {DIAL_BUDGET:g} s")
    end = trio.current_time() + answer_timeout
    async with aclosing(client.generate(chosen, request)) as frames:
        wait = first_frame_timeout
        while True:
            with trio.move_on_after(min(wait, end - trio.current_time())) as scope:
                try:
                    frame = await frames.__anext__()
                except StopAsyncIteration:
                    return
            if scope.cancelled_caught:
                raise _Stalled(f"no answer within {first_frame_timeout:g} s" if wait == first_frame_timeout else "the answer stalled")
            yield frame
            wait = FRAME_IDLE_TIMEOUT


#: Longest wait for one reply of one span of a route.
ROUTE_STEP_TIMEOUT = FRAME_IDLE_TIMEOUT


async def relay_route(
    table: NodeTable,
    client: Client,
    request: wire.Request,
    *,
    max_replacements: int = 3,
    step_timeout: float = ROUTE_STEP_TIMEOUT,
) -> AsyncIterator[Token | Done]:
    """Generate ``request`` through the cheapest complete route of spans the table knows:
    ``Token``s as the last span makes them, then one ``Done`` whose frame looks like a
    worker's ``done`` frame, with ``route`` and ``signature: None`` (no single worker
    made the answer, so none can sign it). Raise ``RelayError`` when it fails.

    What each span did feeds the table (latency, speed, failures with backoff), so the
    next route avoids the slow and the broken.
    """
    model, route = table.plan(request.model)
    if not route:
        raise RelayError("no_live_node", _no_route(table, model))
    fingerprint = route[0].fingerprint

    def spares() -> list[Hop]:
        return table.span_candidates(model, fingerprint)  # type: ignore[arg-type]

    def served(hop: Hop, prefill_ms: float, steps: int, decode_s: float) -> None:
        table.record_success(hop.peer_id, prefill_ms, steps, decode_s)

    def failed(hop: Hop, code: str, message: str) -> None:
        table.record_failure(hop.peer_id, f"{code}: {message}", backoff=code != "busy")

    try:
        async with aclosing(
            generate_route(
                client, request, route, candidates=spares, max_replacements=max_replacements, step_timeout=step_timeout,
                dial_timeout=DIAL_BUDGET, on_success=served, on_failure=failed,
            )
        ) as events:
            async for event in events:
                if isinstance(event, RouteResult):
                    yield Done(route_frame(event, model, request), None, 1 + event.replacements, event.route)
                    return
                yield Token(event)
    except RouteError as exc:
        raise RelayError(exc.code, exc.message) from None


def _no_route(table: NodeTable, model: str | None) -> str:
    """Why there is no route: which layers the live spans hold, when some do."""
    what = f"model {model!r}" if model else "any model"
    entry = table.spans().get(model) if model else None
    if not entry:
        return f"no complete route of spans serves {what}"
    held = ", ".join(f"{s['span'][0]}:{s['span'][1]}" for s in entry["spans"] if not s["backoff_s"])
    return f"no complete route of spans serves {what}: live spans hold layers {held or 'none'} of {entry['layers']}"


def route_frame(result: RouteResult, model: str | None, request: wire.Request) -> dict[str, Any]:
    """A ``done`` frame for an answer made by a route (unsigned)."""
    frame: dict[str, Any] = {
        "type": "done",
        "text": result.text,
        "model": model,
        "fingerprint": result.fingerprint,
        "finish_reason": result.finish_reason,
        "usage": dict(result.usage),
        "timing": dict(result.timing),
        "signature": None,
        "route": result.route,
    }
    if request.return_tokens:
        frame["tokens"] = list(result.tokens)
    return frame
