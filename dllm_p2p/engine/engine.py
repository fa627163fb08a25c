"""``Engine``: one model, one scheduler thread, continuous batching.

Why a thread: a forward pass holds the CPU for tens to hundreds of milliseconds, and the
node's trio loop must keep serving streams, heartbeats and registry sync meanwhile. Why
one: a second model thread would only compete for the same cores, and with a single
owner the KV cache and the batch need no locking. Torch releases the GIL during its
kernels, so the event loop stays responsive.

Why continuous batching: on CPU a decode step for 8 rows costs little more than for one
(the weights are read once per step either way), so throughput scales with the batch.
Requests join the running batch between decode steps (their prompts are prefilled as a
small batch of their own, then merged) and leave it the moment they finish or their
client goes away; nobody waits for the slowest member of a fixed batch.

The public contract is in ``Engine.generate`` and ``Generation``. Each request fails
alone: an exception while prefilling or sampling one request is reported to that request
only. A failed batched forward pass (which cannot be attributed to one row) fails the
rows in that batch, and the thread carries on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .batch import KVBatch, LeanRunner, make_runner
from .lean import LeanBatch

if TYPE_CHECKING:
    from .llamacpp import LlamaCppBatch
from .detok import IncrementalDecoder
from .scheduler import SchedulerThread
from .errors import EngineBusy, EngineClosed, GenerationFailed, RequestTooLarge
from .generation import Event, Generation, Request, elapsed_ms
from .loading import LoadedModel
from .params import FinishReason, GenerationParams, GenerationResult
from .sampling import make_generator, sample, suppress
from .stops import StopText

log = logging.getLogger("dllm_p2p.engine")

#: Padded prompt tokens prefilled in one forward pass before decoding resumes: bounds the
#: pause that a burst of long prompts imposes on the sequences already decoding.
PREFILL_TOKEN_BUDGET = 4096
#: How often an idle scheduler checks that the main thread is still alive.
IDLE_POLL_SECONDS = 0.5
#: Window for the ``tokens_per_second`` figure in ``stats()``.
RATE_WINDOW_SECONDS = 10.0
#: Default KV-cache budget per engine (``--kv-cache-mb``): a ceiling for the torch backends,
#: whose caches grow with the batch.
DEFAULT_KV_CACHE_MB = 1024
#: The same for llama.cpp, which allocates its whole cache up front: 256 MB holds 11,000
#: tokens of SmolLM2 (an 8,192-token conversation, or 8 rows of 1,400).
LLAMACPP_KV_CACHE_MB = 256


class Engine(SchedulerThread):
    """Serves generations for one loaded model; ``start()`` before use, ``close()`` after.

    At most ``max_batch_size`` requests decode together and at most ``max_queue`` more
    wait; beyond that ``generate`` refuses with ``EngineBusy`` so that a client can try
    another node instead of waiting here.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch_size: int = 8,
        max_queue: int = 64,
        *,
        dtype: str = "auto",
        kv_cache_mb: float | None = None,
        keep_model: bool = True,
        threads: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if kv_cache_mb is not None and not kv_cache_mb > 0:
            raise ValueError("kv_cache_mb must be > 0")
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._runner: Any
        if loaded.backend == "llamacpp":
            from .llamacpp import LlamaCppRunner

            model = loaded.model
            budget = int((kv_cache_mb or LLAMACPP_KV_CACHE_MB) * 2**20)
            cells = min(budget // model.kv_bytes_per_token, max_batch_size * loaded.max_context)
            self._runner = LlamaCppRunner(model, max_rows=max_batch_size, kv_cells=cells, threads=threads)
            #: The model's parameter count (tied weights once): what receipts price by.
            self.params = model.n_params
            self.vocab_size = model.n_vocab
            self.kv_cache_bytes = self._runner.kv_cells * model.kv_bytes_per_token
        else:
            self.params = sum(p.numel() for p in loaded.model.parameters())
            self._runner = make_runner(loaded.model, dtype)
            self.vocab_size = int(loaded.model.config.vocab_size)
            self.kv_cache_bytes = int((kv_cache_mb or DEFAULT_KV_CACHE_MB) * 2**20)
        if not keep_model and isinstance(self._runner, LeanRunner):
            # The lean decoder holds its own copy of every decoder weight: drop transformers'
            # (SmolLM2: 424 MB of float32). ``loaded.model`` then has no decoder layers.
            loaded.model.model.layers = torch.nn.ModuleList()
            _return_freed_memory()
        #: What runs the model: "lean" (lean.py), "transformers" or "llamacpp", and the weights' type.
        self.backend = self._runner.kind
        self.dtype = self._runner.dtype
        self._stop_ids = loaded.stop_token_ids or frozenset(
            [loaded.eos_token_id] if loaded.eos_token_id is not None else []
        )
        self._pad_id = loaded.eos_token_id if loaded.eos_token_id is not None else 0
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads

        self._init_scheduler(f"engine[{self.name}]")
        self._queue: deque[Request] = deque()
        self._in_flight = 0  # requests inside their ``async with`` (queued, running or finishing)
        self._running = 0  # rows in the batch, as last published by the scheduler
        self._counts = {"completed": 0, "failed": 0, "cancelled": 0, "rejected": 0, "generated_tokens": 0}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per decode step
        self._kv_in_use = 0  # projected cache bytes of the running batch (see ``_kv_need``)

        # Owned by the scheduler thread alone.
        self._batch: KVBatch | LeanBatch | LlamaCppBatch | None = None
        self._rows: list[Request] = []

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def max_context(self) -> int:
        return self.loaded.max_context

    # --- public API -------------------------------------------------------------------

    def generate(self, params: GenerationParams, stream: bool = True) -> Generation:
        """Return the handle for one request; use it as ``async with`` from a trio task.

        With ``stream=False`` the iteration yields no text pieces, only ends with the
        result: the scheduler then never wakes the event loop per token.
        Invalid parameters raise ``ValueError`` here; a full engine raises ``EngineBusy``
        and a prompt that does not fit the context raises ``ValueError`` when entering.
        """
        params.validate()
        return Generation(self, params, stream)

    def stats(self) -> dict[str, Any]:
        """A snapshot for heartbeats and ``/dllm/info``: load, capacity and counters."""
        now = time.perf_counter()
        with self._lock:
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_SECONDS:
                self._recent.popleft()
            recent_tokens = sum(tokens for _, tokens in self._recent)
            return {
                "running": self._running,
                "queued": len(self._queue),
                "capacity": self.max_batch_size,
                "max_queue": self.max_queue,
                "in_flight": self._in_flight,
                "tokens_per_second": round(recent_tokens / RATE_WINDOW_SECONDS, 2),
                "kv_cache_mb": round(self._kv_in_use / 2**20, 1),
                "kv_cache_budget_mb": round(self.kv_cache_bytes / 2**20, 1),
                "backend": self.backend,
                "weights": self.dtype,
                "state": self._state,
                **self._counts,
            }

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Float32 logits ``[len(ids), vocab]`` of one sequence, computed as generation computes
        them (for scoring claimed answers). Blocking; safe beside the scheduler thread."""
        if self.backend == "llamacpp":
            return self._runner.logits(ids)
        sequence = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            if isinstance(self._runner, LeanRunner):
                return self._runner.lean.logits(sequence)[0]
            return self.loaded.model(input_ids=sequence, attention_mask=torch.ones_like(sequence)).logits[0].float()

    # --- called from Generation (trio side) --------------------------------------------

    def _reserve(self) -> None:
        with self._lock:
            if self._state != "running":
                raise EngineClosed("engine is not running" if self._state == "new" else "engine is closed")
            if self._in_flight >= self.max_batch_size + self.max_queue:
                self._counts["rejected"] += 1
                raise EngineBusy(
                    f"node is at capacity ({self._running} generating, {len(self._queue)} queued); "
                    "try again later or another node"
                )
            self._in_flight += 1

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _encode_prompt(self, params: GenerationParams) -> list[int]:
        """Tokenize (in a worker thread) and check that prompt + new tokens fit the context."""
        with self._tokenizer_lock:
            if params.messages is not None:
                ids = self.loaded.encode_chat(params.messages)
            else:
                ids = self.loaded.encode(params.prompt)
        limit = self.max_context - params.max_new_tokens
        if len(ids) > limit:
            raise RequestTooLarge(
                f"prompt too long: {len(ids)} tokens, limit {max(limit, 0)} "
                f"(context {self.max_context} tokens minus max_new_tokens {params.max_new_tokens})"
            )
        need = self._kv_need(1, len(ids) + params.max_new_tokens)
        if need > self.kv_cache_bytes:
            raise RequestTooLarge(
                f"request too large for this node: {len(ids)} prompt tokens + max_new_tokens "
                f"{params.max_new_tokens} need {need / 2**20:.1f} MB of KV cache, and its budget is "
                f"{self.kv_cache_bytes / 2**20:.1f} MB (--kv-cache-mb)"
            )
        return ids

    def _kv_need(self, rows: int, longest: int) -> int:
        """Cache bytes of ``rows`` rows padded to ``longest`` tokens (the batch is right-aligned)."""
        return rows * longest * self._runner.kv_bytes_per_token

    def _new_request(
        self, params: GenerationParams, prompt_ids: list[int], deliver: Callable[[Event], bool], stream: bool = True
    ) -> Request:
        return Request(
            params=params,
            prompt_ids=prompt_ids,
            deliver=deliver,
            stream=stream,
            detok=IncrementalDecoder(_LockedTokenizer(self.loaded.tokenizer, self._tokenizer_lock)),
            stops=StopText(params.stop) if params.stop else None,
            generator=make_generator(params),
        )

    def _submit(self, request: Request) -> None:
        with self._lock:
            if self._state != "running":
                raise EngineClosed("engine is closed")
            # After every queued request of the same or a higher priority: the queue is
            # short (max_queue), a scan from the back is cheaper than a heap's bookkeeping.
            at = len(self._queue)
            while at > 0 and self._queue[at - 1].params.priority < request.params.priority:
                at -= 1
            self._queue.insert(at, request)
            self._wakeup.notify()

    def _cancel(self, request: Request) -> None:
        """Mark ``request`` abandoned; a queued one is removed now, a running one before the next step."""
        request.cancelled = True
        with self._lock:
            try:
                self._queue.remove(request)
            except ValueError:
                return  # running (or done): the scheduler drops it
            self._counts["cancelled"] += 1

    # --- the scheduler thread ---------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                admitted = self._next_work()
                if admitted is None:
                    break
                try:
                    if admitted:
                        self._prefill(admitted)
                    if self._rows:
                        self._decode_step()
                except Exception as exc:  # a bug in the scheduler: fail the batch, keep serving
                    log.exception("scheduler step failed")
                    for request in self._rows + admitted:
                        if not request.done:
                            self._fail(request, exc)
                    self._set_rows([])
                with self._lock:
                    self._running = len(self._rows)
        self._shutdown()

    def _next_work(self) -> list[Request] | None:
        """Wait for something to do; return requests to prefill (maybe none), or None to stop."""
        with self._lock:
            while self._state == "running" and not self._queue and not self._rows:
                self._wakeup.wait(IDLE_POLL_SECONDS)
                if not threading.main_thread().is_alive():
                    log.warning("main thread ended without Engine.close(); stopping the scheduler")
                    self._state = "closed"
            if self._state != "running":
                return None
            admitted: list[Request] = []
            longest = 0
            span = max((_span(r) for r in self._rows), default=0)
            while self._queue and len(self._rows) + len(admitted) < self.max_batch_size:
                request = self._queue[0]
                longest = max(longest, len(request.prompt_ids))
                if admitted and longest * (len(admitted) + 1) > PREFILL_TOKEN_BUDGET:
                    break
                # Past the KV budget a request waits for rows to finish (nothing alone exceeds it).
                if (self._rows or admitted) and self._kv_need(
                    len(self._rows) + len(admitted) + 1, max(span, _span(request))
                ) > self.kv_cache_bytes:
                    break
                span = max(span, _span(request))
                admitted.append(self._queue.popleft())
            self._running = len(self._rows) + len(admitted)
            self._kv_in_use = self._kv_need(self._running, span)
            return admitted

    def _prefill(self, requests: list[Request]) -> None:
        started = time.perf_counter()
        for request in requests:
            request.started = started
        try:
            batch, logits = self._runner.prefill([r.prompt_ids for r in requests], self._pad_id)
        except Exception as exc:
            if len(requests) > 1:  # find the culprit: the others deserve to run
                for request in requests:
                    self._prefill([request])
                return
            log.warning("prefill failed: %r", exc)
            self._fail(requests[0], exc)
            return
        keep = self._advance(requests, logits)
        if not keep:
            batch.close()
            return
        if len(keep) < len(requests):
            batch.select(keep)
        if self._batch is None:
            self._batch, self._rows = batch, [requests[i] for i in keep]
        else:
            self._batch.extend(batch)
            self._rows = self._rows + [requests[i] for i in keep]

    def _decode_step(self) -> None:
        live = [i for i, request in enumerate(self._rows) if not request.cancelled]
        if len(live) < len(self._rows):
            self._count(cancelled=len(self._rows) - len(live))
            self._set_rows(live)
        if self._batch is None:
            return
        tokens = torch.tensor([request.generated[-1] for request in self._rows], dtype=torch.long)
        try:
            logits = self._batch.step(tokens)
        except Exception as exc:
            log.exception("decode step failed for a batch of %d", len(self._rows))
            for request in self._rows:
                self._fail(request, exc)
            self._set_rows([])
            return
        self._set_rows(self._advance(self._rows, logits))

    def _advance(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        """Sample one token per row and apply it; return the indices of rows still generating."""
        keep = []
        generated = 0
        for row, request in enumerate(requests):
            if request.cancelled:
                self._count(cancelled=1)
                continue
            try:
                scores = logits[row]
                if len(request.generated) < request.params.min_new_tokens:
                    suppress(scores, self._stop_ids)
                token = sample(scores, request.params, request.generator)
                generated += 1
                if self._accept(request, token):
                    keep.append(row)
            except Exception as exc:
                log.warning("sampling failed: %r", exc)
                self._fail(request, exc)
        now = time.perf_counter()
        with self._lock:
            self._counts["generated_tokens"] += generated
            self._recent.append((now, generated))
            while now - self._recent[0][0] > RATE_WINDOW_SECONDS:
                self._recent.popleft()
        return keep

    def _accept(self, request: Request, token: int) -> bool:
        """Record ``token`` for ``request``, stream its text, and finish it if it is done."""
        if not request.first_token:
            request.first_token = time.perf_counter()
        if token in self._stop_ids:
            self._finish(request, "stop")
            return False
        self._send_text(request, request.detok.push(token))
        if request.stops is not None and request.stops.matched is not None:
            self._finish(request, "stop")
            return False
        produced = len(request.generated)
        if (
            produced >= request.params.max_new_tokens
            or len(request.prompt_ids) + produced >= self.max_context
        ):
            self._finish(request, "length")
            return False
        return True

    def _send_text(self, request: Request, piece: str, *, last: bool = False) -> None:
        """Stream a decoded piece, minus whatever a stop string may yet claim."""
        if request.stops is not None:
            piece = request.stops.push(piece) + (request.stops.flush() if last else "")
        if piece:
            request.pieces.append(piece)
            if request.stream:
                request.emit(piece)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        stops = request.stops
        if stops is None or stops.matched is None:
            self._send_text(request, request.detok.flush(), last=True)
            if stops is not None and stops.matched is not None:
                reason = "stop"  # the held-back tail completed a stop string
        now = time.perf_counter()
        request.done = True
        result = GenerationResult(
            text="".join(request.pieces),
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(request.generated),
            finish_reason=reason,
            queue_ms=elapsed_ms(request.submitted, request.started),
            first_token_ms=elapsed_ms(request.submitted, request.first_token or now),
            total_ms=elapsed_ms(request.submitted, now),
            token_ids=list(request.generated),
        )
        request.emit(result)
        self._count(completed=1)

    def _fail(self, request: Request, exc: BaseException) -> None:
        request.done = True
        if not isinstance(exc, GenerationFailed):
            failure = GenerationFailed(f"generation failed: {exc!r}")
            failure.__cause__ = exc
            exc = failure
        request.emit(exc)
        self._count(failed=1)

    def _set_rows(self, keep: list[int]) -> None:
        if not keep or self._batch is None:
            if self._batch is not None:
                self._batch.close()
            self._batch, self._rows = None, []
        elif len(keep) < len(self._rows):
            self._batch.select(keep)
            self._rows = [self._rows[i] for i in keep]
        with self._lock:
            self._running = len(self._rows)
            self._kv_in_use = self._kv_need(len(self._rows), max((_span(r) for r in self._rows), default=0))

    def _count(self, **increments: int) -> None:
        with self._lock:
            for key, value in increments.items():
                self._counts[key] += value

    def _shutdown(self) -> None:
        with self._lock:
            self._state = "closed"
            queued = list(self._queue)
            self._queue.clear()
        for request in self._rows + queued:
            if not request.done and not request.cancelled:
                request.done = True
                request.emit(EngineClosed("engine closed before the generation finished"))
        self._set_rows([])
        close = getattr(self._runner, "close", None)
        if close is not None:
            close()


def _return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise: a worker serving SmolLM2
    stayed at 1,417 MB resident instead of 945 MB). A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _span(request: Request) -> int:
    """The most cache columns ``request`` can occupy: its prompt plus every token it may generate."""
    return len(request.prompt_ids) + request.params.max_new_tokens


class _LockedTokenizer:
    """The decoding half of a tokenizer, serialised with the prompt encoder's lock."""

    def __init__(self, tokenizer: Any, lock: threading.Lock) -> None:
        self._tokenizer = tokenizer
        self._lock = lock

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        with self._lock:
            return self._tokenizer.decode(ids, **kwargs)
