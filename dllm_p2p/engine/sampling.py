"""Choosing the next token for one sequence, with that request's own parameters and RNG.

Rows of a batch belong to different clients, so sampling is done row by row: each row has
its own temperature, top-k, top-p and ``torch.Generator``. A seeded request therefore
draws the same random numbers whatever else is in the batch. The order of the warpers
(temperature, then top-k, then top-p) is the one ``transformers.generate`` uses.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import torch

from .params import GenerationParams


def make_generator(params: GenerationParams) -> torch.Generator | None:
    """A per-request RNG: seeded when the client asked for reproducibility, fresh otherwise."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator().manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)


def suppress(logits: torch.Tensor, token_ids: Iterable[int]) -> None:
    """Make ``token_ids`` impossible (in place), e.g. end-of-text before ``min_new_tokens``."""
    ids = [i for i in token_ids if 0 <= i < logits.shape[-1]]
    if ids:
        logits[ids] = -float("inf")


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """Pick a token id from one row of float32 logits (shape ``[vocab]``)."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, -float("inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best is always kept).
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= params.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, -float("inf"))
    probs = torch.softmax(scores, dim=-1)
    if not torch.isfinite(probs).all():
        raise ValueError("the model produced non-finite scores")
    return int(torch.multinomial(probs, 1, generator=generator))
