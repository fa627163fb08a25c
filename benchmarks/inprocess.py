"""The in-process contenders: ``model.generate``, the batching engine, and the raw batched loop.

One torch thread at a time. PyTorch's CPU build parallelises with GNU OpenMP, which keeps
one thread pool per thread that has run a parallel region. Once two such threads are
alive in a process (say the main thread and an engine thread), the pools together manage
more threads than there are CPUs, libgomp stops spinning at its barriers and sleeps
instead, and every forward pass gets about 2x slower, even while the other thread is idle
(measured here: a 32-token decode loop of random:gpt2 on 2 cores, 1.2 s alone, 2.1 s with
an idle engine thread alive, 1.25 s again once that thread has exited). A worker process
has a single torch thread, its engine's. So every in-process contender runs in a thread
of its own that has exited before the next one starts: ``in_fresh_thread`` for generate
and the raw loop, a new ``Engine`` per request for the engine.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from transformers import DynamicCache

from dllm_p2p.engine import Engine, GenerationParams, LoadedModel, reference_token_ids

from .measure import Sample

T = TypeVar("T")


def in_fresh_thread(function: Callable[..., T], *args: Any) -> T:
    """Run ``function(*args)`` in a new thread and wait for that thread to end (see above)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # re-raised in the caller
            outcome["error"] = exc

    # Daemon: a Ctrl-C in the caller must not wait for a long forward pass to finish.
    thread = threading.Thread(target=target, name="bench-torch", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def params_for(prompt: str, new_tokens: int) -> GenerationParams:
    """Greedy, exactly ``new_tokens`` tokens (end-of-text suppressed until then)."""
    return GenerationParams(prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0)


def time_generate(loaded: LoadedModel, params: GenerationParams) -> Sample:
    """One ``model.generate`` call plus decoding: exactly what ``generate_reference`` does."""
    started = time.perf_counter()
    ids = reference_token_ids(loaded, params)
    loaded.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return Sample(time.perf_counter() - started, len(ids))


async def time_engine(engine: Engine, params: GenerationParams) -> Sample:
    """One request through the batching engine in this process, from submission to result.

    The clock covers what a worker does for a non-streaming request apart from the
    network: prompt tokenization, queueing, prefill, decode steps, incremental
    detokenization and the hand-over of the result to the trio task (like the worker, it
    asks for no text pieces: ``stream=False``).
    """
    started = time.perf_counter()
    async with engine.generate(params, stream=False) as generation:
        async for _ in generation:
            pass
    elapsed = time.perf_counter() - started
    result = generation.result
    assert result is not None
    return Sample(elapsed, result.completion_tokens, engine_ms=result.total_ms)


async def time_fresh_engine(loaded: LoadedModel, params: GenerationParams, max_batch_size: int) -> Sample:
    """``time_engine`` on an engine started for this one request and closed after it.

    Starting an engine costs a thread start (microseconds) and is outside the clock.
    """
    engine = Engine(loaded, max_batch_size=max_batch_size, max_queue=8)
    engine.start()
    try:
        return await time_engine(engine, params)
    finally:
        engine.close()


class RawLoop:
    """``rows`` copies of a prompt: one prefill, then a greedy decode loop over the KV cache.

    No scheduler, no sampling options, no detokenization, no stop tokens: plain forward
    passes and an argmax, the most this model gives on this hardware with PyTorch eager.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.loaded = loaded
        names = set(inspect.signature(self.model.forward).parameters)
        # transformers 5.x renamed past_key_values to cache; use whichever this version has.
        self._cache_kw = "cache" if "cache" in names else "past_key_values"
        self._extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in names else {}

    def _new_cache(self) -> DynamicCache:
        try:
            return DynamicCache(config=self.model.config)
        except TypeError:
            return DynamicCache()

    def run(self, prompt: str, rows: int, new_tokens: int) -> Sample:
        ids = torch.tensor([self.loaded.encode(prompt)] * rows, dtype=torch.long)
        with torch.inference_mode():
            started = time.perf_counter()
            cache = self._new_cache()
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_kw: cache}, **self._extra)
            token = out.logits[:, -1, :].argmax(dim=-1)
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=token[:, None], use_cache=True, **{self._cache_kw: cache}, **self._extra)
                token = out.logits[:, -1, :].argmax(dim=-1)
            elapsed = time.perf_counter() - started
        return Sample(elapsed, rows * new_tokens)
