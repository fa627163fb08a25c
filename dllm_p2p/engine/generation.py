"""The trio side of a generation: the handle returned by ``Engine.generate``.

Model work happens on the engine's scheduler thread; a trio task only ever waits on a
memory channel. The thread hands events over with ``TrioToken.run_sync_soon``, which
never blocks the thread and keeps events in order, so a slow or stuck event loop cannot
stall decoding for other clients. Whatever happens on the trio side (the receiver closed,
the task cancelled, ``trio.run`` finished), delivering an event never raises in the
scheduler thread; an undeliverable request is simply marked cancelled and dropped.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import torch
import trio

from .detok import IncrementalDecoder
from .params import GenerationParams, GenerationResult

if TYPE_CHECKING:
    from .engine import Engine

#: What travels from the scheduler to the trio task: a text piece, the result, or an error.
Event = str | GenerationResult | BaseException


@dataclass(eq=False)
class Request:
    """One generation as the scheduler sees it. Only the scheduler thread mutates it,
    except ``cancelled``, which the trio side sets (a plain attribute write is atomic)."""

    params: GenerationParams
    prompt_ids: list[int]
    deliver: Callable[[Event], bool]
    detok: IncrementalDecoder
    generator: torch.Generator | None
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    first_token: float = 0.0
    pieces: list[str] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False

    @property
    def generated(self) -> list[int]:
        return self.detok.ids

    def emit(self, event: Event) -> None:
        if not self.deliver(event):
            self.cancelled = True


def channel_deliverer(
    token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel[Event]
) -> Callable[[Event], bool]:
    """A thread-safe, non-blocking ``deliver(event) -> bool`` into ``send`` (False: nobody listens)."""

    def put(event: Event) -> None:  # runs in the trio thread; must never raise
        # The receiving task may have left: then the request is being cancelled anyway.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            send.send_nowait(event)

    def deliver(event: Event) -> bool:
        try:
            token.run_sync_soon(put, event)
        except trio.RunFinishedError:
            return False
        return True

    return deliver


class Generation:
    """An async context manager over one request, and an async iterator of its text pieces.

    ::

        async with engine.generate(params) as generation:
            async for piece in generation:
                ...
            result = generation.result

    Entering submits the request (raising ``EngineBusy`` or ``ValueError`` at once);
    leaving before the end, for any reason (break, exception, cancellation), cancels it,
    and the scheduler frees its batch slot before its next decode step.
    """

    def __init__(self, engine: Engine, params: GenerationParams) -> None:
        self._engine = engine
        self.params = params
        #: Set when the iteration ends normally; ``None`` before that or if it did not.
        self.result: GenerationResult | None = None
        self._request: Request | None = None
        self._receive: trio.MemoryReceiveChannel[Event] | None = None
        self._reserved = False
        self._finished = False

    async def __aenter__(self) -> Generation:
        if self._request is not None or self._reserved:
            raise RuntimeError("a Generation can be entered only once")
        self._engine._reserve()
        self._reserved = True
        try:
            prompt_ids = await trio.to_thread.run_sync(self._engine._encode_prompt, self.params)
            send: trio.MemorySendChannel[Event]
            send, self._receive = trio.open_memory_channel(math.inf)
            self._request = self._engine._new_request(
                self.params, prompt_ids, channel_deliverer(trio.lowlevel.current_trio_token(), send)
            )
            self._engine._submit(self._request)
        except BaseException:
            self._release()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._request is not None and not self._finished:
            self._engine._cancel(self._request)
        if self._receive is not None:
            self._receive.close()
        self._release()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> str:
        if self._receive is None:
            raise RuntimeError("iterate inside `async with engine.generate(params) as generation:`")
        if self._finished:
            raise StopAsyncIteration
        event = await self._receive.receive()
        if isinstance(event, str):
            return event
        self._finished = True
        if isinstance(event, GenerationResult):
            self.result = event
            raise StopAsyncIteration
        raise event

    def _release(self) -> None:
        if self._reserved:
            self._reserved = False
            self._engine._release()


def elapsed_ms(since: float, until: float) -> float:
    return max(0.0, (until - since) * 1000.0)
