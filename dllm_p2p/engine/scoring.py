"""Scoring claimed tokens: how plausible each one is as the model's continuation.

An auditor does not generate the answer again (sampling is random, batching moves the
last bits of a float); it runs the prompt and the claimed tokens through the model once
and reports, for each claimed token, where it stood in the model's distribution at that
position: its log-probability (at the request's temperature), how far below the best
token it was, its rank, and the probability mass of the tokens ranked above it (what
top-p sampling cuts at). ``gateway.audit`` turns these into a verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: Reported in place of minus infinity (a token the model rules out entirely).
FLOOR = -1e9


def score_tokens(
    logits_of: Callable[[list[int]], torch.Tensor], vocab: int, prompt_ids: list[int], tokens: list[int], temperature: float
) -> dict[str, Any]:
    """One forward pass (``logits_of``, e.g. ``Engine.logits``: the model the node serves
    with, in the dtype it serves in) over ``prompt_ids + tokens``; per token: logprob at
    ``temperature`` (1 when it is 0, greedy), gap to the best raw log-probability, rank
    (0 = the best), and the probability mass ranked above it. Blocking: call from a thread."""
    if any(not 0 <= t < vocab for t in tokens):
        raise ValueError(f"token ids must be below the vocabulary size {vocab}")
    logits = logits_of(prompt_ids + tokens[:-1])
    logits = logits[len(prompt_ids) - 1 :].float()  # row i predicts tokens[i]
    claimed = torch.tensor(tokens, dtype=torch.long)
    raw = torch.log_softmax(logits, dim=-1)
    scaled = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    mine_raw = raw.gather(1, claimed[:, None])[:, 0]
    mine_scaled = scaled.gather(1, claimed[:, None])[:, 0]
    above = scaled > mine_scaled[:, None]
    return {
        "type": "scores",
        "prompt_tokens": len(prompt_ids),
        "logprobs": [max(FLOOR, float(v)) for v in mine_scaled],
        "gaps": [min(-FLOOR, float(v)) for v in raw.max(dim=-1).values - mine_raw],
        "ranks": [int(v) for v in above.sum(dim=-1)],
        "mass_above": [float(v) for v in (scaled.exp() * above).sum(dim=-1)],
    }
