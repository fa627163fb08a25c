"""``python -m benchmarks [options]``: parse options, run the suite, print the table or JSON."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from dllm_p2p.models import BACKENDS, QUANT_TYPES

from .settings import BENCHMARKS, DEFAULT_PROMPT, Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Throughput and latency of dllm-p2p (HTTP -> gateway -> libp2p -> worker) side by side with "
            "in-process model.generate, a FastAPI + transformers pipeline server, a raw batched loop and "
            "llama.cpp's server (llama-cpp-python) on the same GGUF file. "
            "Every server is started here, on 127.0.0.1, and stopped at the end."
        ),
    )
    p.add_argument("--model", default="random:gpt2", help="model for overhead, concurrency, baseline and limit (default random:gpt2)")
    p.add_argument("--latency-model", default="tiny", help="model for the added-latency benchmark (default tiny)")
    p.add_argument("--new-tokens", type=int, default=None, metavar="N", help="tokens per request, exactly (default 32)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of every request")
    p.add_argument("--repetitions", type=int, default=None, metavar="R", help="repetitions of the concurrency sweep (default 3; quick 1)")
    p.add_argument("--sequential", type=int, default=None, metavar="N", help="one-at-a-time requests per contender for the overhead ratio (default 5; quick 3)")
    p.add_argument("--latency-requests", type=int, default=None, metavar="N", help="one-at-a-time requests per contender on the latency model (default 30; quick 10)")
    p.add_argument("--concurrency", default=None, metavar="LEVELS", help="comma-separated client counts (default 1,4,8,16; quick 1,8)")
    p.add_argument("--requests-per-client", type=int, default=None, metavar="N", help="requests each client sends back to back (default 2; quick 1)")
    p.add_argument("--max-concurrency", type=int, default=None, metavar="N", help="the worker's batch size (default: largest level, at least 8)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads for every contender: this process, the worker (--threads) and the baseline (default: PyTorch's, one per core)")
    p.add_argument("--warmup", type=int, default=None, metavar="N", help="unmeasured requests per contender first (default 2; quick 1)")
    p.add_argument("--only", default=None, metavar="LIST", help=f"run only these benchmarks (comma-separated: {','.join(BENCHMARKS)}; default all but spans, which is opt-in)")
    p.add_argument("--worker-backend", default="auto", choices=BACKENDS, help="the workers' --backend (default auto: llama.cpp for GGUF files where it is installed)")
    p.add_argument("--worker-quantize", default="auto", choices=QUANT_TYPES, help="the workers' --quantize on llama.cpp (default auto)")
    p.add_argument("--gguf-model", default="smollm2", metavar="SPEC", help="model of the llama.cpp comparison: smollm2 or a .gguf file, loaded by both the worker and llama.cpp (default smollm2)")
    p.add_argument("--llamacpp", default="auto", metavar="auto|off|PYTHON", help="llama.cpp's server for the llamacpp benchmark: auto = find or build llama-cpp-python in its own venv (about 5 minutes, once), off = skip it, or the path of a Python interpreter that has llama_cpp.server (default auto)")
    p.add_argument("--llamacpp-venv", default=None, metavar="DIR", help="the venv --llamacpp auto uses or builds (default $DLLM_LLAMACPP_VENV or ~/.cache/dllm-p2p/llamacpp-0.3.36)")
    p.add_argument("--llamacpp-new-tokens", type=int, default=None, metavar="N", help="tokens per request in the llamacpp benchmark, exactly, on both servers (default 64)")
    p.add_argument("--spans-new-tokens", type=int, default=None, metavar="N", help="tokens per request in the spans benchmark, exactly (default 64)")
    p.add_argument("--quick", action="store_true", help="a small run: fewer requests, levels 1 and 8, one repetition")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    out.add_argument("--markdown", action="store_true", help="print the tables as Markdown (for docs/BENCHMARKS.md)")
    p.add_argument("--save", type=Path, default=None, metavar="FILE", help="also write the JSON results to FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="echo the servers' output to stderr")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "model": args.model, "latency_model": args.latency_model, "prompt": args.prompt, "verbose": args.verbose,
        "gguf_model": args.gguf_model, "llamacpp": args.llamacpp, "worker_backend": args.worker_backend, "worker_quantize": args.worker_quantize,
    }
    for name in (
        "new_tokens", "repetitions", "sequential", "latency_requests", "requests_per_client", "max_concurrency", "warmup", "threads",
        "llamacpp_venv", "llamacpp_new_tokens", "spans_new_tokens",
    ):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.concurrency is not None:
        overrides["levels"] = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.only is not None:
        overrides["only"] = tuple(x.strip() for x in args.only.split(",") if x.strip())
    return Settings.quick(**overrides) if args.quick else Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        settings.validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Checked before minutes of measuring, not after.
    if args.save is not None and not args.save.resolve().parent.is_dir():
        print(f"error: --save: no such directory: {args.save.resolve().parent}", file=sys.stderr)
        return 2
    # Never reach a model hub from a benchmark; children inherit this.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ctrl-C and SIGTERM raise KeyboardInterrupt, so the `finally` blocks stop every server we
    # started. Installed explicitly: a shell starting us in the background ignores SIGINT.
    # (Inside trio.run, trio installs its own SIGINT handler with the same effect.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))

    from dllm_p2p.fsutil import write_atomic

    from .report import render
    from .suite import run_suite

    def progress(message: str) -> None:
        print(f"... {message}", file=sys.stderr, flush=True)

    try:
        results = run_suite(settings, progress)
    except Exception as exc:  # one line for the user; the servers are already stopped
        print(f"error: benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if args.verbose:
            raise
        return 1
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print("interrupted; every server was stopped", file=sys.stderr)
        return 130
    if args.save is not None:
        write_atomic(args.save, (json.dumps(results, indent=2) + "\n").encode())
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        render(results, sys.stdout, "markdown" if args.markdown else "auto")
    return 0


def _interrupted(exc: BaseException) -> bool:
    """A KeyboardInterrupt, also as trio raises it from a nursery: inside an exception group."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    inner = getattr(exc, "exceptions", None)
    return bool(inner) and all(_interrupted(e) for e in inner)
