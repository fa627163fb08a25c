"""Model loading and generation for a worker node.

``load_model(spec)`` turns a model spec into a ``LoadedModel``; ``Engine`` serves
generations for it from one scheduler thread with continuous batching, and trio tasks
consume them with ``async with engine.generate(params) as generation``. See ``engine.py``
for the design and ``loading.py`` for the model specs.
"""

from .engine import Engine
from .errors import EngineBusy, EngineClosed, EngineError, GenerationFailed, ModelLoadError, RequestTooLarge
from .generation import Generation
from .loading import LoadedModel, load_model
from .params import GenerationParams, GenerationResult
from .reference import generate_reference, reference_token_ids
from .tiny import init_tiny

__all__ = [
    "Engine",
    "EngineBusy",
    "EngineClosed",
    "EngineError",
    "Generation",
    "GenerationFailed",
    "GenerationParams",
    "GenerationResult",
    "LoadedModel",
    "ModelLoadError",
    "RequestTooLarge",
    "generate_reference",
    "init_tiny",
    "load_model",
    "reference_token_ids",
]
