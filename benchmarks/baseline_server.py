"""The baseline: the usual single-node setup, a FastAPI server calling a transformers pipeline.

``python -m benchmarks.baseline_server --model random:gpt2 --listen 127.0.0.1:0``

The model object is the same one a worker serves (``dllm_p2p.engine.load_model``), handed
to ``pipeline("text-generation", model=..., tokenizer=...)``. The endpoint is a plain
``def``, so FastAPI runs each request in its thread pool: concurrent requests call the
pipeline concurrently, each one a separate unbatched ``model.generate``. Served by
hypercorn on asyncio, bound to loopback only; it prints ``baseline listening on URL``
once it accepts connections and stops on SIGTERM or Ctrl-C.

It answers ``POST /api/generate`` with the gateway's request and answer shapes (the
subset the benchmark uses), so the same load generator drives both.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
import time
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field


class GenerateBody(BaseModel):
    prompt: str
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    min_new_tokens: int = Field(default=0, ge=0, le=4096)
    temperature: float = Field(default=1.0, ge=0.0)
    stream: bool = False


def create_app(spec: str) -> FastAPI:
    from transformers import pipeline

    from dllm_p2p.engine import load_model

    loaded = load_model(spec, backend="torch")  # a transformers pipeline needs a transformers model
    pipe = pipeline("text-generation", model=loaded.model, tokenizer=loaded.tokenizer)
    app = FastAPI(title="baseline: transformers pipeline per request")

    @app.post("/api/generate")
    def generate(body: GenerateBody) -> dict[str, Any]:  # sync: runs in FastAPI's thread pool
        started = time.perf_counter()
        options: dict[str, Any] = {
            "max_new_tokens": body.max_new_tokens,
            "min_new_tokens": min(body.min_new_tokens, body.max_new_tokens),
            "return_tensors": True,  # token ids, so completion_tokens is exact
        }
        if body.temperature == 0:
            options["do_sample"] = False
        else:
            options.update(do_sample=True, temperature=body.temperature)
        sequence = pipe(body.prompt, **options)[0]["generated_token_ids"]
        prompt_tokens = len(loaded.tokenizer(body.prompt)["input_ids"])
        new = list(sequence[prompt_tokens:])
        text = loaded.tokenizer.decode(new, skip_special_tokens=True)
        return {
            "text": text,
            "model": loaded.name,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(new)},
            "timing": {"total_ms": round((time.perf_counter() - started) * 1000, 2)},
        }

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def loopback_socket(listen: str) -> socket.socket:
    """Bind ``host:port`` (port 0 = a free one) ourselves, so the real port is known race-free."""
    host, _, port = listen.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit("the baseline server binds 127.0.0.1 only")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as hypercorn does for its own binds
    sock.bind(("127.0.0.1", int(port or 0)))
    return sock


async def serve(app: FastAPI, sock: socket.socket) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.accesslog = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Listening before serve() starts: early connections wait in the backlog, not refused.
    sock.listen(config.backlog)
    host, port = sock.getsockname()[:2]
    print(f"baseline listening on http://{host}:{port}", flush=True)
    await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="127.0.0.1:PORT")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sock = loopback_socket(args.listen)
    app = create_app(args.model)
    asyncio.run(serve(app, sock))
    print("baseline stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
