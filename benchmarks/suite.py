"""The run: start what is needed, measure every contender interleaved, stop everything.

Interleaving is deliberate. The machine may be shared, and its load drifts over minutes;
measuring contender A for two minutes and then contender B would turn that drift into a
fake ratio. So one-at-a-time requests alternate generate / engine / network request by
request (rotating the order), and the concurrency sweep runs network, baseline and raw
loop back to back at each level, repetition after repetition. Ratios always compare
medians taken in the same run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import os
import platform
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers
import trio

from dllm_p2p.engine import Engine, GenerationParams, LoadedModel, load_model
from dllm_p2p.models import SMOLLM2_MISSING, find_smollm2

from .inprocess import RawLoop, in_fresh_thread, params_for, time_engine, time_fresh_engine, time_generate
from .load import COMPLETIONS, Endpoint, LevelRun, LoadError, completions_body, open_http, post, post_streamed, request_body, run_clients
from .measure import CpuMeter, Sample, load_average, median, summarize
from .servers import Servers, exit_status, proc_memory
from .settings import Settings
from .targets import evaluate

Progress = Callable[[str], None]
ROOT = Path(__file__).resolve().parent.parent


def run_suite(settings: Settings, progress: Progress = lambda message: None) -> dict[str, Any]:
    """Run the selected benchmarks; return the results (the ``--json`` document)."""
    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    meter = CpuMeter()
    results: dict[str, Any] = {"meta": _meta(settings)}
    main_phase = {"overhead", "concurrency", "baseline", "limit"} & set(settings.only)
    with Servers(progress, verbose=settings.verbose, threads=settings.threads, backend=settings.worker_backend, quantize=settings.worker_quantize) as servers:
        if "latency" in settings.only:
            results["latency"] = _latency(settings, servers, progress)
            if settings.latency_model != settings.model or not main_phase:
                servers.stop_network(settings.latency_model)
        if main_phase:
            progress(f"loading {settings.model} in this process")
            loaded = in_fresh_thread(_load_torch, settings.model)
            if "overhead" in settings.only:
                results["overhead"] = _overhead(settings, servers, loaded, progress)
            if {"concurrency", "baseline", "limit"} & set(settings.only):
                results.update(_sweep(settings, servers, loaded, progress))
        if "llamacpp" in settings.only:
            # Alone on the machine: the main phase's servers would only take memory and wake-ups.
            servers.stop_baseline(settings.model)
            if settings.model != settings.gguf_model:
                servers.stop_network(settings.model)
            results["llamacpp"] = _llamacpp(settings, servers, progress)
    if "spans" in settings.only:
        # After every other server stopped: each configuration has the machine to itself.
        from . import spans

        results["spans"] = spans.run(settings, progress)
    results["targets"] = evaluate(results)
    results["meta"]["load_average_end"] = load_average()
    results["meta"]["other_cpu_percent"] = meter.other_percent()
    results["meta"]["steal_percent"] = meter.steal_percent()
    results["meta"]["duration_s"] = round(time.perf_counter() - started, 1)
    return results


# --- one request at a time -----------------------------------------------------------------


def _one_at_a_time(
    loaded: LoadedModel, url: str, settings: Settings, count: int, max_batch_size: int
) -> dict[str, list[Sample]]:
    """``count`` rounds of generate / engine / network, in rotating order, after warm-up."""
    params = params_for(settings.prompt, settings.new_tokens)
    body = request_body(settings.prompt, settings.new_tokens)
    return trio.run(_alternate, loaded, url, params, body, count, max_batch_size, settings)


async def _alternate(
    loaded: LoadedModel,
    url: str,
    params: GenerationParams,
    body: dict[str, Any],
    count: int,
    max_batch_size: int,
    settings: Settings,
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {"generate": [], "engine": [], "network": [], "streamed": []}
    async with open_http(url, 1, settings.request_timeout) as client:

        async def network() -> Sample:
            return await post(client, body)

        async def streamed() -> Sample:
            return await post_streamed(client, body)

        async def engine_request() -> Sample:
            return await time_fresh_engine(loaded, params, max_batch_size)

        async def generate() -> Sample:
            # Blocks the event loop on purpose: nothing else runs meanwhile.
            return in_fresh_thread(time_generate, loaded, params)

        kinds = [("generate", generate), ("engine", engine_request), ("network", network), ("streamed", streamed)]
        for round_ in range(settings.warmup + count):
            shift = round_ % len(kinds)
            for name, measure in kinds[shift:] + kinds[:shift]:
                sample = await measure()
                if round_ >= settings.warmup:
                    samples[name].append(sample)
    return samples


def _latency(settings: Settings, servers: Servers, progress: Progress) -> dict[str, Any]:
    model = settings.latency_model
    load_before = load_average()
    progress(f"latency: loading {model} in this process")
    loaded = in_fresh_thread(_load_torch, model)
    url = servers.network(model, settings.batch_size, settings.new_tokens)
    progress(f"latency: {settings.latency_requests} one-at-a-time requests each: generate, engine, HTTP, HTTP streamed ({model})")
    meter = CpuMeter()
    samples = _one_at_a_time(loaded, url, settings, settings.latency_requests, settings.batch_size)
    summary = _summary(samples, model, settings, load_before, meter)
    gen, eng, net, sse = (summary[k] for k in ("generate", "engine", "network", "streamed"))
    # Paired, per request: network wall time minus the worker's own engine time for it.
    outside = [s.seconds * 1000 - s.engine_ms for s in samples["network"] if s.engine_ms is not None]
    return {
        **summary,
        "added_ms_vs_engine": round(net["median_ms"] - eng["median_ms"], 2),
        "added_ms_streamed_vs_engine": round(sse["median_ms"] - eng["median_ms"], 2),
        "added_ms_vs_generate": round(net["median_ms"] - gen["median_ms"], 2),
        "outside_worker_engine_ms": round(median(outside), 2),
        "network_samples_ms": [round(s.seconds * 1000, 2) for s in samples["network"]],
    }



def _summary(samples: Any, model: str, settings: Settings, load_before: Any, meter: CpuMeter) -> dict[str, Any]:
    """What both one-at-a-time benchmarks report: conditions and each contender's medians."""
    other, steal = meter.other_percent(), meter.steal_percent()
    return {
        "model": model,
        "new_tokens": settings.new_tokens,
        "load_average": [load_before, load_average()],
        "other_cpu_percent": other,
        "steal_percent": steal,
        **{k: summarize(samples[k]) for k in ("generate", "engine", "network", "streamed")},
    }

def _overhead(settings: Settings, servers: Servers, loaded: LoadedModel, progress: Progress) -> dict[str, Any]:
    load_before = load_average()
    url = servers.network(settings.model, settings.batch_size, settings.new_tokens)
    progress(f"overhead: {settings.sequential} one-at-a-time requests each: generate, engine, HTTP, HTTP streamed ({settings.model})")
    meter = CpuMeter()
    samples = _one_at_a_time(loaded, url, settings, settings.sequential, settings.batch_size)
    summary = _summary(samples, settings.model, settings, load_before, meter)
    gen, eng, net, sse = (summary[k] for k in ("generate", "engine", "network", "streamed"))
    return {
        **summary,
        "ratio_streamed_vs_generate": _ratio(sse["median_tokens_per_s"], gen["median_tokens_per_s"]),
        "ratio_network_vs_generate": _ratio(net["median_tokens_per_s"], gen["median_tokens_per_s"]),
        "ratio_engine_vs_generate": _ratio(eng["median_tokens_per_s"], gen["median_tokens_per_s"]),
        "ratio_network_vs_engine": _ratio(net["median_tokens_per_s"], eng["median_tokens_per_s"]),
    }


# --- the concurrency sweep -----------------------------------------------------------------


def _sweep(settings: Settings, servers: Servers, loaded: LoadedModel, progress: Progress) -> dict[str, Any]:
    body = request_body(settings.prompt, settings.new_tokens)
    endpoints: dict[str, Endpoint] = {}
    if "concurrency" in settings.only:
        endpoints["concurrency"] = Endpoint(servers.network(settings.model, settings.batch_size, settings.new_tokens), body)
    if "baseline" in settings.only:
        endpoints["baseline"] = Endpoint(servers.baseline(settings.model), body)
    raw = RawLoop(loaded) if "limit" in settings.only else None
    names = [*endpoints, *(["engine_inprocess", "limit"] if raw else [])]
    runs: dict[str, dict[int, list[LevelRun | Sample]]] = {name: {level: [] for level in settings.levels} for name in names}
    loads: list[float] = []
    others: list[tuple[float | None, float | None]] = []
    trio.run(_sweep_async, settings, endpoints, loaded, raw, runs, loads, others, progress)
    out: dict[str, Any] = {}
    for name, by_level in runs.items():
        out[name] = {
            "model": settings.model,
            "new_tokens": settings.new_tokens,
            "load_average": loads,
            "other_cpu_percent": [other for other, _ in others],
            "steal_percent": [steal for _, steal in others],
            "levels": {str(level): _level_summary(level, items, name == "limit") for level, items in by_level.items()},
        }
        if name in ("concurrency", "engine_inprocess"):
            out[name]["batch_size"] = settings.batch_size
        if name != "limit":
            out[name]["requests_per_client"] = settings.requests_per_client
    return out


async def _sweep_async(
    settings: Settings,
    endpoints: dict[str, Endpoint],
    loaded: LoadedModel | None,
    raw: RawLoop | None,
    runs: dict[str, dict[int, list[Any]]],
    loads: list[float],
    others: list[tuple[float | None, float | None]],
    progress: Progress,
) -> None:
    """The sweep over ``settings.levels``: every HTTP endpoint, then (with ``raw``) the engine
    in this process and the raw loop, at one level after the other, ``settings.repetitions``
    times; each run is appended to ``runs[name][level]``."""
    params = params_for(settings.prompt, settings.new_tokens)
    connections = max(settings.levels)
    clients = {name: open_http(e.url, connections, settings.request_timeout) for name, e in endpoints.items()}
    try:
        for name, client in clients.items():
            for _ in range(settings.warmup):
                await post(client, endpoints[name].body, endpoints[name].path)
        if raw is not None and settings.warmup:
            in_fresh_thread(raw.run, settings.prompt, 1, min(settings.new_tokens, 4))
        # Every contender at one level runs back to back; the order rotates with the
        # repetition so that none of them always follows the same one (say, the baseline's
        # minute of oversubscribed threads).
        contenders: list[tuple[str, Callable[[int], Awaitable[Any]]]] = []
        for name, client in clients.items():
            endpoint = endpoints[name]
            contenders.append((name, functools.partial(_http_level, client, endpoint, settings.requests_per_client)))
        if raw is not None:
            assert loaded is not None
            contenders.append(("engine_inprocess", functools.partial(_engine_clients, loaded, params, settings.requests_per_client, settings.batch_size)))
            contenders.append(("limit", functools.partial(_raw_level, raw, settings.prompt, settings.new_tokens)))
        for rep in range(settings.repetitions):
            loads.append(load_average())
            meter = CpuMeter()
            shift = rep % len(contenders)
            for level in settings.levels:
                parts = []
                for name, measure in contenders[shift:] + contenders[:shift]:
                    run = await measure(level)
                    runs[name][level].append(run)
                    parts.append(f"{name} {run.tokens_per_second:.1f}")
                progress(
                    f"sweep {rep + 1}/{settings.repetitions}, {level} client(s): tok/s " + ", ".join(parts)
                    + f"  (load {load_average()})"
                )
            others.append((meter.other_percent(), meter.steal_percent()))
    finally:
        for client in clients.values():
            with trio.CancelScope(shield=True):
                await client.aclose()


async def _http_level(client: Any, endpoint: Endpoint, per_client: int, clients: int) -> LevelRun:
    return await run_clients(client, endpoint.body, clients, per_client, endpoint.path)


async def _raw_level(raw: RawLoop, prompt: str, new_tokens: int, rows: int) -> Sample:
    return in_fresh_thread(raw.run, prompt, rows, new_tokens)


async def _engine_clients(
    loaded: LoadedModel, params: GenerationParams, per_client: int, max_batch_size: int, clients: int
) -> LevelRun:
    """The network sweep's load, but on an engine in this process: no HTTP, no libp2p."""
    engine = Engine(loaded, max_batch_size=max_batch_size, max_queue=max(64, clients))
    engine.start()
    samples: list[Sample] = []

    async def one_client() -> None:
        for _ in range(per_client):
            samples.append(await time_engine(engine, params))

    try:
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one_client)
        return LevelRun(clients, per_client, time.perf_counter() - started, samples)
    finally:
        engine.close()


def _level_summary(level: int, items: list[Any], raw: bool) -> dict[str, Any]:
    if raw:
        return {
            "rows": level,
            "tokens_per_s": round(median([s.tokens_per_second for s in items]), 2),
            "runs_tokens_per_s": [round(s.tokens_per_second, 2) for s in items],
            "median_ms": round(median([s.seconds * 1000 for s in items]), 2),
        }
    return {
        "clients": level,
        "tokens_per_s": round(median([r.tokens_per_second for r in items]), 2),
        "runs_tokens_per_s": [round(r.tokens_per_second, 2) for r in items],
        "median_latency_ms": round(median([r.median_latency_ms for r in items]), 2),
        "requests": sum(len(r.samples) for r in items),
    }


# --- llama.cpp ---------------------------------------------------------------------------


def _llamacpp(settings: Settings, servers: Servers, progress: Progress) -> dict[str, Any]:
    """dllm-p2p and llama.cpp's server on the same GGUF file, the sweep's load on both.

    A section with ``skipped`` (and the reason) when llama.cpp cannot run here.
    """
    from . import llamacpp  # not at the top: python -m benchmarks.llamacpp imports the package first

    n = settings.llamacpp_new_tokens
    model = settings.gguf_model
    section: dict[str, Any] = {"model": model, "new_tokens": n}
    try:
        gguf = _gguf_file(model)
        section["gguf"] = str(gguf)
        venv = Path(settings.llamacpp_venv).expanduser() if settings.llamacpp_venv else None
        python, version = llamacpp.resolve(settings.llamacpp, venv, progress)
        threads = settings.threads or (os.cpu_count() or 1)  # what LocalNetwork gives one worker
        forbidden = llamacpp.end_token_ids(python, gguf)
        llama_url = servers.llamacpp(python, gguf, threads, n_ctx=LLAMACPP_N_CTX)
    except llamacpp.Unavailable as exc:
        return _skipped(section, str(exc), servers, progress)
    section["llama_cpp_server"] = {
        "llama_cpp_python": version,
        "python": str(python),
        "command": servers.llamacpp_command,
        "threads": threads,
        "n_ctx": LLAMACPP_N_CTX,
        "forbidden_tokens": {str(k): v for k, v in forbidden.items()},
    }
    net_url = servers.network(model, settings.batch_size, n)
    endpoints = {
        # The gateway's /v1/completions takes no minimum length; its native endpoint does.
        "dllm": Endpoint(net_url, request_body(settings.prompt, n)),
        "llama_cpp": Endpoint(llama_url, completions_body(settings.prompt, n, list(forbidden)), COMPLETIONS),
    }
    phase = dataclasses.replace(settings, new_tokens=n)
    runs: dict[str, dict[int, list[Any]]] = {name: {level: [] for level in settings.levels} for name in endpoints}
    loads: list[float] = []
    others: list[tuple[float | None, float | None]] = []
    progress(
        f"llamacpp: {model}, {n} tokens per request, clients {settings.levels}, {settings.repetitions} repetition(s): "
        f"dllm-p2p ({endpoints['dllm'].path}) and llama.cpp ({COMPLETIONS}, end tokens {sorted(forbidden)} banned)"
    )
    try:
        section["first_answers"] = trio.run(_first_answers, endpoints, settings.request_timeout)
        trio.run(_sweep_async, phase, endpoints, None, None, runs, loads, others, progress)
    except Exception:
        # A request failed: if llama.cpp's server died (say, an instruction this CPU lacks),
        # skip it; anything else is an error of the run.
        child = servers.llamacpp_child()
        if child is None or not _exits(child.popen, 5.0):
            raise
        section["log_tail"] = child.output(30)
        return _skipped(section, f"llama.cpp's server exited with {exit_status(child.popen.returncode)} during the benchmark", servers, progress)
    section["dllm_engine"] = servers.worker_engine(model)
    # Memory at the end of the phase, while both still hold their model and caches.
    llama_child = servers.llamacpp_child()
    section["memory_mib"] = {
        "dllm_worker": proc_memory(servers.worker_pid(model)),
        "llama_cpp_server": proc_memory(llama_child.popen.pid if llama_child else None),
    }
    servers.stop_llamacpp()
    servers.stop_network(model)
    section.update(
        threads=threads,  # each server's: the worker's torch threads, llama.cpp's --n_threads
        requests_per_client=settings.requests_per_client,
        batch_size=settings.batch_size,
        load_average=loads,
        other_cpu_percent=[other for other, _ in others],
        steal_percent=[steal for _, steal in others],
    )
    for name, by_level in runs.items():
        counts = [s.tokens for items in by_level.values() for run in items for s in run.samples]
        section[name] = {
            "endpoint": endpoints[name].path,
            "completion_tokens": [min(counts), max(counts)] if counts else None,
            "levels": {str(level): _level_summary(level, items, False) for level, items in by_level.items()},
        }
        if counts and (min(counts) != n or max(counts) != n):
            wrong = sum(1 for c in counts if c != n)
            note = f"{name}: {wrong} of {len(counts)} answers had {min(counts)}-{max(counts)} tokens, not {n}"
            section.setdefault("token_mismatch", []).append(note)
            progress(f"llamacpp: warning: {note}")
    section["ratio"] = {
        str(level): _ratio(section["dllm"]["levels"][str(level)]["tokens_per_s"], section["llama_cpp"]["levels"][str(level)]["tokens_per_s"])
        for level in settings.levels
    }
    return section


def _load_torch(spec: str) -> LoadedModel:
    """The in-process contenders (``model.generate``, the raw loop, the engine) need a
    transformers model, also for a GGUF file that the network's worker may run on llama.cpp."""
    return load_model(spec, backend="torch")


def _exits(popen: subprocess.Popen[str], timeout: float) -> bool:
    """Whether the process has exited or does so within ``timeout`` seconds."""
    try:
        popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


#: llama.cpp's context: room for the prompt and the answer (``Settings.validate`` bounds
#: ``--llamacpp-new-tokens`` below it).
LLAMACPP_N_CTX = 2048


def _gguf_file(spec: str) -> Path:
    from . import llamacpp

    if spec == "smollm2":
        path = find_smollm2()
        if path is None:
            raise llamacpp.Unavailable(SMOLLM2_MISSING)
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise llamacpp.Unavailable(f"no GGUF file at {path}")
    return path


def _skipped(section: dict[str, Any], reason: str, servers: Servers, progress: Progress) -> dict[str, Any]:
    progress(f"llamacpp: skipped: {reason}")
    servers.stop_llamacpp()
    servers.stop_network(section["model"])
    return {"skipped": reason, **section}


async def _first_answers(endpoints: dict[str, Endpoint], timeout: float) -> dict[str, Any]:
    """One request to each endpoint, before the sweep: what it answers, for the record."""
    out: dict[str, Any] = {}
    for name, endpoint in endpoints.items():
        async with open_http(endpoint.url, 1, timeout) as client:
            response = await client.post(endpoint.path, json=endpoint.body)
            if response.status_code != 200:
                raise LoadError(f"{endpoint.url} answered {response.status_code}: {response.text[:300]}")
            data = response.json()
            text = data["choices"][0]["text"] if "choices" in data else data.get("text", "")
            out[name] = {"text": text, "usage": data.get("usage", {})}
    return out


# --- helpers -------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _meta(settings: Settings) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
        "cpu": _cpu_model(),
        "cpus": _cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git": _git_revision(),
        "settings": {**asdict(settings), "only": list(settings.only), "batch_size": settings.batch_size},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


def _git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
