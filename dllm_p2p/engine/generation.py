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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import torch
import trio

from .detok import IncrementalDecoder
from .params import GenerationParams, GenerationResult
from .stops import StopText

if TYPE_CHECKING:
    from .engine import Engine

#: What travels from the scheduler to the trio task: a text piece, the result, or an error.
Event = str | GenerationResult | BaseException

#: Prompts up to this many characters are tokenized on the event loop (measured: 0.3 ms
#: for 500 characters, about 0.5 ms per 1,000); longer ones in a thread, which costs a
#: thread hand-over (0.5 ms on an idle machine) but never stalls the loop.
INLINE_TOKENIZE_CHARS = 1000


@dataclass(eq=False)
class Request:
    """One generation as the scheduler sees it. Only the scheduler thread mutates it,
    except ``cancelled``, which the trio side sets (a plain attribute write is atomic)."""

    params: GenerationParams
    prompt_ids: list[int]
    deliver: Callable[[Event], bool]
    detok: IncrementalDecoder
    generator: torch.Generator | None
    #: The client's stop strings, when it gave any.
    stops: StopText | None = None
    #: Emit text pieces as they are decoded (False: only the final result).
    stream: bool = True
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


class Mailbox:
    """Hands events from the scheduler thread to one trio task, several per wake-up.

    ``deliver`` never blocks and keeps events in order. It schedules at most one hand-over
    (``TrioToken.run_sync_soon``) at a time: events produced while one is pending ride
    along with it, so a busy event loop wakes once for many tokens instead of once per
    token, and the receiving task can send them as one frame.
    """

    def __init__(self, token: trio.lowlevel.TrioToken, send: trio.MemorySendChannel[Event]) -> None:
        self._token = token
        self._send = send
        self._lock = threading.Lock()
        self._pending: list[Event] = []

    def deliver(self, event: Event) -> bool:
        """Queue ``event`` for the trio task; False if nobody can receive it any more."""
        with self._lock:
            self._pending.append(event)
            if len(self._pending) > 1:
                return True  # a hand-over is already scheduled and will take this too
        try:
            self._token.run_sync_soon(self._hand_over)
        except trio.RunFinishedError:
            return False
        return True

    def _hand_over(self) -> None:  # runs in the trio thread; must never raise
        with self._lock:
            events, self._pending = self._pending, []
        for event in events:
            # The receiving task may have left: then the request is being cancelled anyway.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                self._send.send_nowait(event)


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

    def __init__(self, engine: Engine, params: GenerationParams, stream: bool = True) -> None:
        self._engine = engine
        self.params = params
        #: Whether text pieces are delivered at all (False: only the result, no per-token wake-ups).
        self.stream = stream
        self._pieces: list[str] = []  # text received, not yet returned
        self._held: GenerationResult | BaseException | None = None  # the end, received early
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
            if len(self.params.prompt) <= INLINE_TOKENIZE_CHARS:
                prompt_ids = self._engine._encode_prompt(self.params)  # < 0.5 ms: not worth a thread hop
            else:
                prompt_ids = await trio.to_thread.run_sync(self._engine._encode_prompt, self.params)
            send: trio.MemorySendChannel[Event]
            send, self._receive = trio.open_memory_channel(math.inf)
            mailbox = Mailbox(trio.lowlevel.current_trio_token(), send)
            self._request = self._engine._new_request(self.params, prompt_ids, mailbox.deliver, self.stream)
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
        # Join the pieces that are already here: a reader slower than the model gets one
        # larger piece instead of falling further behind one token at a time.
        self._gather_nowait()
        if not self._pieces and self._held is None:
            self._take(await self._receive.receive())
            self._gather_nowait()
        if self._pieces:
            text, self._pieces = "".join(self._pieces), []
            return text
        event, self._held = self._held, None
        self._finished = True
        if isinstance(event, GenerationResult):
            self.result = event
            raise StopAsyncIteration
        assert isinstance(event, BaseException)
        raise event

    async def gather(self, seconds: float) -> None:
        """Let text gather for up to ``seconds``; return at once when the generation ends.

        A streaming reader that calls this after each write sends one frame per
        ``seconds`` at most, however fast the model is, and never delays the end.
        """
        if self._receive is None:
            raise RuntimeError("gather inside `async with engine.generate(params) as generation:`")
        with trio.move_on_after(seconds):
            while self._held is None and not self._finished:
                self._take(await self._receive.receive())

    def _gather_nowait(self) -> None:
        assert self._receive is not None
        while self._held is None:
            try:
                event = self._receive.receive_nowait()
            except trio.WouldBlock:
                return
            self._take(event)

    def _take(self, event: Event) -> None:
        if isinstance(event, str):
            self._pieces.append(event)
        else:
            self._held = event  # the result or an error: nothing follows it

    def _release(self) -> None:
        if self._reserved:
            self._reserved = False
            self._engine._release()


def elapsed_ms(since: float, until: float) -> float:
    return max(0.0, (until - since) * 1000.0)
