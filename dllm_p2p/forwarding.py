"""The ``/dllm/forward/1.0.0`` stream handler: one stream, one session of a ``SpanEngine``.

The session lives exactly as long as its stream: the client closing or resetting it, an
``error`` reply, or ``session_ttl`` seconds without a frame free its KV cache. Binding the
cache to the stream means no session table to garbage-collect and no way for one peer to
touch another's session. Every error a peer can cause ends in an ``error`` frame or a
reset of that stream, never in an exception escaping the handler (which would kill the
host).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio
from libp2p.abc import INetStream

from . import wire
from .engine import EngineBusy, EngineError, RequestTooLarge
from .engine.spans import Sampling, SpanEngine, SpanSession
from .host import reset_quietly

log = logging.getLogger("dllm_p2p.worker")

#: Default seconds a session may sit without a frame before its cache is freed.
DEFAULT_SESSION_TTL = 300.0


class ForwardError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ForwardService:
    """Serves sessions of ``engine`` to any peer (``handle`` is the stream handler)."""

    def __init__(
        self,
        engine: SpanEngine,
        *,
        read_timeout: float = 10.0,
        step_timeout: float = 300.0,
        session_ttl: float = DEFAULT_SESSION_TTL,
    ) -> None:
        self.engine = engine
        self.read_timeout = read_timeout
        self.step_timeout = step_timeout
        self.session_ttl = session_ttl
        self.failed = 0
        self.served = 0  # sessions that ended without an error
        #: ``DLLM_FAULT=slow-steps:MS``: each step MS milliseconds slower (a slow peer, for tests).
        fault, _, arg = os.environ.get("DLLM_FAULT", "").partition(":")
        self._step_delay = int(arg) / 1000 if fault == "slow-steps" and arg.isdigit() else 0.0
        if self._step_delay:
            log.warning("DLLM_FAULT=slow-steps: each forward step waits %g s more (tests only)", self._step_delay)

    async def handle(self, stream: INetStream) -> None:
        session: list[SpanSession] = []
        try:
            await self._serve(stream, session)
        except Exception as exc:  # never let a peer's stream kill the host
            self.failed += 1
            log.info("forward stream failed: %r", exc)
            await reset_quietly(stream)
        finally:
            for opened in session:
                opened.close()

    async def _serve(self, stream: INetStream, holder: list[SpanSession]) -> None:
        reader = wire.FrameReader(stream, wire.MAX_FORWARD_FRAME)
        session: SpanSession | None = None
        while True:
            message = None
            wait = self.session_ttl if session is not None else self.read_timeout
            try:
                with trio.move_on_after(wait):
                    message = await reader.read_frame()
                    if message is None:  # the client closed its side: the session is over
                        self.served += session is not None
                        await stream.close()
                        return
                if message is None:
                    raise ForwardError("timeout", f"no frame within {wait:g} s; the session is closed")
                request = wire.parse_forward(message, first=session is None)
                if request.tokenize is not None:
                    reply = await self._tokenize(request.tokenize)
                else:
                    if session is None:
                        session = self._open(request)
                        holder.append(session)
                    elif request.session != session.id:
                        raise ForwardError("bad_request", f"this stream carries session {session.id!r}")
                    reply = await self._step(session, request)
            except (ForwardError, wire.WireError) as exc:
                await self._fail(stream, exc.code or "bad_request", str(exc))
                return
            except EngineBusy as exc:
                await self._fail(stream, "busy", str(exc))
                return
            except ValueError as exc:
                await self._fail(stream, "too_large" if isinstance(exc, RequestTooLarge) else "bad_request", str(exc))
                return
            except (EngineError, RuntimeError) as exc:  # this step failed; the node carries on
                log.warning("forward step failed: %r", exc)
                await self._fail(stream, "internal", f"forward failed: {exc}")
                return
            await stream.write(wire.encode_frame(reply))

    def _open(self, request: wire.ForwardRequest) -> SpanSession:
        engine = self.engine
        fingerprint = engine.loaded.fingerprint
        if request.model is not None and request.model not in (fingerprint, engine.name):
            raise ForwardError("unknown_model", f"this span is of {engine.name} ({fingerprint}), not {request.model!r}")
        if request.span is not None and request.span != engine.span:
            have = f"{engine.span[0]}:{engine.span[1]}"
            raise ForwardError("bad_request", f"this peer serves layers {have}, not {request.span[0]}:{request.span[1]}")
        if request.start != 0:
            raise ForwardError("bad_request", "a session's first forward must have 'start' 0")
        sampling = None
        if engine.lean.last:
            if request.sample is None:
                raise ForwardError("bad_request", "the last span needs 'sample' in the session's first frame")
            s = request.sample
            sampling = Sampling(
                max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                seed=s.seed, min_new_tokens=s.min_new_tokens, stop=s.stop,
            )
        assert request.max_length is not None
        return engine.open(
            request.session, request.max_length, wire_dtype=request.wire_dtype, sampling=sampling,
            generated=list(request.generated),
        )

    async def _step(self, session: SpanSession, request: wire.ForwardRequest) -> dict[str, Any]:
        import torch

        from .engine.spans import WIRE_DTYPES

        assert request.start is not None
        tokens = list(request.tokens) if request.tokens is not None else None
        hidden = None
        if request.hidden is not None:
            tensor = request.hidden
            hidden = torch.frombuffer(bytearray(tensor.data), dtype=WIRE_DTYPES[tensor.dtype]).reshape(tensor.shape)
        with trio.move_on_after(self.step_timeout) as deadline:
            result = await session.forward(request.start, tokens=tokens, hidden=hidden)
        if deadline.cancelled_caught:
            raise ForwardError("timeout", f"the step took longer than {self.step_timeout:g} s")
        if self._step_delay:
            await trio.sleep(self._step_delay)
        if result.hidden is not None:
            out = result.hidden.contiguous()
            dtype = next(name for name, value in WIRE_DTYPES.items() if value == out.dtype)
            data = out.view(torch.uint8).numpy().tobytes()
            return {"hidden": wire.TensorMap(dtype, (int(out.shape[0]), int(out.shape[1])), data).to_wire(), "length": result.length}
        return {"token": result.token, "text": result.text, "finish": result.finish, "length": result.length}

    async def _tokenize(self, request: wire.Request) -> dict[str, Any]:
        engine = self.engine
        if not engine.lean.first:
            raise ForwardError("bad_request", "only the span holding layer 0 tokenizes")
        loaded = engine.loaded

        def encode() -> list[int]:
            with engine.tokenizer_lock:
                if request.messages is not None:
                    return loaded.encode_chat([dict(m) for m in request.messages])
                return loaded.encode(request.prompt)

        ids = await trio.to_thread.run_sync(encode)
        if len(ids) >= loaded.max_context:
            raise RequestTooLarge(f"the prompt has {len(ids)} tokens; the model's context is {loaded.max_context}")
        return {"tokens": ids}

    async def _fail(self, stream: INetStream, code: str, message: str) -> None:
        self.failed += 1
        with trio.move_on_after(self.read_timeout):
            await stream.write(wire.encode_frame(wire.error_frame(code, message)))
        await stream.close()
