"""Routes of spans: the planner on its own, and the driver against fake span workers over
real py-libp2p hosts on 127.0.0.1 (tests/spanfakes.py), failover and replay included."""

from __future__ import annotations

from contextlib import aclosing, nullcontext
from typing import Any

import pytest
import trio

from dllm_p2p import wire
from dllm_p2p.client import open_client
from dllm_p2p.route import Hop, RouteError, RouteResult, generate_route, plan_best, plan_route, replacement

from .spanfakes import FINGERPRINT, FakeSpan, expected_tokens, letter, running, tokenize


def hop(peer: str, start: int, end: int, cost: float = 10.0, fingerprint: str = "fp-a", layers: int = 30) -> Hop:
    return Hop(peer, (f"/addr/{peer}",), start, end, fingerprint, layers, 576, cost)


# --- planning -------------------------------------------------------------------------------


def test_a_route_covers_every_layer_in_order() -> None:
    candidates = [hop("c", 20, 30), hop("a", 0, 10), hop("b", 10, 20)]
    route = plan_route(candidates, 30)
    assert [h.peer_id for h in route] == ["a", "b", "c"]
    assert route[0].start == 0 and route[-1].end == 30
    assert all(x.end == y.start for x, y in zip(route, route[1:]))


def test_the_cheaper_chain_wins_and_fewer_hops_break_even_costs() -> None:
    candidates = [
        hop("slow-a", 0, 15, cost=500), hop("slow-b", 15, 30, cost=500),
        hop("fast-a", 0, 10, cost=50), hop("fast-b", 10, 20, cost=50), hop("fast-c", 20, 30, cost=50),
    ]
    assert [h.peer_id for h in plan_route(candidates, 30)] == ["fast-a", "fast-b", "fast-c"]
    even = [hop("x", 0, 15, 100), hop("y", 15, 30, 100), hop("p", 0, 10, 66), hop("q", 10, 20, 66), hop("r", 20, 30, 66)]
    assert [h.peer_id for h in plan_route(even, 30)] == ["x", "y"]  # same compute: the per-hop cost decides
    # Of two peers with the same span, the cheaper one.
    twins = [hop("a1", 0, 30, cost=300), hop("a2", 0, 30, cost=200)]
    assert [h.peer_id for h in plan_route(twins, 30)] == ["a2"]


def test_no_route_when_a_layer_is_missing_or_spans_do_not_meet() -> None:
    assert plan_route([hop("a", 0, 10), hop("c", 20, 30)], 30) == []
    # Spans are exact: 0:12 then 10:30 overlap, and a hop must start where the last ended.
    assert plan_route([hop("a", 0, 12), hop("b", 10, 30)], 30) == []
    assert plan_route([], 30) == []
    assert plan_route([hop("a", 0, 10), hop("b", 10, 30)], 30, exclude=["b"]) == []


def test_a_route_never_mixes_fingerprints() -> None:
    mixed = [hop("a", 0, 10, fingerprint="fp-a"), hop("b", 10, 30, fingerprint="fp-b")]
    assert plan_route(mixed, 30) == []
    both = mixed + [hop("c", 10, 30, fingerprint="fp-a", cost=900), hop("d", 0, 10, fingerprint="fp-b", cost=5)]
    route = plan_route(both, 30)
    assert [h.peer_id for h in route] == ["d", "b"] and {h.fingerprint for h in route} == {"fp-b"}


def test_spans_of_another_layer_count_are_ignored_and_plan_best_finds_the_model() -> None:
    candidates = [hop("a", 0, 10), hop("b", 10, 30), hop("odd", 10, 30, layers=32, cost=1)]
    assert [h.peer_id for h in plan_route(candidates, 30)] == ["a", "b"]
    assert [h.peer_id for h in plan_best(candidates)] == ["a", "b"]
    assert plan_best([hop("odd", 0, 20, layers=32)]) == []


def test_a_replacement_has_the_same_span_and_fingerprint() -> None:
    failed = hop("a", 0, 10)
    candidates = [failed, hop("b", 0, 10, cost=30), hop("c", 0, 10, cost=20), hop("d", 0, 12, cost=1), hop("e", 0, 10, fingerprint="fp-b", cost=1)]
    assert replacement(candidates, failed).peer_id == "c"  # type: ignore[union-attr]
    assert replacement(candidates, failed, exclude=["c"]).peer_id == "b"  # type: ignore[union-attr]
    assert replacement(candidates, failed, exclude=["b", "c"]) is None


# --- driving a route over real hosts ----------------------------------------------------------


async def drive(
    spans: list[FakeSpan], prompt: str, new: int, spares: list[FakeSpan] = (), client: Any = None, **options: Any  # type: ignore[assignment]
) -> tuple[list[str], RouteResult]:
    """Generate through ``spans`` (``spares`` standing by); a ``RouteError`` is raised as is,
    not wrapped in the exception group of the client's host."""
    pieces: list[str] = []
    result: RouteResult | None = None
    failure: RouteError | None = None
    async with open_client() if client is None else nullcontext(client) as client:
        request = wire.Request(prompt=prompt, max_new_tokens=new, temperature=0.0)
        route = [s.hop() for s in spans]
        candidates = route + [s.hop() for s in spares]
        with trio.fail_after(60):
            try:
                async with aclosing(generate_route(client, request, route, candidates=candidates, **options)) as events:
                    async for event in events:
                        if isinstance(event, str):
                            pieces.append(event)
                        else:
                            result = event
            except RouteError as exc:
                failure = exc
    if failure is not None:
        raise failure
    assert result is not None
    for span in [*spans, *spares]:
        assert not [e for e in span.errors if not isinstance(e, trio.Cancelled)], span.errors
    return pieces, result


async def test_a_route_of_three_spans_generates_what_the_layers_compute() -> None:
    spans = [FakeSpan(0, 1), FakeSpan(1, 2), FakeSpan(2, 3)]
    successes: list[tuple[str, int]] = []
    async with running(spans):
        pieces, result = await drive(spans, "Hello", 6, on_success=lambda h, prefill, steps, s: successes.append((h.peer_id, steps)))
    want = expected_tokens("Hello", 6)
    assert result.tokens == want and result.finish_reason == "length"
    assert pieces == [letter(t) for t in want] and result.text == "".join(pieces)
    assert result.usage == {"prompt_tokens": 5, "completion_tokens": 6}
    assert result.route == [{"peer_id": s.peer_id, "span": [s.start, s.end]} for s in spans]
    assert len(result.timing["hops_ms"]) == 3 and result.timing["total_ms"] >= result.timing["first_token_ms"] > 0
    assert result.replacements == 0 and result.fingerprint == FINGERPRINT
    # One session per span: the prompt, then one position per token fed back (the last
    # token is never fed); every stream closed cleanly, freeing the spans' caches.
    for span in spans:
        (session,) = span.sessions
        assert [r.start for r in session] == [0] + list(range(5, 10))
        assert span.closed_cleanly == 1
    assert [t for _, t in successes] == [5, 5, 5] and [p for p, _ in successes] == [s.peer_id for s in spans]


@pytest.mark.parametrize("kind", ["stop string", "end of text"])
async def test_a_stop_ends_the_answer(kind: str) -> None:
    want = expected_tokens("Hello", 20)
    stop = want[3]
    end = kind == "end of text"
    spans = [FakeSpan(0, 1), FakeSpan(1, 2), FakeSpan(2, 3, **{"end_token" if end else "stop_token": stop})]
    async with running(spans):
        pieces, result = await drive(spans, "Hello", 20)
    assert result.finish_reason == "stop"
    upto = want[: want.index(stop) + 1]
    # An end-of-text token (sent as null) is not part of the answer, as with a full worker.
    assert result.tokens == (upto[:-1] if end else upto) and result.usage["completion_tokens"] == len(result.tokens)
    assert result.text == "".join(pieces) == "".join(letter(t) for t in result.tokens)


@pytest.mark.parametrize("dies", [0, 1, 2])
async def test_a_span_that_dies_midway_is_replaced_and_its_history_replayed(dies: int) -> None:
    """The replacement gets every input the dead span had, from position 0, in its first
    forward; the answer is the one without a failure."""
    spans = [FakeSpan(0, 1), FakeSpan(1, 2), FakeSpan(2, 3)]
    spans[dies].die_after = 3  # the prompt and two tokens, then a reset on the fourth frame
    spare = FakeSpan(spans[dies].start, spans[dies].end)
    failures: list[tuple[str, str]] = []
    async with running([*spans, spare]):
        pieces, result = await drive(spans, "Hello", 8, [spare], on_failure=lambda h, code, msg: failures.append((h.peer_id, code)))
    assert result.tokens == expected_tokens("Hello", 8) and "".join(pieces) == result.text
    assert result.replacements == 1 and result.failed == [spans[dies].peer_id]
    assert failures == [(spans[dies].peer_id, "failed")]
    assert result.route[dies] == {"peer_id": spare.peer_id, "span": [spare.start, spare.end]}
    (session,) = spare.sessions
    replay = session[0]
    assert replay.start == 0
    held = 5 + 3  # the prompt and the three tokens fed back when the fourth step failed
    if dies == 0:
        assert list(replay.tokens or ()) == tokenize("Hello") + expected_tokens("Hello", 3)
    else:
        assert replay.hidden is not None and replay.hidden.shape == (held, 4)
    if dies == 2:
        assert list(replay.generated) == expected_tokens("Hello", 3)  # the tokens generated before the failed step
    else:
        assert replay.generated == ()
    assert [r.start for r in session[1:]] == list(range(held, 12))


@pytest.mark.parametrize("fault", ["hang", "error", "garbage"])
async def test_a_hanging_refusing_or_lying_span_is_replaced(fault: str) -> None:
    spans = [FakeSpan(0, 1), FakeSpan(1, 2, die_after=2, fault=fault), FakeSpan(2, 3)]
    spare = FakeSpan(1, 2)
    failures: list[str] = []
    async with running([*spans, spare]):
        _, result = await drive(spans, "Hi there", 5, [spare], step_timeout=2.0, on_failure=lambda h, code, msg: failures.append(code))
    assert result.tokens == expected_tokens("Hi there", 5) and result.replacements == 1
    assert failures == [{"hang": "timeout", "error": "busy", "garbage": "bad_reply"}[fault]]


async def test_without_a_spare_the_generation_fails_with_a_clear_error() -> None:
    spans = [FakeSpan(0, 1), FakeSpan(1, 2, die_after=2), FakeSpan(2, 3)]
    async with running(spans), open_client() as client:
        with pytest.raises(RouteError, match="span 1:2 .* no other peer serves those layers") as caught:
            await drive(spans, "Hello", 8, client=client)
        assert caught.value.code == "node_failed"
        with trio.fail_after(5):
            while not all(span.ended == 1 for span in spans):  # the driver ended every session
                await trio.sleep(0.01)


async def test_replacements_are_bounded() -> None:
    spans = [FakeSpan(0, 1), FakeSpan(1, 2, die_after=1), FakeSpan(2, 3)]
    spares = [FakeSpan(1, 2, die_after=0) for _ in range(3)]
    async with running([*spans, *spares]):
        with pytest.raises(RouteError, match="gave up after 2 replacement"):
            await drive(spans, "Hello", 8, spares, max_replacements=2)


async def test_a_long_prompt_goes_in_chunks_except_to_the_last_span() -> None:
    """Hidden states of 4096 floats a row: 128 rows make the 2 MiB a frame may carry to a
    span before the last; the last span samples on every frame, so it gets one."""
    width = 4096
    spans = [FakeSpan(0, 1, width=width), FakeSpan(1, 2, width=width, die_after=4), FakeSpan(2, 3, width=width)]
    spare = FakeSpan(1, 2, width=width)
    prompt = "abcdefghij" * 30  # 300 tokens
    async with running([*spans, spare]):
        _, result = await drive(spans, prompt, 4, [spare])
    assert result.tokens == expected_tokens(prompt, 4)
    assert [r.start for r in spans[0].sessions[0][:3]] == [0, 128, 256]
    assert [len(r.tokens or ()) for r in spans[0].sessions[0][:3]] == [128, 128, 44]
    assert [r.hidden.shape[0] for r in spans[2].sessions[0][:2]] == [300, 1]  # type: ignore[union-attr]
    # The middle span died on its 5th frame (the 2nd token): its replacement got the 301
    # positions it had in frames of at most 128, the last one ending with the current step.
    replay = spare.sessions[0]
    assert [(r.start, r.hidden.shape[0]) for r in replay[:3]] == [(0, 128), (128, 46), (174, 128)]  # type: ignore[union-attr]


async def test_a_prompt_the_last_span_cannot_take_in_one_frame_is_refused_before_any_work() -> None:
    width = 4096  # 16 KiB a row in float32: about 500 rows fit the last span's 8 MiB frame
    spans = [FakeSpan(0, 1, width=width), FakeSpan(1, 3, width=width)]
    async with running(spans):
        with pytest.raises(RouteError, match="does not fit one forward frame") as caught:
            await drive(spans, "x" * 600, 2)
    assert caught.value.code == "too_large"
    assert spans[0].forwards == 0 and spans[1].forwards == 0


# --- against the real span service (tiny-llama, in process) ----------------------------------


async def test_a_route_of_real_spans_gives_the_full_engines_tokens_even_across_a_failover(tmp_path: Any) -> None:
    """The client side of the contract against the worker side: ``ForwardService`` over
    ``SpanEngine``s on real hosts. Greedy tokens equal one full engine's, also when the last
    span dies mid-answer and a replacement replays the session."""
    from contextlib import AsyncExitStack

    from libp2p.custom_types import TProtocol

    from dllm_p2p.engine import Engine, GenerationParams, load_model
    from dllm_p2p.engine.fingerprint import fingerprint
    from dllm_p2p.engine.spans import SpanEngine
    from dllm_p2p.forwarding import ForwardService
    from dllm_p2p.host import host_addrs, make_host, parse_multiaddr
    from dllm_p2p.identity import generate

    prompt, new = "The quick brown fox", 12
    full = Engine(load_model("tiny-llama"))
    with full:
        async with full.generate(GenerationParams(prompt=prompt, max_new_tokens=new, temperature=0.0), stream=False) as generation:
            async for _ in generation:
                pass
    layers = int(full.loaded.model.config.num_hidden_layers)
    engines = []
    for span in ((0, 1), (1, layers), (1, layers)):
        loaded = load_model("tiny-llama")
        loaded.span = span
        engines.append(SpanEngine(loaded, kv_cache_mb=64))
    async with AsyncExitStack() as stack:
        hops = []
        for engine in engines:
            engine.start()
            stack.callback(engine.close)
            host = make_host(generate())
            host.set_stream_handler(TProtocol(wire.FORWARD_PROTOCOL), ForwardService(engine).handle)
            await stack.enter_async_context(host.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]))
            hops.append(Hop(host.get_id().to_base58(), tuple(host_addrs(host)), *engine.span, fingerprint(engine.loaded, tmp_path), layers, engine.hidden_size))
        client = await stack.enter_async_context(open_client())
        for kill in (False, True):
            result, pieces = None, 0
            request = wire.Request(prompt=prompt, max_new_tokens=new, temperature=0.0)
            with trio.fail_after(60):
                async with aclosing(generate_route(client, request, hops[:2], candidates=hops, step_timeout=10)) as events:
                    async for event in events:
                        pieces += 1
                        if kill and pieces == 4:
                            engines[1].close()  # the last span's engine dies: its next step fails
                        if isinstance(event, RouteResult):
                            result = event
            assert result is not None
            assert result.tokens == generation.result.token_ids and result.text == generation.result.text
            assert result.replacements == int(kill)
            assert result.route[1]["peer_id"] == hops[2 if kill else 1].peer_id
