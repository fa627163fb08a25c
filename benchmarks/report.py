"""Turn a run's results into tables: rich on a terminal, plain text, or Markdown."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


def tables(results: dict[str, Any]) -> list[Table]:
    out: list[Table] = []
    if "overhead" in results:
        out.append(_one_at_a_time(results["overhead"], "One request at a time"))
    if "latency" in results:
        out.append(_latency(results["latency"]))
    if any(k in results for k in ("concurrency", "baseline", "engine_inprocess", "limit")):
        out.append(_sweep(results))
    if "llamacpp" in results:
        out += _llamacpp(results["llamacpp"])
    if "spans" in results:
        out += _spans(results["spans"])
    out.append(_targets(results["targets"]))
    return out


def header(results: dict[str, Any]) -> str:
    meta = results["meta"]
    s = meta["settings"]
    return (
        f"dllm-p2p benchmarks, {meta['date']}, git {meta['git']}\n"
        f"{meta['cpu']}, {meta['cpus']} CPU(s), torch {meta['torch']} ({meta['torch_threads']} threads), "
        f"transformers {meta['transformers']}, Python {meta['python']}\n"
        f"{_new_tokens(s)} (greedy, min_new_tokens = max_new_tokens), "
        f"worker batch size {s['batch_size']}, torch threads {s['threads'] or 'default'}; "
        f"load average {meta['load_average_start']} at start, {meta.get('load_average_end')} at end; "
        f"other processes used {_pct(meta.get('other_cpu_percent'))} of the CPU during the run, "
        f"hypervisor steal {_pct(meta.get('steal_percent'))}; {meta.get('duration_s')} s"
    )


def _new_tokens(settings: dict[str, Any]) -> str:
    only = list(settings.get("only", ()))
    if only == ["spans"] and "spans_new_tokens" in settings:
        return f"{settings['spans_new_tokens']} new tokens per request"
    if "llamacpp" not in only or "llamacpp_new_tokens" not in settings:
        return f"{settings['new_tokens']} new tokens per request"
    if only == ["llamacpp"]:
        return f"{settings['llamacpp_new_tokens']} new tokens per request"
    return f"{settings['new_tokens']} new tokens per request, {settings['llamacpp_new_tokens']} in the llama.cpp comparison"


def _one_at_a_time(section: dict[str, Any], title: str) -> Table:
    gen = section["generate"]
    rows = []
    for label, key in (
        ("model.generate, in process", "generate"),
        ("batching engine, in process", "engine"),
        ("HTTP -> gateway -> libp2p -> worker", "network"),
        ("same, streamed (SSE)", "streamed"),
    ):
        entry = section.get(key)
        if entry is None:
            continue
        ratio = entry["median_tokens_per_s"] / gen["median_tokens_per_s"] if gen["median_tokens_per_s"] else float("nan")
        first = entry.get("median_first_token_ms")
        rows.append([
            label, _ms(entry["median_ms"]), f"{entry['median_tokens_per_s']:.1f}", f"{ratio:.2f}x",
            _ms(first) if key == "streamed" else "", str(entry["requests"]),
        ])
    return Table(
        f"{title} ({section['model']}, {section['new_tokens']} tokens)",
        ["contender", "median latency", "tok/s (median)", "vs generate", "first text", "requests"],
        rows,
        note=(
            f"load average {section['load_average'][0]} -> {section['load_average'][1]}; "
            f"other processes used {_pct(section.get('other_cpu_percent'))} of the CPU meanwhile, "
            f"steal {_pct(section.get('steal_percent'))}"
        ),
    )


def _latency(section: dict[str, Any]) -> Table:
    table = _one_at_a_time(section, "Added latency")
    table.rows += [
        ["added: HTTP - engine (medians)", _ms(section["added_ms_vs_engine"]), "", "", "", ""],
        ["added: HTTP streamed - engine (medians)", _ms(section.get("added_ms_streamed_vs_engine")), "", "", "", ""],
        ["added: HTTP - generate (medians)", _ms(section["added_ms_vs_generate"]), "", "", "", ""],
        ["HTTP outside the worker's engine (paired median)", _ms(section["outside_worker_engine_ms"]), "", "", "", ""],
    ]
    return table


def _sweep(results: dict[str, Any]) -> Table:
    net, base, eng, raw = (results.get(k) for k in ("concurrency", "baseline", "engine_inprocess", "limit"))
    any_section = net or base or eng or raw
    assert any_section is not None
    levels = list(any_section["levels"])
    one = _tps(net, "1")
    rows = []
    for level in levels:
        n, b, e, r = _tps(net, level), _tps(base, level), _tps(eng, level), _tps(raw, level)
        rows.append([
            level,
            _num(n),
            _x(n, one),
            _num(b),
            _x(n, b),
            _num(e),
            _num(r),
            _x(n, r),
            _ms(_get_level(net, level, "median_latency_ms")),
            _ms(_get_level(base, level, "median_latency_ms")),
        ])
    per_client = any_section.get("requests_per_client") or (net or base or {}).get("requests_per_client")
    return Table(
        f"Aggregate throughput ({any_section['model']}, {any_section['new_tokens']} tokens, tok/s, medians of "
        f"{len(any_section['load_average'])} repetitions)",
        ["clients", "dllm-p2p", "vs 1 client", "baseline", "dllm vs baseline", "engine in process", "raw loop", "dllm vs raw", "dllm latency", "baseline latency"],
        rows,
        note=(
            f"each client sends {per_client} request(s) back to back; engine in process = the same clients on an "
            f"Engine in this process (no HTTP, no libp2p); raw loop = that many rows, one batch; latencies are medians "
            f"per request; load average at the start of each repetition {any_section['load_average']}, other processes' "
            f"CPU share per repetition {[_pct(x) for x in any_section.get('other_cpu_percent', [])]}, "
            f"steal {[_pct(x) for x in any_section.get('steal_percent', [])]}"
        ),
    )


def _llamacpp(section: dict[str, Any]) -> list[Table]:
    """dllm-p2p against llama.cpp's server: throughput and latency per level, then memory."""
    title = f"dllm-p2p vs llama.cpp ({section['model']}, same GGUF, {section['new_tokens']} tokens"
    if section.get("skipped"):
        return [Table(title + "): not measured", ["llama.cpp skipped"], [[section["skipped"]]])]
    dllm, llama = section["dllm"], section["llama_cpp"]
    rows = []
    for level in dllm["levels"]:
        d, c = _tps(dllm, level), _tps(llama, level)
        rows.append([
            level, _num(d), _num(c), _x(d, c),
            _ms(_get_level(dllm, level, "median_latency_ms")), _ms(_get_level(llama, level, "median_latency_ms")),
        ])
    server = section.get("llama_cpp_server", {})
    notes = [
        f"each client sends {section.get('requests_per_client')} request(s) back to back, greedy, exactly "
        f"{section['new_tokens']} tokens: dllm-p2p (1 worker, batch size {section.get('batch_size', '?')}) through the "
        f"gateway's {dllm.get('endpoint')} with min_new_tokens, llama.cpp (llama-cpp-python "
        f"{server.get('llama_cpp_python', '?')}) through {llama.get('endpoint')} with its end tokens banned by "
        f"logit_bias; {section.get('threads', server.get('threads', '?'))} thread(s) each",
        f"tokens per answer: dllm-p2p {_span(dllm.get('completion_tokens'))}, llama.cpp {_span(llama.get('completion_tokens'))}",
        f"the worker's engine: {section.get('dllm_engine') or 'not reported'}",
        f"load average at the start of each repetition {section.get('load_average')}, other processes' CPU share "
        f"{[_pct(x) for x in section.get('other_cpu_percent', [])]}, steal {[_pct(x) for x in section.get('steal_percent', [])]}",
    ]
    notes += [f"WARNING {m}" for m in section.get("token_mismatch", [])]
    throughput = Table(
        title + f", tok/s, medians of {len(section.get('load_average') or [])} repetitions)",
        ["clients", "dllm-p2p", "llama.cpp", "dllm vs llama.cpp", "dllm latency", "llama.cpp latency"],
        rows,
        note="; ".join(notes),
    )
    memory = section.get("memory_mib") or {}
    mem_rows = []
    for label, key in (("dllm-p2p worker", "dllm_worker"), ("llama.cpp server", "llama_cpp_server")):
        entry = memory.get(key) or {}
        mem_rows.append([label, _mib(entry.get("rss_mib")), _mib(entry.get("peak_rss_mib"))])
    memory_table = Table(
        f"Resident memory at the end of the llama.cpp comparison ({section['model']})",
        ["process", "RSS (VmRSS)", "peak RSS (VmHWM)"],
        mem_rows,
        note="from /proc/PID/status of the server process, after the last request",
    )
    return [throughput, memory_table]


def _spans(section: dict[str, Any]) -> list[Table]:
    """A full worker and routes of 1, 2 and 3 spans: throughput, latency, ms per step and
    per hop at each client count, then each worker's memory."""
    title = f"A model split across peers: spans ({section['model']}, {section['new_tokens']} tokens"
    if section.get("skipped"):
        return [Table(title + "): not measured", ["spans skipped"], [[section["skipped"]]])]
    configs = section.get("configs") or []
    rows = []
    for c in configs:
        one = (c["levels"].get("1") or {}).get("tokens_per_s")
        for level, entry in c["levels"].items():
            rows.append([
                c["name"],
                " ".join(c["workers"]),
                f"{len(c['workers'])} x {c['threads_per_worker']}",
                level,
                _num(entry["tokens_per_s"]),
                _x(entry["tokens_per_s"], one) if level != "1" else "",
                _ms(entry["median_latency_ms"]),
                _ms(entry.get("step_ms")),
                " / ".join(f"{ms:.1f}" for ms in entry.get("hops_ms") or []) or "-",
            ])
    notes = [
        f"each configuration alone on the machine ({section.get('cores')} cores shared by its workers: threads = cores // "
        f"workers, at least 1), one warm-up request, then 1 client sending {section.get('sequential')} request(s) one at a "
        f"time and {', '.join(str(x) for x in section['levels'] if x != 1)} concurrent clients sending "
        f"{section.get('requests_per_client')} each; greedy, exactly {section['new_tokens']} tokens (min_new_tokens), "
        "through the gateway's /api/generate with route full / spans",
        "ms/step = median of (total - first token) / (tokens - 1) from the answer's timing; per hop = median of "
        "timing.hops_ms, the gateway's round trip to each span per decode step (its compute included)",
    ]
    notes += [f"WARNING {m}" for m in (note for c in configs for note in c.get("token_mismatch", []))]
    throughput = Table(
        title + ")",
        ["route", "workers (layers)", "workers x threads", "clients", "tok/s", "vs 1 client", "median latency", "ms/step", "per hop ms/step"],
        rows,
        note="; ".join(notes),
    )
    mem_rows = [
        [c["name"], m["layers"], _mib(m.get("rss_mib")), _mib(m.get("model_rss_mib"))]
        for c in configs for m in c.get("memory") or []
    ]
    memory_table = Table(
        f"Resident memory of each worker ({section['model']})",
        ["route", "layers", "RSS", "model's share"],
        mem_rows,
        note="load.rss_mib and load.model_rss_mib of the gateway's /api/nodes rows (the worker's heartbeat), after the "
        "last request; the model's share is the RSS beyond what the process held before loading the model",
    )
    return [throughput, memory_table]


def _targets(targets: list[dict[str, Any]]) -> Table:
    rows = []
    reasons: list[str] = []
    for t in targets:
        value = t["value"]
        shown = "-" if value is None else (f"{value:.1f} ms" if t["key"] == "added_latency_ms" else f"{value:.2f}x")
        threshold = f"{t['threshold']:g} ms" if t["key"] == "added_latency_ms" else f"{t['threshold']:g}x"
        rows.append([t["target"], shown, f"{t['comparison']} {threshold}", t["status"]])
        if t.get("reason") and t["reason"] not in reasons:
            reasons.append(t["reason"])
    return Table(
        "Targets (from the issue; benchmark figures, not tests)", ["target", "measured", "goal", "result"], rows,
        note="; ".join(reasons),
    )


# --- rendering -----------------------------------------------------------------------------


def render(results: dict[str, Any], stream: TextIO = sys.stdout, style: str = "auto") -> None:
    """``style``: "rich", "plain", "markdown", or "auto" (rich when installed)."""
    if style == "auto":
        try:
            import rich  # noqa: F401

            style = "rich"
        except ImportError:
            style = "plain"
    if style == "markdown":
        stream.write(markdown(results))
        return
    if style == "rich":
        _render_rich(results, stream)
        return
    stream.write(header(results) + "\n\n")
    for table in tables(results):
        stream.write(_plain(table) + "\n")


def markdown(results: dict[str, Any]) -> str:
    parts = ["```", header(results), "```", ""]
    for table in tables(results):
        parts.append(f"**{table.title}**")
        parts.append("")
        parts.append("| " + " | ".join(table.headers) + " |")
        parts.append("| " + " | ".join("---" for _ in table.headers) + " |")
        for row in table.rows:
            parts.append("| " + " | ".join(cell.replace("|", "\\|") or " " for cell in row) + " |")
        if table.note:
            parts.append("")
            parts.append(f"<sub>{table.note}</sub>")
        parts.append("")
    return "\n".join(parts) + "\n"


def _plain(table: Table) -> str:
    widths = [max(len(h), *(len(r[i]) for r in table.rows)) if table.rows else len(h) for i, h in enumerate(table.headers)]
    lines = [table.title, "  ".join(h.ljust(w) for h, w in zip(table.headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table.rows]
    if table.note:
        lines.append(f"({table.note})")
    return "\n".join(lines) + "\n"


def _render_rich(results: dict[str, Any], stream: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console(file=stream, width=None if stream.isatty() else 200)
    console.print(header(results), highlight=False)
    for table in tables(results):
        rich_table = RichTable(title=table.title, caption=table.note or None, title_justify="left")
        for i, name in enumerate(table.headers):
            rich_table.add_column(name, justify="left" if i == 0 else "right")
        for row in table.rows:
            cells = [
                "[green]PASS[/green]" if c == "PASS" else "[red]MISS[/red]" if c == "MISS" else c for c in row
            ]
            rich_table.add_row(*cells)
        console.print(rich_table)


# --- formatting ----------------------------------------------------------------------------


def _tps(section: dict[str, Any] | None, level: str) -> float | None:
    value = _get_level(section, level, "tokens_per_s")
    return None if value is None else float(value)


def _get_level(section: dict[str, Any] | None, level: str, key: str) -> Any:
    if section is None:
        return None
    return (section["levels"].get(level) or {}).get(key)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _x(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MiB"


def _span(counts: list[int] | None) -> str:
    if not counts:
        return "-"
    return str(counts[0]) if counts[0] == counts[-1] else f"{counts[0]}-{counts[-1]}"
