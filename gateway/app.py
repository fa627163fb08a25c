"""The gateway's HTTP API (FastAPI on hypercorn's trio worker, one loop with libp2p).

Routes: ``/api/generate`` (JSON or server-sent events), OpenAI-compatible ``/v1/...``,
``/api/nodes``, ``/api/history``, ``/api/spans``, ``/api/registry``, ``/ipfs/{cid}`` (trustless gateway, gateway/trustless.py),
``/healthz``, ``/metrics`` and the page at ``/``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from libp2p.peer.id import ID
from dllm_p2p import __version__, reach, wire
from dllm_p2p.client import Client
from dllm_p2p.ledger_service import LedgerService

from dllm_p2p.registry.ipfs import EmbeddedStore

from . import trustless
from .accounts import Accounts
from .audit import Auditor
from .history import History
from .limits import RateLimiter
from .nodes import NodeTable
from .relay import Done, RelayError, Token, relay, relay_route

def _frontend() -> Path:
    """The page: ``frontend/`` of a source checkout, else the installed ``gateway.frontend``."""
    checkout = Path(__file__).resolve().parent.parent / "frontend"
    if (checkout / "index.html").is_file():
        return checkout
    return Path(__file__).resolve().parent / "frontend"


FRONTEND = _frontend()
MAX_BODY = 256 * 1024


# --- request bodies (these models are the API's documentation at /docs) -------------------


#: One stop string or up to 4; the answer ends before the first one that appears.
_StopString = Annotated[str, Field(min_length=1, max_length=wire.MAX_STOP_CHARS)]
StopField = Annotated[str, Field(max_length=wire.MAX_STOP_CHARS)] | Annotated[list[_StopString], Field(max_length=wire.MAX_STOPS)] | None


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None or stop == "":
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


#: How a request may be served: see ``GenerateBody.route``.
RouteMode = Literal["auto", "spans", "full"]


class _OpenAIBase(BaseModel):
    # OpenAI clients send many optional fields; unknown ones are accepted and ignored.
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(default=None, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=wire.MAX_NEW_TOKENS_LIMIT)
    # Not OpenAI's; vLLM's extension of the same name: end-of-text is suppressed until this many tokens.
    min_tokens: int = Field(default=0, ge=0, le=wire.MAX_NEW_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=1)
    stop: StopField = None
    stream: bool = False


class CompletionBody(_OpenAIBase):
    prompt: str = Field(max_length=wire.MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type") == "text")
        return self.content or ""


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: Text to continue; or ``messages``, a conversation the worker renders with its
    #: model's chat template (exactly one of the two).
    prompt: str | None = Field(default=None, max_length=wire.MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=wire.MAX_MESSAGES)
    model: str | None = Field(default=None, max_length=256)
    max_new_tokens: int | None = Field(default=None, ge=1, le=wire.MAX_NEW_TOKENS_LIMIT)
    min_new_tokens: int = Field(default=0, ge=0, le=wire.MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=wire.MAX_TOP_K)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: StopField = None
    stream: bool = False
    #: ``auto``: a full worker when one is live, else a route of spans when they cover the
    #: model; ``spans``: a route even if a full worker is live; ``full``: never a route.
    route: Literal["auto", "spans", "full"] = "auto"

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> GenerateBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give one of 'prompt' (text to continue) and 'messages' (a conversation)")
        return self


class ChatBody(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=wire.MAX_NEW_TOKENS_LIMIT)


def chat_messages(messages: list[ChatMessage]) -> tuple[dict[str, str], ...]:
    """The conversation as the wire carries it; the worker applies its model's chat
    template (or, for a base model, a ``Role: text`` transcript)."""
    return tuple({"role": m.role, "content": m.text()} for m in messages)


# --- metrics ------------------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("dllm_gateway_requests", "Generation requests", ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("dllm_gateway_errors", "Failed generation requests", ["code"], registry=self.registry)
        self.latency = Histogram(
            "dllm_gateway_request_seconds",
            "Time from request to final answer",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.first_token = Histogram(
            "dllm_gateway_first_token_seconds",
            "Time from request to first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.tokens = Counter("dllm_gateway_tokens", "Tokens relayed", ["kind"], registry=self.registry)
        self.live_nodes = Gauge("dllm_gateway_live_nodes", "Workers online now", registry=self.registry)
        self.failovers = Counter("dllm_gateway_failovers", "Requests answered by a later attempt", registry=self.registry)


# --- the gateway's state ------------------------------------------------------------------


class Gateway:
    """Everything the routes need: the node table, a libp2p client, metrics, the registry."""

    def __init__(
        self,
        table: NodeTable,
        client: Client | None,
        *,
        registry_info: Callable[[], dict[str, Any]] | None = None,
        max_attempts: int = 3,
        cors_origins: list[str] | None = None,
        api_keys: list[str] | None = None,
        rate_limit: float = 0.0,
        rate_burst: int = 20,
        auditor: Auditor | None = None,
        blocks: EmbeddedStore | None = None,
        ledger: LedgerService | None = None,
        accounts: Accounts | None = None,
        history: History | None = None,
    ) -> None:
        self.table = table
        #: Samples of the node table over the last hour (gateway/history.py); None: none kept.
        self.history = history
        #: The gateway's own credits (it pays the workers), and what each API key spent.
        self.ledger = ledger
        self.accounts = accounts
        #: The node's embedded IPFS store, served at /ipfs/ (gateway/trustless.py).
        self.blocks = blocks
        self.auditor = auditor
        self.client = client
        self.registry_info = registry_info or (lambda: {"head": None, "cid": None, "blocks": []})
        self.max_attempts = max_attempts
        self.cors_origins = ["*"] if cors_origins is None else cors_origins
        self.api_keys = frozenset(api_keys or ())
        self.limiter = RateLimiter(rate_limit, rate_burst)
        self.metrics = Metrics()
        self.started = time.time()

    def uses_route(self, request: wire.Request, mode: RouteMode = "auto") -> bool:
        """Whether ``request`` goes through a route of spans: when asked to, or when no
        full worker serves its model but span workers do (if they do not chain into a
        route, the error says which layers are missing)."""
        if mode != "auto":
            return mode == "spans"
        return not self.table.candidates(request.model) and self.table.has_spans(request.model)

    async def run(self, request: wire.Request, mode: RouteMode = "auto", account: str = "public") -> AsyncIterator[Token | Done]:
        assert self.client is not None, "gateway has no libp2p client"
        start = time.perf_counter()
        first = True
        spans = self.uses_route(request, mode)
        # A route's answer is signed by nobody, so there is nothing to hold anyone to.
        audited = not spans and self.auditor is not None and self.auditor.sample()
        if audited:
            request = dataclasses.replace(request, return_tokens=True)  # the auditor scores them
        if spans:
            source = relay_route(self.table, self.client, request, max_replacements=self.max_attempts)
        else:
            source = relay(self.table, self.client, request, max_attempts=self.max_attempts)
        async with aclosing(source) as events:
            async for event in events:
                if isinstance(event, Token) and first:
                    first = False
                    self.metrics.first_token.observe(time.perf_counter() - start)
                if isinstance(event, Done):
                    usage = event.frame.get("usage", {})
                    self.metrics.tokens.labels("prompt").inc(usage.get("prompt_tokens", 0))
                    self.metrics.tokens.labels("completion").inc(usage.get("completion_tokens", 0))
                    self.metrics.latency.observe(time.perf_counter() - start)
                    if event.attempts > 1:
                        self.metrics.failovers.inc()
                    if audited and self.auditor is not None:
                        self.auditor.submit(request, event.frame, event.node)
                    paid = event.frame.get("credits")
                    if paid is not None and self.accounts is not None:
                        self.accounts.charge(account, paid["amount_mc"])
                yield event


def _error_body(code: str, message: str) -> dict[str, Any]:
    # The OpenAI error shape, which plain clients read just as easily.
    return {"error": {"code": code, "message": message, "type": "invalid_request_error" if code in {"bad_request", "too_large"} else "server_error"}}


def _error(status: int, code: str, message: str) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(_error_body(code, message), status_code=status, headers=headers)


#: OpenAI-shaped answers carry the worker's signed statement in this header (base64 of
#: its JSON), and on the last chunk when streaming, as ``/api/generate`` does in its body.
SIGNATURE_HEADER = "x-dllm-signature"


def signature_headers(done: Done) -> dict[str, str] | None:
    """The signature header of an answer; none for an unsigned one (made by a route)."""
    if done.frame.get("signature") is None:
        return None
    return {SIGNATURE_HEADER: signature_header(done)}


def signature_header(done: Done) -> str:
    signature = done.frame.get("signature")
    return base64.b64encode(json.dumps(signature, sort_keys=True, separators=(",", ":")).encode()).decode("ascii")


def _sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


class Guard:
    """Body size, API key and rate limit for every POST, before any routing or parsing.

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` wraps every request
    in an extra task and a streaming response, which cost about 1 ms per request here.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            refusal = self.check(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
            if Headers(scope=scope).get("content-length") is None:
                # A chunked body has no length to check up front: read at most MAX_BODY
                # bytes of it, refuse past that, and hand the app what was read.
                body = await _read_at_most(receive, MAX_BODY)
                if body is None:
                    return await _error(413, "too_large", f"request body over {MAX_BODY} bytes")(scope, receive, send)
                receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> Response | None:
        """None to let the request through (its scope possibly adjusted), else the refusal."""
        gw = self.gw
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return _error(413, "too_large", f"request body over {MAX_BODY} bytes")
        client = scope["client"][0] if scope.get("client") else "unknown"
        scope.setdefault("state", {})["account"] = "public"
        if gw.api_keys:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(token, k) for k in gw.api_keys):
                return _error(401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer <key>')")
            client = "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]
            scope["state"]["account"] = client  # what this key's answers cost is kept under it
        # Every POST route takes JSON: accept it whatever the client labelled it
        # (curl -d sends application/x-www-form-urlencoded).
        if "json" not in headers.get("content-type", ""):
            kept = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope["headers"] = kept + [(b"content-type", b"application/json")]
        allowed, wait = gw.limiter.allow(client)
        if not allowed:
            response = _error(429, "rate_limited", f"too many requests; retry in {wait:.1f} s")
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        return None


async def _read_at_most(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes ``limit`` bytes (the rest unread)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client went away; the app will see an empty body
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the real one (disconnects)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay  # type: ignore[return-value]


def _path(host: Any, peer_id: str) -> str | None:
    if host is None:
        return None
    try:
        return reach.path_of(host, ID.from_base58(peer_id))
    except Exception:
        return None


def create_app(gw: Gateway) -> FastAPI:
    app = FastAPI(title="dllm-p2p gateway", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.gateway = gw
    app.add_middleware(
        CORSMiddleware,
        allow_origins=gw.cors_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"],
    )

    app.add_middleware(Guard, gateway=gw)  # outermost: refused requests cost nothing more

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg')}")
        return _error(400, "bad_request", "; ".join(problems) or "invalid request body")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, "internal", f"gateway error: {type(exc).__name__}")

    # --- generation ---------------------------------------------------------------------

    async def answer(
        endpoint: str,
        request: wire.Request,
        stream: bool,
        shape_chunk: Callable[[str], Any],
        shape_done: Callable[[Done], Any],
        shape_final: Callable[[str, Done], Any],
        done_marker: bool,
        mode: RouteMode = "auto",
        http: Request | None = None,
    ) -> Response:
        account = getattr(http.state, "account", "public") if http is not None else "public"
        request = wire.Request(**{**request.__dict__, "stream": stream})
        if not stream:
            text: list[str] = []
            try:
                async with aclosing(gw.run(request, mode, account)) as events:
                    async for event in events:
                        if isinstance(event, Token):
                            text.append(event.text)
                        else:
                            gw.metrics.requests.labels(endpoint, "200").inc()
                            headers = signature_headers(event) if done_marker else None
                            return JSONResponse(shape_final("".join(text), event), headers=headers)
            except RelayError as exc:
                gw.metrics.requests.labels(endpoint, str(exc.status)).inc()
                gw.metrics.errors.labels(exc.code).inc()
                return _error(exc.status, exc.code, exc.message)
            return _error(502, "node_failed", "no final answer")

        # Streaming: start the relay before answering, so that "no live node" and errors
        # before the first token still get a proper HTTP status instead of a 200 stream.
        events = gw.run(request, mode, account)
        try:
            first = await events.__anext__()
        except RelayError as exc:
            await events.aclose()
            gw.metrics.requests.labels(endpoint, str(exc.status)).inc()
            gw.metrics.errors.labels(exc.code).inc()
            return _error(exc.status, exc.code, exc.message)

        async def body() -> AsyncIterator[bytes]:
            async with aclosing(events):
                try:
                    event = first
                    while True:
                        if isinstance(event, Token):
                            yield _sse(shape_chunk(event.text), None if done_marker else "token")
                        else:
                            yield _sse(shape_done(event), None if done_marker else "done")
                            break
                        event = await events.__anext__()
                    gw.metrics.requests.labels(endpoint, "200").inc()
                except RelayError as exc:
                    gw.metrics.requests.labels(endpoint, "stream_error").inc()
                    gw.metrics.errors.labels(exc.code).inc()
                    yield _sse(_error_body(exc.code, exc.message) if done_marker else {"code": exc.code, "message": exc.message}, None if done_marker else "error")
                if done_marker:
                    yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/api/generate")
    async def generate(body: GenerateBody, http: Request) -> Response:
        fields = body.model_dump(exclude={"stream", "stop", "route", "prompt", "messages"})
        text: dict[str, Any] = {"prompt": body.prompt} if body.messages is None else {"messages": chat_messages(body.messages)}
        request = wire.Request(**fields, **text, stop=_stops(body.stop))

        def final(text: str, done: Done) -> dict[str, Any]:
            frame = done.frame
            return {
                "text": frame.get("text", text),
                "model": frame.get("model"),
                "fingerprint": frame.get("fingerprint"),
                "node": done.node,
                "route": done.route,
                "finish_reason": frame.get("finish_reason"),
                "usage": frame.get("usage", {}),
                "timing": frame.get("timing", {}),
                "attempts": done.attempts,
                "signature": frame.get("signature"),
                # What the answer cost this gateway (None: no receipt, e.g. a route of spans).
                "cost": _cost(frame),
            }

        return await answer(
            "generate", request, body.stream,
            shape_chunk=lambda t: {"text": t},
            shape_done=lambda d: final(d.frame.get("text", ""), d),
            shape_final=final,
            done_marker=False,
            mode=body.route,
            http=http,
        )

    def _openai_request(body: _OpenAIBase, max_tokens: int | None, **text: Any) -> wire.Request:
        return wire.Request(
            **text,
            model=body.model if body.model not in (None, "", "default") else None,
            max_new_tokens=max_tokens,
            min_new_tokens=body.min_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=_stops(body.stop),
        )

    def _provenance(done: Done) -> dict[str, Any]:
        """Who answered: ``system_fingerprint`` is the model's fingerprint (OpenAI's field
        for "which backend configuration"), ``node`` the worker's peer id, ``attempts`` how
        many workers were tried; for an answer made by spans, ``route`` (and no node)."""
        out = {"system_fingerprint": done.frame.get("fingerprint"), "node": done.node, "attempts": done.attempts, "cost": _cost(done.frame)}
        if done.route is not None:
            out["route"] = done.route
        return out

    def _signed(done: Done) -> dict[str, Any]:
        return {"signature": done.frame.get("signature")}

    def _usage(frame: dict[str, Any]) -> dict[str, int]:
        usage = frame.get("usage", {})
        p, c = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request) -> Response:
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(text: str, finish: str | None = None, model: str | None = None) -> dict[str, Any]:
            return {
                "id": cid, "object": "text_completion", "created": created, "model": model or body.model or "default",
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }

        def final(text: str, done: Done) -> dict[str, Any]:
            out = chunk(done.frame.get("text", text), done.frame.get("finish_reason", "stop"), done.frame.get("model"))
            return {**out, **_provenance(done), "usage": _usage(done.frame)}

        return await answer(
            "completions", _openai_request(body, body.max_tokens, prompt=body.prompt), body.stream,
            shape_chunk=chunk,
            shape_done=lambda d: {**chunk("", d.frame.get("finish_reason", "stop"), d.frame.get("model")), **_provenance(d), "usage": _usage(d.frame), **_signed(d)},
            shape_final=final,
            done_marker=True,
            http=http,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: Request) -> Response:
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        sent_role = False

        def chunk(text: str) -> dict[str, Any]:
            nonlocal sent_role
            delta: dict[str, Any] = {"content": text}
            if not sent_role:
                delta["role"] = "assistant"
                sent_role = True
            return {
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model or "default",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
            }

        def last_chunk(done: Done) -> dict[str, Any]:
            return {
                "id": cid, "object": "chat.completion.chunk", "created": created, "model": done.frame.get("model"),
                **_provenance(done),
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": done.frame.get("finish_reason", "stop")}],
                "usage": _usage(done.frame),
                **_signed(done),
            }

        def final(text: str, done: Done) -> dict[str, Any]:
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": done.frame.get("model"),
                **_provenance(done),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done.frame.get("text", text), "refusal": None},
                        "logprobs": None,
                        "finish_reason": done.frame.get("finish_reason", "stop"),
                    }
                ],
                "usage": _usage(done.frame),
            }

        max_tokens = body.max_completion_tokens or body.max_tokens
        return await answer(
            "chat", _openai_request(body, max_tokens, messages=chat_messages(body.messages)), body.stream,
            shape_chunk=chunk, shape_done=last_chunk, shape_final=final, done_marker=True, http=http,
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": int(gw.started), "owned_by": "dllm-p2p", **facts}
                for m, facts in gw.table.model_facts().items()
            ],
        }

    def _cost(frame: dict[str, Any]) -> dict[str, Any] | None:
        paid = frame.get("credits")
        if paid is None:
            return None
        return {"credits": paid["amount_mc"] / 1000, "millicredits": paid["amount_mc"], "receipt": paid["record"]}

    # --- network state ------------------------------------------------------------------

    @app.get("/api/credits")
    async def credits_info() -> dict[str, Any]:
        """This gateway's balance and receipts, what each API key spent, and what it knows
        of its peers' ledgers (gossiped totals, verified balances, forks)."""
        if gw.ledger is None:
            return {"enabled": False}
        return {"enabled": True, **gw.ledger.describe(), "accounts": gw.accounts.describe() if gw.accounts is not None else {}}

    @app.get("/api/nodes")
    async def nodes() -> dict[str, Any]:
        described = gw.table.describe()
        host = getattr(gw.client, "host", None)
        for node in described:
            # How this gateway reaches the node now: direct, relayed, or not connected.
            node["path"] = _path(host, node["peer_id"])
            if gw.ledger is not None:
                node["credits"] = gw.ledger.peer_credits(node["peer_id"])
        return {"nodes": described, "online": sum(1 for n in described if n["online"]), "ttl_s": gw.table.ttl}

    @app.get("/api/history")
    async def history(since: float | None = None, nodes: bool = True) -> dict[str, Any]:
        """The last hour of every node and of the gateway, as column arrays (the shape is in
        gateway/history.py); ``nodes=false``: the gateway's only; ``since``: newer samples only."""
        if gw.history is None:
            return History.empty()
        return gw.history.describe(since=since, nodes=nodes)

    @app.get("/api/history/{peer_id}")
    async def node_history(peer_id: str, since: float | None = None) -> JSONResponse:
        """One node's last hour, as in ``/api/history``; 404 for a node without one."""
        found = gw.history.node(peer_id, since=since) if gw.history is not None else None
        if found is None:
            return _error(404, "not_found", f"no history for node {peer_id}")
        return JSONResponse(found)

    @app.get("/api/spans")
    async def spans() -> dict[str, Any]:
        """Per model served by span workers (the keys): its spans, whether they chain into
        a complete route, and the route the gateway would take now (``NodeTable.spans``)."""
        return gw.table.spans()

    @app.get("/api/audits")
    async def audits() -> dict[str, Any]:
        """Audit counts and the evidence of the latest failed audits."""
        if gw.auditor is None:
            return {"rate": 0.0, "counts": {}, "evidence": []}
        return gw.auditor.describe()

    @app.get("/api/registry")
    async def registry() -> dict[str, Any]:
        return gw.registry_info()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "live_nodes": len(gw.table.online()), "uptime_s": round(time.time() - gw.started, 1)}

    @app.get("/metrics")
    async def metrics() -> Response:
        gw.metrics.live_nodes.set(len(gw.table.online()))
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    trustless.add_routes(app, lambda: gw.blocks)

    # --- the page -----------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = FRONTEND / "index.html"
        if not page.exists():
            return _error(404, "not_found", "frontend/index.html is missing")
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    if (FRONTEND / "static").is_dir():
        app.mount("/static", StaticFiles(directory=FRONTEND / "static"), name="static")
    return app
