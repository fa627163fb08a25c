"""The engine's exceptions, as one small hierarchy.

Callers mostly need three distinctions: the node is full (try another node), the model
could not be loaded (a start-up problem with a human-readable fix), or one generation
failed (report it to that client only). Invalid request parameters raise the built-in
``ValueError`` so that callers need no engine import to validate input.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class for everything the engine raises on purpose."""


class EngineBusy(EngineError):
    """The engine already holds as many requests as it accepts; try again or elsewhere."""


class EngineClosed(EngineError):
    """The engine is not running (not started yet, or closed)."""


class GenerationFailed(EngineError):
    """One generation failed inside the scheduler; other requests are unaffected."""


class ModelLoadError(EngineError):
    """A model spec could not be turned into a loaded model; the message says what to do."""


class RequestTooLarge(ValueError):
    """The prompt plus ``max_new_tokens`` exceeds the context, or alone the node's KV-cache budget."""
