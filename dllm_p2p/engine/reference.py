"""Plain, unbatched ``model.generate``: the yardstick for the engine's correctness and speed."""

from __future__ import annotations

import torch

from .loading import LoadedModel
from .params import GenerationParams


def reference_token_ids(loaded: LoadedModel, params: GenerationParams) -> list[int]:
    """Generated token ids (end-of-text excluded) from one ``model.generate`` call.

    Sampling uses the global torch RNG, seeded from ``params.seed`` when given, so seeded
    outputs are reproducible here but are not expected to match the engine's per-request
    generators; greedy outputs (temperature 0) must match the engine token for token.
    """
    params.validate()
    if loaded.backend == "llamacpp":
        return _llamacpp_greedy(loaded, params)
    input_ids = torch.tensor([loaded.encode(params.prompt)], dtype=torch.long)
    options: dict[str, object] = {
        "max_new_tokens": params.max_new_tokens,
        "min_new_tokens": min(params.min_new_tokens, params.max_new_tokens),
        "eos_token_id": sorted(loaded.stop_token_ids) or loaded.eos_token_id,
        "pad_token_id": loaded.eos_token_id,
    }
    if params.greedy:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        options.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if params.seed is not None:
            torch.manual_seed(params.seed)
    with torch.inference_mode():
        output = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **options)
    generated = output[0, input_ids.shape[1] :].tolist()
    stops = loaded.stop_token_ids or {loaded.eos_token_id}
    for index, token in enumerate(generated):
        if token in stops:
            return generated[:index]
    return generated


def generate_reference(loaded: LoadedModel, params: GenerationParams) -> str:
    """The text ``model.generate`` produces for ``params``, decoded like the engine decodes."""
    ids = reference_token_ids(loaded, params)
    text = loaded.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.rstrip("\ufffd")  # a character cut off by the length limit is dropped


def _llamacpp_greedy(loaded: LoadedModel, params: GenerationParams) -> list[int]:
    """The same for a model on llama.cpp: one sequence alone in a context of its own, greedy."""
    from .llamacpp import LlamaCppRunner
    from .sampling import suppress

    if not params.greedy:
        raise ValueError("the llama.cpp reference is greedy only (temperature 0)")
    prompt = loaded.encode(params.prompt)
    stops = loaded.stop_token_ids or {loaded.eos_token_id}
    runner = LlamaCppRunner(loaded.model, max_rows=1, kv_cells=len(prompt) + params.max_new_tokens + 1)
    try:
        batch, logits = runner.prefill([prompt], 0)
        generated: list[int] = []
        while True:
            scores = logits[0]
            if len(generated) < params.min_new_tokens:
                suppress(scores, stops)
            token = int(scores.argmax())
            if token in stops:
                return generated
            generated.append(token)
            if len(generated) >= params.max_new_tokens:
                return generated
            logits = batch.step(torch.tensor([token]))
    finally:
        runner.close()
