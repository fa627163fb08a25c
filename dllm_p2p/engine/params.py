"""What a client asks for (``GenerationParams``) and what it gets back (``GenerationResult``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..wire import check_messages, check_stop

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class GenerationParams:
    """One generation request, already decoded from the wire.

    ``temperature == 0`` means greedy decoding (then ``top_p``, ``top_k`` and ``seed`` have
    no effect). ``min_new_tokens`` suppresses end-of-text until that many tokens exist, so
    benchmarks can ask for fixed lengths; it is capped at ``max_new_tokens``. An empty
    prompt is allowed: the model is then conditioned on the beginning-of-text token alone,
    as GPT-2 does for unconditional samples.

    ``messages`` (a conversation of ``{"role", "content"}`` maps) replaces ``prompt`` when
    given: the model's chat template turns it into the prompt. ``stop`` strings end the
    answer where one first appears; the stop string itself is not returned.
    """

    prompt: str
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    messages: list[dict[str, str]] | None = None
    stop: list[str] = field(default_factory=list)
    #: Queue order: a higher number is admitted first, equal numbers in arrival order
    #: (the worker passes the requester's credit balance).
    priority: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if not isinstance(self.prompt, str):
            raise ValueError("prompt must be a string")
        if self.messages is not None:
            check_messages(self.messages)
        check_stop(self.stop)
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, not {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an integer >= 0, not {self.min_new_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be a number in [0, 100], not {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], not {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), not {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, not {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationResult:
    """The outcome of one generation. Times are milliseconds since the request was submitted.

    ``text`` is exactly the concatenation of the streamed pieces. ``queue_ms`` is the wait
    before prefill started, ``first_token_ms`` the time to the first generated token
    (queueing included), ``total_ms`` the time to completion.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    queue_ms: float
    first_token_ms: float
    total_ms: float
    #: The generated token ids (end-of-text excluded), for tests and benchmarks.
    token_ids: list[int] = field(default_factory=list, repr=False)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
