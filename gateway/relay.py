"""Send one request to a live worker, failing over to another until the first token.

Once a token has reached the HTTP client the answer can't be restarted elsewhere without
the client seeing text twice, so failover stops there and the error is relayed instead.
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

from .nodes import NodeTable, NoLiveNode

#: Worker error codes that say "this node, not this request": try another node.
RETRYABLE = {"busy", "timeout", "internal", "unknown_model"}


@dataclass
class Token:
    text: str


@dataclass
class Done:
    frame: dict[str, Any]
    node: str
    attempts: int


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
) -> AsyncIterator[Token | Done]:
    """Yield ``Token``s then one ``Done``; raise ``RelayError`` when no node could answer.

    Always asks the worker to stream, so the gateway can tell "failed before the first
    token" (safe to retry elsewhere) from "failed midway" (not safe).
    """
    tried: list[str] = []
    last: RelayError | None = None
    wire_request = wire.Request(**{**request.__dict__, "stream": True})
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
        tokens = 0
        try:
            async with aclosing(_frames(client, node.addrs, wire_request, first_token_timeout)) as frames:
                async for frame in frames:
                    if frame["type"] == "token":
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        tokens += 1
                        yield Token(frame["text"])
                    elif frame["type"] == "done":
                        now = time.perf_counter()
                        first = first_token_at or now
                        table.record_success(node.peer_id, (first - started) * 1000, tokens, now - first)
                        yield Done(frame, node.peer_id, attempt)
                        return
        except WorkerError as exc:
            retry = exc.code in RETRYABLE and first_token_at is None
            table.record_failure(node.peer_id, f"{exc.code}: {exc.message}", backoff=exc.code != "busy")
            last = RelayError(exc.code, exc.message, node.peer_id)
            if not retry:
                raise last from None
        except (ClientError, _FirstTokenTimeout) as exc:
            table.record_failure(node.peer_id, str(exc))
            last = RelayError("node_failed", f"node {node.peer_id[:16]}… failed: {exc}", node.peer_id)
            if first_token_at is not None:
                raise last from None
    assert last is not None
    raise last


class _FirstTokenTimeout(Exception):
    pass


async def _frames(
    client: Client, addrs: list[str], request: wire.Request, first_token_timeout: float
) -> AsyncIterator[dict[str, Any]]:
    """Frames from the first of ``addrs`` that can be dialed."""
    errors = []
    for addr in addrs:
        try:
            await client.connect(addr)
        except DialError as exc:
            errors.append(str(exc))
            continue
        async with aclosing(client.generate(addr, request)) as frames:
            with trio.move_on_after(first_token_timeout) as scope:
                first = await frames.__anext__()
            if scope.cancelled_caught:
                raise _FirstTokenTimeout(f"no token within {first_token_timeout:g} s")
            yield first
            async for frame in frames:
                yield frame
        return
    raise DialError("; ".join(errors) or "node has no address")
