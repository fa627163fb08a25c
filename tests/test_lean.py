"""The lean decoder (``engine/lean.py``) against transformers' own forward, on tiny random
Llama, Mistral and Qwen2 models: same logits for ragged batches, across rows leaving and
joining and the cache growing; float16 weights within rounding of float32."""

from __future__ import annotations

import pytest
import torch

from dllm_p2p.engine.batch import KVBatch, ModelRunner, make_runner
from dllm_p2p.engine.lean import CACHE_CHUNK, LeanBatch, LeanModel
from dllm_p2p.engine.quant import float16_available
from dllm_p2p.engine.tiny import tiny_decoder, tiny_model

PROMPTS = [[5, 17, 230, 44, 9, 301, 12], [800, 3], [41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51]]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_lean_matches_transformers_across_joins_leaves_and_cache_growth(kind: str) -> None:
    model = tiny_decoder(kind, **({"sliding_window": None} if kind == "mistral" else {}))
    lean = LeanModel(model, "float32")
    runner = ModelRunner(model)
    with torch.inference_mode():
        hf, hf_logits = KVBatch.prefill(runner, PROMPTS, 0)
        mine, my_logits = LeanBatch.prefill(lean, PROMPTS, 0)
        assert torch.allclose(my_logits, hf_logits, atol=1e-5)
        tokens = hf_logits.argmax(-1)
        for step in range(CACHE_CHUNK + 20):  # past the first cache allocation
            if step == 3:  # the middle row leaves
                hf.select([0, 2])
                mine.select([0, 2])
                tokens = tokens[[0, 2]]
            if step == 6:  # a longer prompt joins
                joined = [7] * 14
                hf_new, hf_first = KVBatch.prefill(runner, [joined], 0)
                my_new, my_first = LeanBatch.prefill(lean, [joined], 0)
                assert torch.allclose(my_first, hf_first, atol=1e-5)
                hf.extend(hf_new)
                mine.extend(my_new)
                tokens = torch.cat([tokens, hf_first.argmax(-1)])
            hf_logits = hf.step(tokens)
            my_logits = mine.step(tokens)
            assert torch.allclose(my_logits, hf_logits, atol=1e-4), step
            tokens = hf_logits.argmax(-1)
        assert mine.cache.capacity > CACHE_CHUNK


@pytest.mark.skipif(not float16_available(), reason="this PyTorch build has no FBGEMM")
def test_float16_weights_halve_the_bytes_and_stay_within_rounding() -> None:
    model = tiny_decoder("llama")
    full, half = LeanModel(model, "float32"), LeanModel(model, "float16")
    linear_bytes = sum(lin.nbytes for layer in full.layers for lin in layer.linears())
    assert sum(lin.nbytes for layer in half.layers for lin in layer.linears()) == linear_bytes // 2
    with torch.inference_mode():
        _, a = LeanBatch.prefill(full, PROMPTS, 0)
        _, b = LeanBatch.prefill(half, PROMPTS, 0)
    assert torch.allclose(a, b, atol=2e-3)
    assert not torch.equal(a, b)  # the float16 path really ran


def test_models_the_lean_decoder_cannot_run_say_why_and_use_transformers() -> None:
    assert "gpt2" in (LeanModel.supports(tiny_model()) or "")
    windowed = tiny_decoder("mistral", sliding_window=16)
    assert "sliding-window" in (LeanModel.supports(windowed) or "")
    assert make_runner(tiny_model()).kind == "transformers"
    assert make_runner(windowed).kind == "transformers"
    with pytest.raises(ValueError, match="float16 needs the lean decoder"):
        make_runner(tiny_model(), "float16")
    with pytest.raises(ValueError, match="unknown dtype"):
        make_runner(tiny_decoder("llama"), "int3")
    assert make_runner(tiny_decoder("llama"), "float32").kind == "lean"


def test_a_worker_engine_drops_transformers_layers_and_still_generates_and_scores() -> None:
    import trio

    from dllm_p2p.engine import Engine, GenerationParams, load_model
    from dllm_p2p.engine.scoring import score_tokens

    reference = load_model("tiny-llama")
    with torch.inference_mode():
        expected = reference.model(input_ids=torch.tensor([PROMPTS[0]])).logits[0]
    loaded = load_model("tiny-llama")
    with Engine(loaded, dtype="float32", keep_model=False) as engine:
        assert len(loaded.model.model.layers) == 0  # transformers' copy of the decoder weights is gone
        assert torch.allclose(engine.logits(PROMPTS[0]), expected, atol=1e-5)

        async def generate() -> list[int]:
            async with engine.generate(GenerationParams("The river", max_new_tokens=8, temperature=0), stream=False) as g:
                async for _ in g:
                    pass
            assert g.result is not None
            return g.result.token_ids

        tokens = trio.run(generate)
        scores = score_tokens(engine.logits, engine.vocab_size, loaded.encode("The river"), tokens, 0.0)
        assert scores["ranks"] == [0] * len(tokens)  # greedy tokens are each the best by the serving model
