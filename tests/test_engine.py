"""The model engine: built-in models, loading errors, and the batching scheduler.

The scheduler's tests run on every backend: on the built-in ``tiny`` model (GPT-2, through
transformers' forward), on ``tiny-llama`` (the lean decoder), a few ms per decode step, and
on SmolLM2's GGUF file on llama.cpp (``llamacpp``; skipped, saying why, where the llama.cpp
backend is not installed), about 10 ms per step. One test builds ``random:gpt2`` to check
its shape.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
import time
from collections.abc import Iterator

import pytest
import torch
import trio
import trio.testing
from transformers import AutoModelForCausalLM, AutoTokenizer

from dllm_p2p.engine import (
    Engine,
    EngineBusy,
    EngineClosed,
    GenerationFailed,
    GenerationParams,
    GenerationResult,
    LoadedModel,
    ModelLoadError,
    generate_reference,
    init_tiny,
    load_model,
    reference_token_ids,
    tiny,
)
from dllm_p2p.engine import engine as engine_module
from dllm_p2p.engine.detok import IncrementalDecoder
from dllm_p2p.engine.scoring import score_tokens
from gateway.audit import GREEDY_GAP

PROMPTS = [
    "The river",
    "In the morning the fields were white with frost, and the cattle",
    "A",
    "When you send a message across a network, it is cut into small pieces. Each piece finds its own way",
]


@pytest.fixture(scope="module", params=["tiny", "tiny-llama", "llamacpp"])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """Every engine test runs on each backend: transformers' forward (GPT-2), the lean decoder
    (Llama) and llama.cpp (SmolLM2, float16 weights: what `--quantize auto` gives it)."""
    if request.param == "llamacpp":
        from dllm_p2p.engine import llamacpp
        from dllm_p2p.models import SMOLLM2_MISSING, find_smollm2

        problem = llamacpp.available() or (SMOLLM2_MISSING if find_smollm2() is None else None)
        if problem:
            pytest.skip(problem)
        return load_model("smollm2", backend="llamacpp", quantize="f16", cache_dir=tmp_path_factory.mktemp("models"))
    return load_model(request.param)


@pytest.fixture
def engine(loaded: LoadedModel) -> Iterator[Engine]:
    # float32 weights: the greedy tests compare token for token with transformers' generate.
    with Engine(loaded, max_batch_size=4, max_queue=8, dtype="float32") as engine:
        yield engine


async def run(engine: Engine, params: GenerationParams) -> tuple[list[str], GenerationResult]:
    async with engine.generate(params) as generation:
        pieces = [piece async for piece in generation]
    assert generation.result is not None
    return pieces, generation.result


async def wait_until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


# --- built-in models ---------------------------------------------------------------------


def test_tiny_build_is_quick_and_deterministic() -> None:
    started = time.perf_counter()
    tokenizer = tiny.tiny_tokenizer.__wrapped__()
    model = tiny.tiny_model.__wrapped__()
    assert time.perf_counter() - started < 2.0

    again = tiny.tiny_tokenizer.__wrapped__()
    text = "The miller's daughter counted 12 boats; café, 日本, 🙂 and <|endoftext|>"
    assert tokenizer(text)["input_ids"] == again(text)["input_ids"]
    assert tokenizer.get_vocab() == again.get_vocab()
    assert 1000 <= len(tokenizer) <= 2048 and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless

    other = tiny.tiny_model.__wrapped__()
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.n_layer == 2 and model.config.n_positions == 512


def test_init_tiny_round_trips_through_from_pretrained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = load_model("tiny")
    path = init_tiny(tmp_path / "tiny-copy")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = PROMPTS[1] + " café"
    assert tokenizer(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, loaded.model(ids).logits, atol=1e-6)

    again = load_model(str(path))
    assert (
        again.name == "tiny-copy" and again.max_context == 512 and again.eos_token_id == loaded.eos_token_id
    )


def test_backend_choices_that_cannot_work_are_load_errors_that_say_why() -> None:
    with pytest.raises(ModelLoadError, match="runs GGUF files"):
        load_model("tiny", backend="llamacpp")
    with pytest.raises(ModelLoadError, match="--quantize needs the llama.cpp backend.*not a GGUF file"):
        load_model("tiny", quantize="q8_0")
    with pytest.raises(ModelLoadError, match="--quantize applies to the llama.cpp backend"):
        load_model("tiny", backend="torch", quantize="f16")
    with pytest.raises(ModelLoadError, match="unknown backend"):
        load_model("tiny", backend="gpu")
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load_model("/nonexistent/model.gguf", backend="llamacpp")
    from dllm_p2p.models import find_smollm2

    if find_smollm2() is not None:
        with pytest.raises(ModelLoadError, match="--layers .* needs the torch backend"):
            load_model("smollm2", backend="llamacpp", layers="0:10")


def test_a_llamacpp_library_built_for_avx512_is_refused_on_a_cpu_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from dllm_p2p.engine import llamacpp, llamacpp_build

    if llamacpp.available() is not None:
        pytest.skip(llamacpp.available())
    info = Path(llamacpp._lib().__file__).parent / "lib" / llamacpp_build.BUILD_INFO
    if not info.is_file() or "-DGGML_AVX512=ON" not in info.read_text():
        pytest.skip("this llama.cpp library was not built for AVX-512 by llamacpp_build")
    monkeypatch.setattr(llamacpp_build, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert "built for AVX-512, which this CPU lacks; run `make llamacpp`" in (llamacpp.available() or "")
    from dllm_p2p.models import find_smollm2

    if find_smollm2() is not None:
        with pytest.raises(ModelLoadError, match="make llamacpp"):
            load_model("smollm2", backend="llamacpp")


def test_random_gpt2_has_gpt2_small_shape() -> None:
    messages: list[str] = []
    loaded = load_model("random:gpt2", progress=messages.append)
    config = loaded.model.config
    assert loaded.name == "random:gpt2" and loaded.max_context == 1024
    assert (config.vocab_size, config.n_layer, config.n_embd, config.n_head) == (50257, 12, 768, 12)
    assert loaded.model.num_parameters() == 124_439_808
    # Every output id has a text, so random weights produce text to stream.
    assert len(loaded.tokenizer) == 50257 and loaded.tokenizer.decode([50256]) == " w50256"
    assert any("random weights" in m for m in messages)
    ids = torch.tensor([loaded.tokenizer("Hello")["input_ids"]])
    with torch.inference_mode():
        assert loaded.model(ids).logits.shape == (1, ids.shape[1], 50257)


# --- loading errors ----------------------------------------------------------------------


def test_uncached_hub_model_offline_fails_fast_naming_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        load_model("dllm-p2p-tests/no-such-model")
    assert time.perf_counter() - started < 10
    message = str(caught.value)
    assert "could not load model 'dllm-p2p-tests/no-such-model'" in message
    for option in (
        "--model tiny",
        "--model random:gpt2",
        "save_pretrained",
        "model init-tiny DIR",
        "HF_HUB_OFFLINE=1",
    ):
        assert option in message


def test_missing_directory_and_unknown_random_spec_are_load_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="random:gpt2"):
        load_model("random:llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="save_pretrained"):
        load_model(str(tmp_path / "empty"))


# --- generation --------------------------------------------------------------------------


async def test_greedy_batched_matches_unbatched_generate(engine: Engine, loaded: LoadedModel) -> None:
    """Rows of different lengths join at different times and leave at different times."""
    requests = [
        GenerationParams(prompt, max_new_tokens=n, temperature=0)
        for prompt, n in zip(PROMPTS, (40, 25, 33, 12), strict=True)
    ]
    requests.append(GenerationParams("", max_new_tokens=20, temperature=0))  # queued: the batch holds 4
    results: dict[int, GenerationResult] = {}

    async def one(index: int, delay: float) -> None:
        await trio.sleep(delay)
        _, results[index] = await run(engine, requests[index])

    async with trio.open_nursery() as nursery:
        for index, delay in enumerate((0, 0, 0.05, 0.1, 0)):
            nursery.start_soon(one, index, delay)

    for index, params in enumerate(requests):
        result = results[index]
        assert result.token_ids == reference_token_ids(loaded, params), params.prompt
        assert result.text == generate_reference(loaded, params)
        # What an audit checks (gateway/audit.py): scored alone, every token is the best one.
        scores = score_tokens(engine.logits, engine.vocab_size, loaded.encode(params.prompt), result.token_ids, 0)
        assert max(scores["gaps"], default=0.0) <= GREEDY_GAP, (params.prompt, scores["gaps"])
        assert result.completion_tokens == len(result.token_ids) == params.max_new_tokens
        assert result.finish_reason == "length"
        assert result.prompt_tokens == len(loaded.encode(params.prompt))
        assert 0 <= result.queue_ms <= result.first_token_ms <= result.total_ms


async def test_streamed_pieces_are_whole_characters_and_make_the_text(
    engine: Engine, loaded: LoadedModel
) -> None:
    # The untrained model emits raw byte tokens, so incomplete UTF-8 sequences are common.
    for seed in range(3):
        params = GenerationParams("日本語のテキスト 🙂", max_new_tokens=48, temperature=1.0, seed=seed)
        pieces, result = await run(engine, params)
        assert "".join(pieces) == result.text
        assert all(pieces)
        decoded = loaded.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        assert result.text == decoded.rstrip("\ufffd")  # a character cut off at the end is dropped


async def test_a_slow_reader_gets_the_waiting_pieces_joined(engine: Engine) -> None:
    params = GenerationParams(PROMPTS[1], max_new_tokens=40, min_new_tokens=40, temperature=0)
    async with engine.generate(params) as generation:
        pieces = [await generation.__anext__()]
        # Read nothing more until the engine has finished: everything since is one piece.
        await wait_until(lambda: engine.stats()["completed"] >= 1)
        # The engine counts the answer right after queueing its last hand-over to this loop:
        # let the loop run that hand-over before reading.
        await trio.testing.wait_all_tasks_blocked()
        pieces += [piece async for piece in generation]
    assert generation.result is not None
    assert len(pieces) == 2 and "".join(pieces) == generation.result.text


async def test_gather_collects_text_and_returns_when_the_generation_ends(engine: Engine) -> None:
    params = GenerationParams(PROMPTS[2], max_new_tokens=40, min_new_tokens=40, temperature=0)
    async with engine.generate(params) as generation:
        first = await generation.__anext__()
        with trio.fail_after(10):
            await generation.gather(600)  # returns with the end of the generation, not in 600 s
        rest = [piece async for piece in generation]
    assert generation.result is not None
    assert len(rest) == 1 and first + rest[0] == generation.result.text


async def test_without_stream_only_the_result_arrives(engine: Engine) -> None:
    params = GenerationParams(PROMPTS[1], max_new_tokens=24, min_new_tokens=24, temperature=0)
    async with engine.generate(params, stream=False) as generation:
        pieces = [piece async for piece in generation]
    streamed, result = await run(engine, params)
    assert pieces == [] and generation.result is not None
    assert generation.result.text == result.text == "".join(streamed) and result.completion_tokens == 24


def test_incremental_decoder_holds_back_partial_characters(loaded: LoadedModel) -> None:
    text = "naïve café 日本語 🙂🙂 done"
    decoder = IncrementalDecoder(loaded.tokenizer)
    pieces = [decoder.push(token) for token in loaded.tokenizer(text)["input_ids"]] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len([p for p in pieces if p]) > 5  # it did stream


async def test_max_new_tokens_is_respected(engine: Engine) -> None:
    _, result = await run(
        engine, GenerationParams(PROMPTS[0], max_new_tokens=7, min_new_tokens=7, temperature=0.8)
    )
    assert result.completion_tokens == 7 and result.finish_reason == "length"


async def test_min_new_tokens_suppresses_end_of_text(loaded: LoadedModel) -> None:
    # Pretend the model's first greedy choice is end-of-text, so it would stop at once.
    first = reference_token_ids(loaded, GenerationParams(PROMPTS[1], max_new_tokens=1, temperature=0))[0]
    stops_early = dataclasses.replace(loaded, eos_token_id=first, stop_token_ids=frozenset({first}))
    with Engine(stops_early, max_batch_size=2) as engine:
        pieces, result = await run(engine, GenerationParams(PROMPTS[1], max_new_tokens=30, temperature=0))
        assert (pieces, result.text, result.completion_tokens, result.finish_reason) == ([], "", 0, "stop")

        params = GenerationParams(PROMPTS[1], max_new_tokens=30, min_new_tokens=10, temperature=0)
        _, result = await run(engine, params)
        assert result.completion_tokens >= 10 and first not in result.token_ids
        assert result.token_ids == reference_token_ids(stops_early, params)


async def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    params = GenerationParams(PROMPTS[0], max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=42)
    _, alone = await run(engine, params)
    batched: dict[str, GenerationResult] = {}

    async def one(name: str, p: GenerationParams) -> None:
        batched[name] = (await run(engine, p))[1]

    async with trio.open_nursery() as nursery:  # the same request again, now batched with others
        nursery.start_soon(one, "same", params)
        nursery.start_soon(one, "other seed", dataclasses.replace(params, seed=7))
        nursery.start_soon(one, "unseeded", dataclasses.replace(params, prompt=PROMPTS[3], seed=None))
    assert batched["same"].token_ids == alone.token_ids
    assert batched["other seed"].token_ids != alone.token_ids


async def test_invalid_params_and_too_long_prompts_raise_value_error(engine: Engine, loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(GenerationParams("hi", temperature=-1))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(GenerationParams("hi", top_p=0))
    with pytest.raises(ValueError, match=rf"prompt too long: \d+ tokens, limit {loaded.max_context - 12}"):
        async with engine.generate(GenerationParams("the river " * (loaded.max_context // 2 + 50), max_new_tokens=12)):
            pass  # pragma: no cover
    assert engine.stats()["in_flight"] == 0


async def test_kv_cache_budget_queues_past_it_and_refuses_what_alone_exceeds_it(loaded: LoadedModel) -> None:
    prompt = PROMPTS[1]
    # llama.cpp rounds its cache up to 256 cells: a request must take more than half of that.
    new = 300 if loaded.backend == "llamacpp" else 60
    span = len(loaded.encode(prompt)) + new  # prompt + max_new_tokens: the cache one request may fill
    with Engine(loaded, max_batch_size=4, max_queue=4, dtype="float32", kv_cache_mb=1) as probe:
        per_token = probe._runner.kv_bytes_per_token
    budget_mb = 1.5 * span * per_token / 2**20  # room for one such request, not two
    with Engine(loaded, max_batch_size=4, max_queue=4, dtype="float32", kv_cache_mb=budget_mb) as engine:
        assert engine.kv_cache_bytes < 2 * span * per_token
        params = GenerationParams(prompt, max_new_tokens=new, min_new_tokens=new, temperature=0)
        results: list[GenerationResult] = []
        peak = 0

        async def one() -> None:
            results.append((await run(engine, params))[1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
            await wait_until(lambda: engine.stats()["in_flight"] == 2)
            while engine.stats()["in_flight"]:
                peak = max(peak, engine.stats()["running"])
                assert engine.stats()["kv_cache_mb"] <= engine.stats()["kv_cache_budget_mb"]
                await trio.sleep(0.002)
        assert peak == 1  # the second waited for the first instead of growing the cache past the budget
        first, second = sorted(results, key=lambda r: r.queue_ms)
        assert second.queue_ms >= first.total_ms - first.queue_ms - 50
        assert first.token_ids == second.token_ids and len(first.token_ids) == new

        too_many = engine.kv_cache_bytes // per_token - len(loaded.encode(prompt)) + 1
        with pytest.raises(ValueError, match=r"need [\d.]+ MB of KV cache, and its budget is [\d.]+ MB \(--kv-cache-mb\)"):
            async with engine.generate(GenerationParams(prompt, max_new_tokens=too_many)):
                pass  # pragma: no cover
        assert engine.stats()["in_flight"] == 0


async def test_engine_busy_when_batch_and_queue_are_full(loaded: LoadedModel) -> None:
    long = GenerationParams(PROMPTS[0], max_new_tokens=400, min_new_tokens=400)
    with Engine(loaded, max_batch_size=1, max_queue=1) as engine:
        async with engine.generate(long), engine.generate(long):
            with pytest.raises(EngineBusy, match="capacity"):
                async with engine.generate(long):
                    pass  # pragma: no cover
            assert engine.stats()["rejected"] == 1
            await wait_until(lambda: engine.stats()["running"] == 1 and engine.stats()["queued"] == 1)
        # Leaving both blocks cancelled them: the engine drains and accepts work again.
        await wait_until(lambda: engine.stats()["running"] == 0)
        _, result = await run(engine, GenerationParams("ok", max_new_tokens=3, min_new_tokens=3))
        assert result.completion_tokens == 3
        assert engine.stats()["cancelled"] == 2


async def test_leaving_early_frees_the_slot(loaded: LoadedModel) -> None:
    with Engine(loaded, max_batch_size=1, max_queue=0) as engine:
        long = GenerationParams(PROMPTS[0], max_new_tokens=400, min_new_tokens=400, temperature=0.7)
        async with engine.generate(long) as generation:
            async for _ in generation:
                break  # the client goes away after one piece
        assert generation.result is None
        _, result = await run(engine, GenerationParams("next", max_new_tokens=5, min_new_tokens=5))
        assert result.completion_tokens == 5

        with trio.move_on_after(0.2) as scope:  # trio cancellation mid-generation
            await run(engine, long)
        assert scope.cancelled_caught
        await wait_until(lambda: engine.stats()["running"] == 0)
        stats = engine.stats()
        assert (stats["cancelled"], stats["in_flight"], stats["queued"]) == (2, 0, 0)
        _, result = await run(engine, GenerationParams("next", max_new_tokens=5, min_new_tokens=5))
        assert result.completion_tokens == 5


async def test_an_error_fails_only_its_own_request(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    real_sample = engine_module.sample

    def flaky(logits, params, generator):  # type: ignore[no-untyped-def]
        if params.top_k == 13:
            raise RuntimeError("boom")
        return real_sample(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", flaky)
    good = GenerationParams(PROMPTS[2], max_new_tokens=20, min_new_tokens=20, temperature=0)
    bad = GenerationParams(PROMPTS[2], max_new_tokens=20, temperature=1.0, top_k=13)
    outcome: dict[str, object] = {}

    async def attempt(name: str, params: GenerationParams) -> None:
        try:
            outcome[name] = (await run(engine, params))[1]
        except GenerationFailed as exc:
            outcome[name] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attempt, "good", good)
        nursery.start_soon(attempt, "bad", bad)
    assert isinstance(outcome["bad"], GenerationFailed) and "boom" in str(outcome["bad"])
    assert isinstance(outcome["good"], GenerationResult) and outcome["good"].completion_tokens == 20
    assert engine.stats()["failed"] == 1


async def test_closed_engine_refuses_and_joins_its_thread(loaded: LoadedModel) -> None:
    engine = Engine(loaded)
    with pytest.raises(EngineClosed, match="not running"):
        async with engine.generate(GenerationParams("hi")):
            pass  # pragma: no cover
    engine.start()
    thread = engine._thread
    assert thread is not None and thread.is_alive() and not thread.daemon
    engine.close()
    assert not thread.is_alive() and engine.stats()["state"] == "closed"
    with pytest.raises(EngineClosed, match="closed"):
        async with engine.generate(GenerationParams("hi")):
            pass  # pragma: no cover


async def test_stats_report_load(engine: Engine) -> None:
    stats = engine.stats()
    assert (stats["running"], stats["queued"], stats["capacity"]) == (0, 0, 4)
    params = GenerationParams(PROMPTS[0], max_new_tokens=200, min_new_tokens=200)
    async with engine.generate(params) as generation:
        await generation.__anext__()
        assert engine.stats()["running"] == 1 and engine.stats()["in_flight"] == 1
    await wait_until(lambda: engine.stats()["running"] == 0)


# --- conversations and stop strings ----------------------------------------------------


def test_a_base_model_gets_a_role_transcript_for_messages(loaded: LoadedModel) -> None:
    if loaded.chat:
        pytest.skip("a chat model (SmolLM2) uses its template: tests/test_real_model.py")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert loaded.encode_chat(messages) == loaded.encode("System: Be brief.\nUser: Hi\nAssistant:")


async def test_stop_strings_end_the_answer_before_them(engine: Engine) -> None:
    params = GenerationParams(PROMPTS[1], max_new_tokens=40, min_new_tokens=40, temperature=0)
    _, full = await run(engine, params)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    pieces, result = await run(engine, dataclasses.replace(params, stop=["never appears", stop]))
    assert result.text == full.text[: full.text.index(stop)] == "".join(pieces)
    assert result.finish_reason == "stop" and result.completion_tokens < 40
    assert stop not in "".join(pieces)


async def test_messages_and_stop_are_validated(engine: Engine) -> None:
    for bad in (
        {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": [""]},
    ):
        with pytest.raises(ValueError):
            engine.generate(GenerationParams("x", **bad))  # type: ignore[arg-type]
