"""The quality check for the engine's weight formats (docs/BENCHMARKS.md, "Quality").

Teacher-forced on a fixed English text (the tiny tokenizer's corpus, 688 tokens with
SmolLM2's tokenizer): transformers' float32 forward gives the reference logits; the lean
decoder with the weights in ``dtype`` gives its own. Reported: the share of positions
whose most likely next token is the same (top-1 agreement), and both perplexities.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .lean import LeanModel
from .loading import LoadedModel
from .tiny import CORPUS


def compare(loaded: LoadedModel, dtype: str, text: str = CORPUS) -> dict[str, Any]:
    ids = torch.tensor([loaded.encode(text)])
    lean = LeanModel(loaded.model, dtype)
    with torch.inference_mode():
        reference = loaded.model(input_ids=ids).logits[0].float()
        mine = lean.logits(ids)[0]
    return _report(dtype, mine, reference, ids[0])


def compare_llamacpp(reference: LoadedModel, *models: LoadedModel, text: str = CORPUS) -> list[dict[str, Any]]:
    """The same check for GGUF models on llama.cpp (any ``--quantize``), one report each,
    against transformers' float32 forward over the same file (``reference``, the torch backend)."""
    from .llamacpp import LlamaCppRunner

    ids = torch.tensor([reference.encode(text)])
    with torch.inference_mode():
        expected = reference.model(input_ids=ids).logits[0].float()
    reports = []
    for model in models:
        runner = LlamaCppRunner(model.model, max_rows=1, kv_cells=int(ids.shape[1]) + 1)
        try:
            mine = runner.logits(ids[0].tolist())
        finally:
            runner.close()
        reports.append(_report(f"llama.cpp {model.model.weights}", mine, expected, ids[0]))
    return reports


def _report(dtype: str, mine: torch.Tensor, reference: torch.Tensor, ids: torch.Tensor) -> dict[str, Any]:
    """Logits ``mine`` against ``reference`` (both ``[tokens, vocab]``) over the text ``ids``."""
    return {
        "dtype": dtype,
        "tokens": int(ids.shape[0]),
        "top1_agreement": float((mine.argmax(-1) == reference.argmax(-1)).float().mean()),
        "perplexity": _perplexity(mine, ids),
        "reference_perplexity": _perplexity(reference, ids),
        "max_logit_difference": float((mine - reference).abs().max()),
    }


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]
    return math.exp(-float(logprobs.mean()))
