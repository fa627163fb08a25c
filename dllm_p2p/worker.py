"""A worker node: serves one model over ``/dllm/generate/1.0.0`` and ``/dllm/info/1.0.0``,
or one span of a model's layers over ``/dllm/forward/1.0.0`` (``forwarding.py``).

Every stream handler guards its own errors: in py-libp2p an exception that escapes a
handler propagates through ``host.run`` and takes the whole node down, so a hostile or
broken peer must only ever cost its own stream.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from . import __version__, answers, credits, wire
from .engine import Engine, EngineBusy, EngineError, GenerationParams, RequestTooLarge
from .engine.scoring import score_tokens
from .engine.spans import SpanEngine
from .forwarding import DEFAULT_SESSION_TTL, ForwardService
from .fsutil import write_json_atomic
from .host import host_addrs, make_host, parse_multiaddr, reset_quietly
from .identity import Identity
from .ledger_service import LedgerService
from .memory import resident_mib

log = logging.getLogger("dllm_p2p.worker")

#: Token frames go out at most this often; the final frame is never held back. A model
#: faster than this (tiny: ~2 ms per token here) sends a few tokens per frame instead of
#: paying for one frame per token (measured: ~3 ms of CPU per frame, worker and gateway
#: together); GPT-2 on a CPU (30-50 ms per token) still sends one frame per token.
TOKEN_FRAME_INTERVAL = 0.01


@dataclass
class WorkerConfig:
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/4001"])
    announce: list[str] = field(default_factory=list)
    data_dir: Path = Path("~/.dllm")
    #: Cap on max_new_tokens; larger requests are clamped to it.
    max_new_tokens: int = 256
    default_new_tokens: int = 64
    #: Seconds a dialer has to send its request frame before it gets ``timeout``.
    read_timeout: float = 10.0
    #: Seconds one generation may take before it is cancelled with ``timeout``.
    request_timeout: float = 300.0
    psk: str | None = None
    #: Seconds a span's session may sit idle before its KV cache is freed.
    session_ttl: float = DEFAULT_SESSION_TTL
    #: The process's resident memory (MiB) before its model loaded, when known: heartbeats
    #: then report the model's share (``model_rss_mib``) beside the whole (``rss_mib``).
    baseline_rss_mib: float | None = None
    #: Millicredits: a requester whose verified balance is below this is refused with
    #: ``payment_required`` while others wait in the queue (never while the node is idle).
    credit_floor: int = -credits.ALLOWANCE_MC


class Worker:
    """One node: a libp2p host plus an engine. ``run`` serves until cancelled."""

    def __init__(self, engine: Engine | SpanEngine, identity: Identity, config: WorkerConfig) -> None:
        self.engine = engine
        #: Set when this worker serves a span of layers rather than generations.
        self.forward: ForwardService | None = None
        if isinstance(engine, SpanEngine):
            self.forward = ForwardService(
                engine, read_timeout=config.read_timeout, step_timeout=config.request_timeout,
                session_ttl=config.session_ttl,
            )
        self.identity = identity
        self.config = config
        self.host: IHost = make_host(identity, announce=config.announce, psk=config.psk)
        self.started = time.time()
        self.served = 0
        self.failed = 0
        #: Extra long-running services (registry sync, heartbeats) started beside the host.
        self.services: list[Callable[[IHost], Awaitable[None]]] = []
        #: Receipts and balances (credits); None: this worker keeps no ledger.
        self.ledger: LedgerService | None = None
        self._scoring = trio.Lock()
        #: ``DLLM_FAULT=wrong-answers``: a lying worker, for tests of the audits;
        #: ``wrong-answers:N`` lies in its first N answers only, then reforms;
        #: ``slow-tokens:MS`` makes each token MS milliseconds slower (a slow machine).
        self.fault, _, arg = os.environ.get("DLLM_FAULT", "").partition(":")
        self._lies_left = int(arg) if arg.isdigit() and self.fault == "wrong-answers" else None
        self._token_delay = int(arg) / 1000 if arg.isdigit() and self.fault == "slow-tokens" else 0.0
        if self.fault:
            log.warning("DLLM_FAULT=%s: this worker misbehaves on purpose (tests only)", os.environ["DLLM_FAULT"])

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id.to_base58()

    @property
    def models(self) -> list[str]:
        return [self.engine.name]

    def model_info(self) -> dict[str, dict[str, Any]]:
        """Per model: its fingerprint (which weights exactly), whether it is a chat model, and
        which of its decoder layers this node holds (``span`` of ``layers``; all for a full worker)."""
        loaded = self.engine.loaded
        facts: dict[str, Any] = {"fingerprint": loaded.fingerprint, "chat": loaded.chat}
        config = loaded.config
        total = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        if isinstance(total, int) and total > 0:
            span = self.engine.span if isinstance(self.engine, SpanEngine) else (0, total)
            facts.update(span=list(span), layers=total, forward=self.forward is not None)
            hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
            if isinstance(hidden, int):
                facts["hidden"] = hidden
        return {loaded.name: facts}

    @property
    def protocols(self) -> list[str]:
        if self.forward is not None:
            return [wire.FORWARD_PROTOCOL, wire.INFO_PROTOCOL]
        return [wire.GENERATE_PROTOCOL, wire.INFO_PROTOCOL, wire.SCORE_PROTOCOL]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.forward is not None:
            self.host.set_stream_handler(TProtocol(wire.FORWARD_PROTOCOL), self.forward.handle)
        else:
            self.host.set_stream_handler(TProtocol(wire.GENERATE_PROTOCOL), self._on_generate)
            self.host.set_stream_handler(TProtocol(wire.SCORE_PROTOCOL), self._on_score)
        self.host.set_stream_handler(TProtocol(wire.INFO_PROTOCOL), self._on_info)
        listen = [parse_multiaddr(a) for a in self.config.listen]
        async with self.host.run(listen):
            addrs = host_addrs(self.host)
            self._write_node_file(addrs)
            for addr in addrs:
                print(f"listening on {addr}", flush=True)
            async with trio.open_nursery() as nursery:
                for service in self.services:
                    nursery.start_soon(service, self.host)
                task_status.started(addrs)
                await trio.sleep_forever()

    def _write_node_file(self, addrs: list[str]) -> None:
        data_dir = Path(self.config.data_dir).expanduser()
        write_json_atomic(
            data_dir / "node.json",
            {
                "peer_id": self.peer_id,
                "addrs": addrs,
                "models": self.models,
                "pid": os.getpid(),
                "started": int(self.started),
                "version": __version__,
            },
        )

    def load(self) -> dict[str, Any]:
        """What heartbeats and the info frame report: batch occupancy and counters."""
        served, failed = self.served, self.failed
        if self.forward is not None:
            served, failed = self.forward.served, self.forward.failed
        rss = resident_mib()
        memory = {} if rss is None else {"rss_mib": rss}
        if rss is not None and self.config.baseline_rss_mib is not None:
            memory["model_rss_mib"] = round(max(0.0, rss - self.config.baseline_rss_mib), 1)
        return {
            **self.engine.stats(), **memory, "served": served, "failed": failed,
            "uptime_s": round(time.time() - self.started, 1),
        }

    # --- /dllm/info/1.0.0 ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "type": "info",
            "peer_id": self.peer_id,
            "addrs": host_addrs(self.host),
            "models": self.models,
            "model_info": self.model_info(),
            "version": __version__,
            "protocols": self.protocols,
            "limits": {
                "max_request_frame": wire.MAX_REQUEST_FRAME,
                "max_prompt_chars": wire.MAX_PROMPT_CHARS,
                "max_new_tokens": self.config.max_new_tokens,
            },
            "load": self.load(),
            **({"credits": self.ledger.brief()} if self.ledger is not None else {}),
        }

    async def _on_info(self, stream: INetStream) -> None:
        try:
            with trio.move_on_after(self.config.read_timeout):
                await stream.write(wire.encode_frame(self.info()))
            await stream.close()
        except Exception as exc:  # never let a peer's stream kill the host
            log.debug("info stream failed: %r", exc)
            await reset_quietly(stream)

    # --- /dllm/score/1.0.0 --------------------------------------------------------------

    async def _on_score(self, stream: INetStream) -> None:
        """Score claimed tokens for an auditor: one request, one ``scores`` (or error) frame."""
        try:
            frame = await self._score(stream)
            with trio.move_on_after(self.config.read_timeout):
                await stream.write(wire.encode_frame(frame))
                await stream.close()
        except Exception as exc:  # never let a peer's stream kill the host
            log.debug("score stream failed: %r", exc)
            await reset_quietly(stream)

    async def _score(self, stream: INetStream) -> dict[str, Any]:
        try:
            message = None
            with trio.move_on_after(self.config.read_timeout):
                message = await wire.FrameReader(stream, wire.MAX_REQUEST_FRAME).read_frame()
            if message is None:
                return wire.error_frame("timeout", f"no score request within {self.config.read_timeout:g} s")
            scoring = wire.parse_score_request(message)
        except wire.WireError as exc:
            return wire.error_frame(exc.code, str(exc))
        request = scoring.request
        if request.model and request.model not in self.models:
            return wire.error_frame("unknown_model", f"this node serves {self.models}, not {request.model!r}")
        params = GenerationParams(
            prompt=request.prompt,
            messages=[dict(m) for m in request.messages] if request.messages is not None else None,
            max_new_tokens=len(scoring.tokens),
            temperature=request.temperature,
        )
        # One scoring pass at a time: it is a whole forward pass, beside the batch.
        async with self._scoring:
            try:
                prompt_ids = self.engine._encode_prompt(params)
                return await trio.to_thread.run_sync(
                    score_tokens, self.engine.logits, self.engine.vocab_size, prompt_ids, list(scoring.tokens),
                    request.temperature,
                )
            except ValueError as exc:
                return wire.error_frame("too_large" if isinstance(exc, RequestTooLarge) else "bad_request", str(exc))

    # --- /dllm/generate/1.0.0 -----------------------------------------------------------

    async def _on_generate(self, stream: INetStream) -> None:
        try:
            reader = wire.FrameReader(stream, wire.MAX_REQUEST_FRAME)
            waiting: tuple[dict[str, Any], bytes] | None = None
            first = True
            while True:
                kept, waiting = await self._serve_request(stream, reader, first, waiting)
                if not kept:
                    return
                first = False
        except Exception as exc:
            self.failed += 1
            log.warning("generate stream failed: %r", exc)
            await reset_quietly(stream)

    async def _serve_request(
        self, stream: INetStream, reader: wire.FrameReader, first: bool, waiting: tuple[dict[str, Any], bytes] | None
    ) -> tuple[bool, tuple[dict[str, Any], bytes] | None]:
        """Read one request (or take the one that arrived early) and answer it.

        Returns whether the stream stays open for another request (the dialer asked for
        ``keep_alive`` and has not closed its side), and a next request (its map and its
        bytes) that arrived while this one was generating, if any.
        """
        request_id: str | None = None

        async def reply(frame: dict[str, Any]) -> None:
            if request_id is not None:
                frame.setdefault("id", request_id)
            await stream.write(wire.encode_frame(frame))

        async def fail(code: str, message: str) -> tuple[bool, None]:
            self.failed += 1
            with trio.move_on_after(self.config.read_timeout):
                await reply(wire.error_frame(code, message))
            await stream.close()
            return False, None

        message, body = waiting if waiting is not None else (None, b"")
        if message is None:
            # The first request must come within the read timeout; on a kept stream the
            # dialer may take up to KEEP_ALIVE_IDLE to send the next one, or close it.
            with trio.move_on_after(self.config.read_timeout if first else wire.KEEP_ALIVE_IDLE):
                try:
                    message = await reader.read_frame()
                except wire.WireError as exc:
                    return await fail(exc.code, str(exc))
                except Exception:
                    if first:
                        raise
                    await reset_quietly(stream)  # a kept stream the dialer dropped: no failure
                    return False, None
                if message is None:
                    await stream.close()  # the dialer closed without asking (again)
                    return False, None
                body = reader.last_body
            if message is None:
                if first:
                    return await fail("timeout", f"no request within {self.config.read_timeout:g} s")
                await stream.close()  # an idle kept stream: end it quietly
                return False, None
        if isinstance(message.get("id"), str):
            request_id = message["id"][:128]
        try:
            request = wire.parse_request(message)
        except wire.WireError as exc:
            return await fail(exc.code, str(exc))
        if request.model and request.model not in self.models:
            return await fail("unknown_model", f"this node serves {self.models}, not {request.model!r}")

        requester = _remote_peer(stream)
        priority = 0
        if self.ledger is not None and requester is not None:
            fork = self.ledger.fork(requester)
            if fork is not None:
                return await fail("payment_required", f"your ledger forked at record {fork.seq}: this node does not serve you")
            self.ledger.note_requester(requester)
            priority = self.ledger.priority(requester)
            if priority < self.config.credit_floor and self.engine.stats().get("queued", 0) > 0:
                return await fail(
                    "payment_required",
                    f"your balance is {priority / 1000:.1f} credits, below this node's floor of "
                    f"{self.config.credit_floor / 1000:.1f} while others wait; serve requests to earn credits",
                )
        params = GenerationParams(
            priority=priority,
            prompt=request.prompt,
            max_new_tokens=min(
                request.max_new_tokens or self.config.default_new_tokens, self.config.max_new_tokens
            ),
            min_new_tokens=min(request.min_new_tokens, self.config.max_new_tokens),
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            messages=[dict(m) for m in request.messages] if request.messages is not None else None,
            stop=list(request.stop),
        )
        claimed_prompt_tokens = None
        if self.fault == "wrong-answers" and self._lies_left != 0:
            if self._lies_left is not None:
                self._lies_left -= 1
            # A careful liar: it reports the prompt length of the question it was asked.
            try:
                claimed_prompt_tokens = len(self.engine._encode_prompt(params))
            except ValueError:
                pass
            params = _wrong_question(params)
        result = None
        error: tuple[str, str] | None = None
        watch = _PeerWatch(stream, reader)
        with trio.move_on_after(self.config.request_timeout) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch.run, nursery.cancel_scope)
                try:
                    async with self.engine.generate(params, stream=request.stream) as generation:
                        async for piece in generation:  # pieces that piled up come joined
                            await reply(wire.token_frame(piece))
                            if self._token_delay:
                                await trio.sleep(self._token_delay)
                            await generation.gather(TOKEN_FRAME_INTERVAL)
                        if self._token_delay and not request.stream:  # one frame at the end: as slow
                            await trio.sleep(self._token_delay * generation.result.completion_tokens)
                        result = generation.result
                except EngineBusy as exc:
                    error = ("busy", str(exc) or "node is at capacity, try another node")
                except ValueError as exc:  # the prompt does not fit the context, or bad params
                    error = ("too_large" if isinstance(exc, RequestTooLarge) else "bad_request", str(exc))
                except EngineError as exc:  # this generation failed; the node carries on
                    log.warning("generation failed: %s", exc)
                    error = ("internal", f"generation failed: {exc}")
                nursery.cancel_scope.cancel()
        if deadline.cancelled_caught:
            error = ("timeout", f"generation exceeded {self.config.request_timeout:g} s")
        if error is not None:
            return await fail(*error)
        if result is None:  # the peer went away; the generation was cancelled
            log.info("peer left mid-generation; generation cancelled")
            await reset_quietly(stream)
            return False, None
        self.served += 1
        usage = {"prompt_tokens": claimed_prompt_tokens or result.prompt_tokens, "completion_tokens": result.completion_tokens}
        text, tokens = result.text, result.token_ids
        signature = answers.sign(
            self.identity,
            request_body=body,
            request_id=request_id,
            text=text,
            token_ids=tokens,
            model=self.engine.name,
            fingerprint=self.engine.loaded.fingerprint,
            finish_reason=result.finish_reason,
            usage=usage,
        )
        offer = None
        if request.receipt and self.ledger is not None and requester is not None:
            offer = credits.make_receipt(
                self.identity, requester=requester, request_id=request_id, request_digest=answers.digest(body),
                signature=signature, params=self.engine.params,
            )
        await reply(
            {
                "type": "done",
                "text": text,
                "model": self.engine.name,
                "fingerprint": self.engine.loaded.fingerprint,
                "finish_reason": result.finish_reason,
                "usage": usage,
                **({"tokens": tokens} if request.return_tokens else {}),
                "signature": signature,
                **({"receipt": offer} if offer is not None else {}),
                "timing": {
                    "queue_ms": round(result.queue_ms, 2),
                    "first_token_ms": round(result.first_token_ms, 2),
                    "total_ms": round(result.total_ms, 2),
                },
            }
        )
        if offer is not None and not watch.closed and watch.next_request is None:
            await self._take_countersign(offer, requester, reader, watch)
        if request.keep_alive and not watch.closed:
            return True, watch.next_request if watch.next_request is None else (watch.next_request, watch.next_body)
        await stream.close()
        return False, None


    async def _take_countersign(self, offer: dict[str, Any], requester: str, reader: wire.FrameReader, watch: _PeerWatch) -> None:
        """Read the requester's countersignature of ``offer`` and append the receipt. A
        request instead (a dialer that does not countersign) is kept as the next one."""
        assert self.ledger is not None
        frame = None
        with trio.move_on_after(self.config.read_timeout):
            try:
                frame = await reader.read_frame()
            except Exception as exc:
                log.debug("no countersignature from %s: %r", requester, exc)
                watch.closed = True
                return
        if frame is None:
            watch.closed = True  # closed, or silent for the read timeout: no receipt
            return
        if frame.get("type") != "countersign":
            watch.next_request, watch.next_body = frame, reader.last_body
            return
        try:
            await self.ledger.append(self.ledger.take_countersign(offer, frame, requester))
        except credits.InvalidReceipt as exc:
            log.warning("a bad countersignature from %s: %s", requester, exc)
            watch.closed = True  # it broke the protocol: this stream carries nothing more


def _remote_peer(stream: INetStream) -> str | None:
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except Exception:
        return None


def _wrong_question(params: GenerationParams) -> GenerationParams:
    """The fault ``wrong-answers``: answer another question with the real model, so the
    text is fluent, comes from the claimed model, and is wrong for what was asked."""
    import dataclasses

    if params.messages is not None:
        return dataclasses.replace(params, messages=[{"role": "user", "content": "Tell me a story about a dragon."}])
    return dataclasses.replace(params, prompt="Once upon a time, in a land far away,")


class _PeerWatch:
    """Watches the dialer while a request generates: a reset, or its connection going
    away, cancels the generation.

    It reads the stream to notice a reset. A half-close (EOF) is the normal end of the
    request, after which only the connection is watched. A frame is the dialer's next
    request on a ``keep_alive`` stream, sent early: it is kept for after this one.
    """

    def __init__(self, stream: INetStream, reader: wire.FrameReader) -> None:
        self.stream = stream
        self.reader = reader
        self.closed = False
        self.next_request: dict[str, Any] | None = None
        self.next_body = b""

    async def run(self, scope: trio.CancelScope) -> None:
        try:
            frame = await self.reader.read_frame()
        except Exception:
            scope.cancel()
            return
        if frame is None:
            self.closed = True
        else:
            self.next_request, self.next_body = frame, self.reader.last_body
        shutting_down = getattr(self.stream.muxed_conn, "event_shutting_down", None)
        if shutting_down is not None:
            await shutting_down.wait()
            scope.cancel()
        else:
            await trio.sleep_forever()
