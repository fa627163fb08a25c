"""``SpanEngine``: serve a span of a model's layers to many sessions at once.

A worker started with ``--layers START:END`` holds decoder layers ``START..END-1`` only
(``lean.LeanModel`` with a span) and clients drive generations through it one step at a
time over ``/dllm/forward/1.0.0`` (docs/PROTOCOL.md). Each such generation is a
*session*: its own KV cache, reserved for the positions the client declared, freed when
the client closes it.

Why one scheduler thread, as ``Engine``: a pass holds the CPU for milliseconds to seconds
and the trio loop must keep serving. Why batch: a step of one session reads every weight
of the span, and so does a step of eight; the thread takes every step that is waiting and
runs them as one ragged pass (``LeanModel.forward_sessions``), so sessions that arrive
while a pass runs share the next one. A long prompt is cut to ``MAX_PASS_TOKENS`` per pass
by its client, not here, so one pass never holds everyone else for long.

The span that holds the LM head also picks the next token (greedy or sampled with the
session's parameters), turns it into text and applies stop strings: the client needs no
model, tokenizer or torch to generate through a route.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from .batch import _kv_bytes_per_token
from .detok import IncrementalDecoder
from .engine import _LockedTokenizer, _return_freed_memory
from .scheduler import SchedulerThread
from .errors import EngineBusy, EngineClosed, RequestTooLarge
from .lean import Cache, LeanModel, SessionInput
from .loading import LoadedModel
from .quant import WEIGHT_DTYPES, float16_available
from .sampling import sample, suppress
from .stops import StopText

log = logging.getLogger("dllm_p2p.engine")

#: Default cap on open sessions (``--max-sessions``).
DEFAULT_MAX_SESSIONS = 64
#: New positions (summed over sessions) run in one pass; more wait for the next pass.
MAX_PASS_TOKENS = 4096
#: Window for ``tokens_per_second`` in ``stats()``.
RATE_WINDOW_SECONDS = 10.0
#: The dtypes hidden states may travel in.
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Sampling:
    """How the last span picks tokens for one session (``sample`` in the protocol)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, position: int) -> torch.Generator | None:
        """The RNG for the token at ``position``: a function of the seed and the position only,
        so a replacement span that replays the session draws what the failed one would have."""
        if self.greedy:
            return None
        return torch.Generator().manual_seed((self.seed * 1_000_003 + position) & 0xFFFF_FFFF_FFFF_FFFF)


@dataclass
class StepResult:
    """What one forward step produced for its session."""

    length: int
    hidden: torch.Tensor | None = None  # [T, hidden] in the session's wire dtype (not the last span)
    token: int | None = None  # the last span's pick
    text: str = ""
    finish: str | None = None


@dataclass
class _Step:
    session: SpanSession
    item: SessionInput
    token: trio.lowlevel.TrioToken
    done: trio.Event = field(default_factory=trio.Event)
    result: StepResult | None = None
    error: BaseException | None = None

    def deliver(self) -> None:
        try:
            self.token.run_sync_soon(self.done.set)
        except trio.RunFinishedError:
            pass


class SpanSession:
    """One client's generation through this span: its cache and, on the last span, its
    sampling, text and stop state. Created by ``SpanEngine.open``; ``close`` frees it."""

    def __init__(
        self,
        engine: SpanEngine,
        session_id: str,
        max_length: int,
        wire_dtype: str,
        sampling: Sampling | None,
        generated: list[int],
    ) -> None:
        self.engine = engine
        self.id = session_id
        self.max_length = max_length
        self.reserved = max_length * engine.kv_bytes_per_token
        self.wire_dtype = WIRE_DTYPES[wire_dtype]
        self.cache = Cache(engine.lean, 1, 1)
        self.length = 0
        self.last_used = time.monotonic()
        self.closed = False
        self.sampling = sampling
        self.generated: list[int] = []
        self._decoder: IncrementalDecoder | None = None
        self._stops: StopText | None = None
        if engine.lean.last:
            if sampling is None:
                raise ValueError("the last span needs 'sample' in the session's first frame")
            if sampling.seed is None:
                sampling.seed = secrets.randbits(62)
            self._decoder = IncrementalDecoder(_LockedTokenizer(engine.loaded.tokenizer, engine.tokenizer_lock))
            self._stops = StopText(sampling.stop)
            for token in generated:  # a replacement: rebuild the text state, emit nothing
                self._accept(token)

    async def forward(self, start: int, *, tokens: list[int] | None = None, hidden: torch.Tensor | None = None) -> StepResult:
        """Run new positions ``start..`` through the span; wait for the pass that includes them."""
        if self.closed:
            raise EngineClosed("session is closed")
        if start != self.length:
            raise ValueError(f"'start' is {start}, but the session holds {self.length} positions")
        lean = self.engine.lean
        if lean.first:
            if tokens is None or hidden is not None:
                raise ValueError("the first span takes 'tokens', not 'hidden'")
            if not tokens:
                raise ValueError("'tokens' is empty")
            vocab = lean.embed.shape[0]
            if any(not 0 <= t < vocab for t in tokens):
                raise ValueError(f"token ids must be in [0, {vocab})")
            item = SessionInput(self.cache, start, tokens=torch.tensor(tokens, dtype=torch.long))
        else:
            if hidden is None or tokens is not None:
                raise ValueError("this span takes 'hidden', not 'tokens'")
            if hidden.ndim != 2 or hidden.shape[1] != lean.hidden or hidden.shape[0] < 1:
                raise ValueError(f"'hidden' must have shape [T, {lean.hidden}], not {list(hidden.shape)}")
            item = SessionInput(self.cache, start, hidden=hidden)
        if start + item.steps > self.max_length:
            raise RequestTooLarge(f"the session reserved {self.max_length} positions; this step would reach {start + item.steps}")
        step = _Step(self, item, trio.lowlevel.current_trio_token())
        self.engine._submit(step)
        await step.done.wait()
        self.last_used = time.monotonic()
        if step.error is not None:
            raise step.error
        assert step.result is not None
        return step.result

    def close(self) -> None:
        """Free the cache and the reservation (idempotent)."""
        self.engine._release(self)

    # --- scheduler thread ------------------------------------------------------------

    def _pick(self, logits: torch.Tensor) -> StepResult:
        sampling = self.sampling
        assert sampling is not None and self._decoder is not None
        if len(self.generated) < sampling.min_new_tokens:
            suppress(logits, self.engine.stop_ids)
        token = sample(logits, sampling, sampling.generator(self.length))  # type: ignore[arg-type]
        if token in self.engine.stop_ids:  # the model ended its answer: not a token of it
            return StepResult(self.length, token=None, text=self._finish_text(), finish="stop")
        text, finish = self._accept(token)
        if finish is None and (
            len(self.generated) >= sampling.max_new_tokens or self.length + 1 >= self.engine.loaded.max_context
        ):
            finish = "length"
            text += self._finish_text()
        return StepResult(self.length, token=token, text=text, finish=finish)

    def _accept(self, token: int) -> tuple[str, str | None]:
        """Take ``token`` as the next one of the answer; return its text and whether it ends it."""
        assert self._decoder is not None and self._stops is not None
        self.generated.append(token)
        text = self._stops.push(self._decoder.push(token))
        if self._stops.matched is not None:
            return text, "stop"
        return text, None

    def _finish_text(self) -> str:
        assert self._decoder is not None and self._stops is not None
        if self._stops.matched is not None:
            return ""
        return self._stops.push(self._decoder.flush()) + self._stops.flush()


class SpanEngine(SchedulerThread):
    """Serves one span of one loaded model; ``start()`` before use, ``close()`` after.

    ``kv_cache_mb`` bounds the KV cache of all sessions together: a session reserves its
    declared ``max_length`` at open (``EngineBusy`` when the reservations would exceed the
    budget now, ``RequestTooLarge`` when the session alone would).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        dtype: str = "auto",
        kv_cache_mb: float = 1024,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        if dtype not in ("auto", *WEIGHT_DTYPES):
            raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(WEIGHT_DTYPES)}")
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        if not kv_cache_mb > 0:
            raise ValueError("kv_cache_mb must be > 0")
        reason = LeanModel.supports(loaded.model)
        if reason:
            raise ValueError(f"serving a span needs a Llama-family model: {reason}")
        if dtype == "auto":
            dtype = "float16" if float16_available() else "float32"
        self.loaded = loaded
        total = int(loaded.model.config.num_hidden_layers)
        self.span = getattr(loaded, "span", None) or (0, total)
        self.lean = LeanModel(loaded.model, dtype, self.span)
        # The lean copy is what runs: drop transformers' float32 layers and head.
        loaded.model.model.layers = torch.nn.ModuleList()
        if self.lean.last:
            loaded.model.lm_head = torch.nn.Identity()
        if not self.lean.first:
            loaded.model.model.embed_tokens = torch.nn.Identity()
        _return_freed_memory()
        self.dtype = dtype
        self.total_layers = total
        self.kv_bytes_per_token = _kv_bytes_per_token(loaded.model.config) * (self.span[1] - self.span[0]) // total
        self.kv_cache_bytes = int(kv_cache_mb * 2**20)
        self.max_sessions = max_sessions
        self.stop_ids = loaded.stop_token_ids or frozenset(
            [loaded.eos_token_id] if loaded.eos_token_id is not None else []
        )
        #: Hugging Face fast tokenizers are not safe to share across threads: the scheduler
        #: detokenizes while a stream handler may tokenize the next prompt.
        self.tokenizer_lock = threading.Lock()
        self._init_scheduler(f"span[{self.name} {self.span[0]}:{self.span[1]}]")
        self._pending: deque[_Step] = deque()
        self._sessions: dict[int, SpanSession] = {}
        self._reserved = 0
        self._counts = {"sessions_opened": 0, "steps": 0, "positions": 0, "generated_tokens": 0, "passes": 0}
        self._recent: deque[tuple[float, int]] = deque()

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def hidden_size(self) -> int:
        return self.lean.hidden

    def open(
        self,
        session_id: str,
        max_length: int,
        *,
        wire_dtype: str = "float32",
        sampling: Sampling | None = None,
        generated: list[int] | None = None,
    ) -> SpanSession:
        """Reserve a session's cache; ``EngineBusy`` when full now, ``RequestTooLarge`` when never."""
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}")
        if not 1 <= max_length <= self.loaded.max_context:
            raise RequestTooLarge(f"max_length {max_length} is outside 1..{self.loaded.max_context} (the model's context)")
        need = max_length * self.kv_bytes_per_token
        if need > self.kv_cache_bytes:
            raise RequestTooLarge(
                f"a session of {max_length} positions needs {need / 2**20:.1f} MiB of KV cache; "
                f"this span's budget is {self.kv_cache_bytes / 2**20:.1f} MiB"
            )
        session = SpanSession(self, session_id, max_length, wire_dtype, sampling, list(generated or []))
        with self._lock:
            if self._state != "running":
                raise EngineClosed("engine is not running")
            if len(self._sessions) >= self.max_sessions:
                raise EngineBusy(f"this span holds {len(self._sessions)} sessions, its maximum; try another peer")
            if self._reserved + need > self.kv_cache_bytes:
                raise EngineBusy(
                    f"this span's KV cache is reserved ({self._reserved / 2**20:.1f} of "
                    f"{self.kv_cache_bytes / 2**20:.1f} MiB); try another peer"
                )
            self._sessions[id(session)] = session
            self._reserved += need
            self._counts["sessions_opened"] += 1
        return session

    def stats(self) -> dict[str, Any]:
        now = time.perf_counter()
        with self._lock:
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_SECONDS:
                self._recent.popleft()
            return {
                "sessions": len(self._sessions),
                "max_sessions": self.max_sessions,
                # The names routing reads for any worker: occupancy and its bound.
                "running": len(self._sessions),
                "capacity": self.max_sessions,
                "queued": len(self._pending),
                "kv_cache_mb": round(sum(s.cache.data.nbytes for s in self._sessions.values()) / 2**20, 1),
                "kv_cache_reserved_mb": round(self._reserved / 2**20, 1),
                "kv_cache_budget_mb": round(self.kv_cache_bytes / 2**20, 1),
                "tokens_per_second": round(sum(n for _, n in self._recent) / RATE_WINDOW_SECONDS, 2),
                "backend": "lean",
                "weights": self.dtype,
                "state": self._state,
                **self._counts,
            }

    # --- trio side -------------------------------------------------------------------

    def _submit(self, step: _Step) -> None:
        with self._lock:
            if self._state != "running":
                raise EngineClosed("engine is not running")
            self._pending.append(step)
            self._wakeup.notify()

    def _release(self, session: SpanSession) -> None:
        with self._lock:
            if self._sessions.pop(id(session), None) is not None:
                self._reserved -= session.reserved
            session.closed = True
        # The cache goes with the last reference to the session (a pass may still hold it).

    # --- scheduler thread ------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while self._state == "running" and not self._pending:
                    self._wakeup.wait(0.5)
                if self._state != "running":
                    failed, self._pending = list(self._pending), deque()
                    break
                batch = self._take()
            self._pass(batch)
        for step in failed:
            step.error = EngineClosed("engine closed")
            step.deliver()

    def _take(self) -> list[_Step]:
        """Waiting steps for one pass: up to ``MAX_PASS_TOKENS`` positions, at least one step."""
        batch: list[_Step] = []
        positions = 0
        while self._pending:
            step = self._pending[0]
            if batch and positions + step.item.steps > MAX_PASS_TOKENS:
                break
            batch.append(self._pending.popleft())
            positions += step.item.steps
        return batch

    def _pass(self, batch: list[_Step]) -> None:
        live = [step for step in batch if not step.session.closed]
        for step in batch:
            if step.session.closed:
                step.error = EngineClosed("session is closed")
                step.deliver()
        if not live:
            return
        with torch.inference_mode():
            try:
                outputs = self.lean.forward_sessions([step.item for step in live])
            except Exception as exc:  # a failed pass fails its steps, not the thread
                log.warning("span pass failed: %r", exc)
                for step in live:
                    step.error = exc
                    step.deliver()
                return
            generated = 0
            for step, output in zip(live, outputs, strict=True):
                session = step.session
                try:
                    session.length += step.item.steps
                    if self.lean.last:
                        step.result = session._pick(output)
                        generated += 1
                    else:
                        step.result = StepResult(session.length, hidden=output.to(session.wire_dtype))
                except Exception as exc:
                    log.warning("span step failed: %r", exc)
                    step.error = exc
                step.deliver()
        now = time.perf_counter()
        with self._lock:
            self._counts["passes"] += 1
            self._counts["steps"] += len(live)
            self._counts["positions"] += sum(step.item.steps for step in live)
            self._counts["generated_tokens"] += generated
            self._recent.append((now, generated or sum(step.item.steps for step in live)))
