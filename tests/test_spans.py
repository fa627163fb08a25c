"""``SpanEngine`` in process: spans of tiny-llama chained by hand give the tokens of one
full engine, sessions batch together, a replacement replays a session, budgets hold."""

from __future__ import annotations

import pytest
import torch
import trio

from dllm_p2p.engine import Engine, EngineBusy, GenerationParams, RequestTooLarge, load_model
from dllm_p2p.engine.spans import Sampling, SpanEngine

PROMPTS = ["The quick brown fox", "Once upon a time", "1 2 3 4 5 6 7 8 9 10 11 12"]
NEW = 24


def _span_engine(span: tuple[int, int], **options: object) -> SpanEngine:
    loaded = load_model("tiny-llama")
    loaded.span = span
    return SpanEngine(loaded, **options)


@pytest.fixture(scope="module")
def full_tokens() -> dict[str, list[int]]:
    engine = Engine(load_model("tiny-llama"))

    async def run() -> dict[str, list[int]]:
        out = {}
        with engine:
            for prompt in PROMPTS:
                params = GenerationParams(prompt=prompt, max_new_tokens=NEW, temperature=0.0)
                async with engine.generate(params, stream=False) as generation:
                    async for _ in generation:
                        pass
                out[prompt] = generation.result.token_ids
        return out

    return trio.run(run)


async def _route(spans: list[SpanEngine], prompt_ids: list[int], new: int = NEW, sampling: Sampling | None = None) -> tuple[list[int], str]:
    sessions = [
        span.open("s", len(prompt_ids) + new, sampling=(sampling or Sampling(max_new_tokens=new, temperature=0.0)) if span.lean.last else None)
        for span in spans
    ]
    tokens, text, start, feed = [], "", 0, prompt_ids
    while True:
        result = await sessions[0].forward(start, tokens=feed)
        for session in sessions[1:]:
            result = await session.forward(start, hidden=result.hidden)
        if result.token is not None:
            tokens.append(result.token)
        text += result.text
        start += len(feed)
        feed = [result.token]
        if result.finish:
            break
    for session in sessions:
        session.close()
    return tokens, text


async def test_two_spans_give_the_full_engines_greedy_tokens(full_tokens: dict[str, list[int]]) -> None:
    spans = [_span_engine((0, 1)), _span_engine((1, 2))]
    tokenizer = spans[0].loaded
    for span in spans:
        span.start()
    try:
        results = {}

        async def one(prompt: str) -> None:
            results[prompt] = await _route(spans, tokenizer.encode(prompt))

        async with trio.open_nursery() as nursery:  # three sessions at once: they share passes
            for prompt in PROMPTS:
                nursery.start_soon(one, prompt)
        for prompt in PROMPTS:
            assert results[prompt][0] == full_tokens[prompt]
        stats = spans[1].stats()
        assert stats["steps"] > stats["passes"]  # some passes held several sessions
        assert stats["sessions"] == 0
    finally:
        for span in spans:
            span.close()


async def test_a_replacement_replays_the_session_and_goes_on_identically(full_tokens: dict[str, list[int]]) -> None:
    first, last = _span_engine((0, 1)), _span_engine((1, 2))
    spare = _span_engine((1, 2))
    for span in (first, last, spare):
        span.start()
    try:
        prompt = PROMPTS[0]
        ids = first.loaded.encode(prompt)
        head = first.open("s", len(ids) + NEW)
        tail = last.open("s", len(ids) + NEW, sampling=Sampling(max_new_tokens=NEW, temperature=0.0))
        history: list[torch.Tensor] = []
        tokens: list[int] = []
        start, feed = 0, ids
        while len(tokens) < NEW:
            hidden = (await head.forward(start, tokens=feed)).hidden
            history.append(hidden)
            if len(tokens) == 5:  # the last span "dies": replay everything to the spare
                tail.close()
                tail = spare.open("s", len(ids) + NEW, sampling=Sampling(max_new_tokens=NEW, temperature=0.0), generated=tokens)
                result = await tail.forward(0, hidden=torch.cat(history))
            else:
                result = await tail.forward(start, hidden=hidden)
            tokens.append(result.token)
            start += len(feed)
            feed = [result.token]
            if result.finish:
                break
        assert tokens == full_tokens[prompt]
    finally:
        for span in (first, last, spare):
            span.close()


async def test_sessions_are_bounded_and_checked() -> None:
    span = _span_engine((0, 1), kv_cache_mb=1 / 16, max_sessions=2)
    span.start()
    try:
        with pytest.raises(RequestTooLarge, match="the model's context"):
            span.open("big", 10**6)
        per_position = span.kv_bytes_per_token
        fits = (2**20 // 16) // per_position
        assert fits < span.loaded.max_context
        a = span.open("a", fits // 2)
        with pytest.raises(EngineBusy, match="reserved"):
            span.open("b", fits // 2 + 10)
        b = span.open("b", 8)
        with pytest.raises(EngineBusy, match="sessions"):
            span.open("c", 1)
        with pytest.raises(ValueError, match="'start' is 3"):
            await b.forward(3, tokens=[1])
        with pytest.raises(ValueError, match="token ids"):
            await b.forward(0, tokens=[10**7])
        with pytest.raises(RequestTooLarge, match="reserved 8 positions"):
            await b.forward(0, tokens=list(range(9)))
        assert (await b.forward(0, tokens=[1, 2, 3])).hidden.shape == (3, span.hidden_size)
        a.close()
        b.close()
        assert span.stats()["sessions"] == 0
        span.open("c", fits // 2 + 10).close()
    finally:
        span.close()


async def test_seeded_sampling_is_a_function_of_seed_and_position() -> None:
    spans = [_span_engine((0, 1)), _span_engine((1, 2))]
    for span in spans:
        span.start()
    try:
        ids = spans[0].loaded.encode(PROMPTS[1])
        sampled = [await _route(spans, ids, sampling=Sampling(max_new_tokens=NEW, temperature=1.0, seed=7)) for _ in range(2)]
        assert sampled[0] == sampled[1]
        other = await _route(spans, ids, sampling=Sampling(max_new_tokens=NEW, temperature=1.0, seed=8))
        assert other != sampled[0]
    finally:
        for span in spans:
            span.close()
