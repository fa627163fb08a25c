"""HTTP load: one request at a time, or N clients each sending requests back to back.

Both the gateway and the baseline server answer ``POST /api/generate`` with
``{"text", "usage": {"completion_tokens", ...}, "timing": {"total_ms", ...}}``, so one
client serves for both. llama.cpp's server is driven through OpenAI's
``POST /v1/completions``, whose answer has the same ``usage``. Requests are plain JSON
(``stream: false``). An ``Endpoint`` is one contender's URL, path and request body.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from .measure import Sample, median


class LoadError(RuntimeError):
    """A server answered with an error: the run stops rather than report a wrong figure."""


GENERATE = "/api/generate"
COMPLETIONS = "/v1/completions"


def request_body(prompt: str, new_tokens: int) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "temperature": 0,
        "stream": False,
    }


def completions_body(prompt: str, new_tokens: int, forbidden: list[int] | tuple[int, ...] = ()) -> dict[str, Any]:
    """OpenAI's ``/v1/completions`` request, greedy; ``forbidden`` token ids get a logit bias
    of -100 (OpenAI's "ban"), which keeps end-of-generation tokens from ending an answer early,
    so it has exactly ``new_tokens`` tokens."""
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": False}
    if forbidden:
        body["logit_bias"] = {str(token): -100 for token in forbidden}
    return body


@dataclass(frozen=True)
class Endpoint:
    """One HTTP contender: where to send what."""

    url: str
    body: dict[str, Any]
    path: str = GENERATE


def open_http(url: str, connections: int, timeout: float) -> httpx.AsyncClient:
    """A keep-alive client with enough connections for ``connections`` concurrent clients."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, trust_env=False)


async def post(client: httpx.AsyncClient, body: dict[str, Any], path: str = GENERATE) -> Sample:
    """One request, timed from before sending to after the JSON answer is parsed."""
    started = time.perf_counter()
    response = await client.post(path, json=body)
    data = response.json() if response.headers.get("content-type", "").startswith("application/json") else None
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or not isinstance(data, dict):
        raise LoadError(f"{client.base_url} answered {response.status_code}: {response.text[:300]}")
    tokens = int(data.get("usage", {}).get("completion_tokens", 0))
    engine_ms = data.get("timing", {}).get("total_ms")
    return Sample(elapsed, tokens, engine_ms=float(engine_ms) if engine_ms is not None else None)


async def post_streamed(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
    """One request with ``stream: true``: server-sent events read to the ``done`` event.

    The clock stops at the ``done`` event; ``first_token_ms`` records the first ``token``.
    """
    started = time.perf_counter()
    first: float | None = None
    done: dict[str, Any] | None = None
    async with client.stream("POST", "/api/generate", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            await response.aread()
            raise LoadError(f"{client.base_url} answered {response.status_code}: {response.text[:300]}")
        event = "message"
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                if event == "token" and first is None:
                    first = time.perf_counter()
                elif event == "done":
                    done = json.loads(line[5:])
                    break
                elif event == "error":
                    raise LoadError(f"{client.base_url} streamed an error: {line[5:300]}")
            elif not line:
                event = "message"
    elapsed = time.perf_counter() - started
    if done is None:
        raise LoadError(f"{client.base_url} ended the stream without a done event")
    tokens = int(done.get("usage", {}).get("completion_tokens", 0))
    engine_ms = done.get("timing", {}).get("total_ms")
    sample = Sample(elapsed, tokens, engine_ms=float(engine_ms) if engine_ms is not None else None)
    sample.first_token_ms = None if first is None else (first - started) * 1000
    return sample


@dataclass
class LevelRun:
    """``clients`` clients, each sending ``per_client`` requests back to back."""

    clients: int
    per_client: int
    wall_seconds: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def tokens_per_second(self) -> float:
        """Aggregate throughput: every token of every client over the wall time of the run."""
        return self.tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def median_latency_ms(self) -> float:
        return median([s.seconds * 1000 for s in self.samples])


async def run_clients(
    client: httpx.AsyncClient, body: dict[str, Any], clients: int, per_client: int, path: str = GENERATE
) -> LevelRun:
    """All clients start together; the wall time ends when the last answer arrives."""
    samples: list[Sample] = []

    async def one_client() -> None:
        for _ in range(per_client):
            samples.append(await post(client, body, path))

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one_client)
    return LevelRun(clients, per_client, time.perf_counter() - started, samples)
