"""Smoke test of ``python -m benchmarks``: a tiny run end to end, checking the JSON's shape,
and unit tests of the llama.cpp comparison's parts that need no llama.cpp build.

No speed is asserted (the figures are benchmark results, not test outcomes); this only
proves that every benchmark runs, that its servers start and stop, and that each figure
is a positive number.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import llamacpp
from benchmarks.load import completions_body
from benchmarks.report import render
from benchmarks.targets import NOT_MEASURED, evaluate

from .procs import ROOT, offline_env

LLAMACPP_TARGETS = ("vs_llamacpp_8", "vs_llamacpp_1")


def _python_without_llama_cpp(folder: Path) -> Path:
    """An interpreter that cannot import llama_cpp, whatever this venv holds (``-S``: no site-packages)."""
    script = folder / "python"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.integration
def test_quick_benchmark_on_tiny_produces_every_figure(tmp_path: Path) -> None:
    # llama.cpp is not built in tests: an interpreter without it makes the llamacpp
    # benchmark skip itself, and the run goes on with every other contender.
    no_llama = _python_without_llama_cpp(tmp_path)
    command = [
        sys.executable, "-m", "benchmarks", "--model", "tiny", "--quick", "--json",
        "--new-tokens", "8", "--sequential", "2", "--latency-requests", "3", "--warmup", "1",
        "--llamacpp", str(no_llama),
    ]
    done = subprocess.run(command, cwd=ROOT, env=offline_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)

    assert {"meta", "overhead", "latency", "concurrency", "baseline", "limit", "llamacpp", "targets"} <= results.keys()
    for section in ("overhead", "latency"):
        for contender in ("generate", "engine", "network"):
            entry = results[section][contender]
            assert entry["median_ms"] > 0 and entry["median_tokens_per_s"] > 0, (section, contender, entry)
            assert entry["tokens_per_request"] == 8
    assert results["overhead"]["ratio_network_vs_generate"] > 0
    assert math.isfinite(results["latency"]["added_ms_vs_engine"])
    for section in ("concurrency", "baseline", "limit"):
        assert set(results[section]["levels"]) == {"1", "8"}
        for level in results[section]["levels"].values():
            assert level["tokens_per_s"] > 0
    skipped = results["llamacpp"]["skipped"]
    assert "cannot import llama_cpp.server" in skipped and str(no_llama) in skipped, skipped
    assert "llamacpp: skipped: " in done.stderr
    assert [t["key"] for t in results["targets"]] == [
        "single_request_vs_generate", "added_latency_ms", "scaling_8_vs_1", "vs_baseline_8", "vs_raw_loop_8", *LLAMACPP_TARGETS
    ]
    for target in results["targets"]:
        if target["key"] in LLAMACPP_TARGETS:
            assert target["status"] == NOT_MEASURED and target["value"] is None and skipped in target["reason"]
        else:
            assert target["status"] in {"PASS", "MISS"} and target["value"] is not None
    assert "benchmark failed" not in done.stderr


# --- llama.cpp: finding, building, skipping ------------------------------------------------


def test_llamacpp_off_and_missing_interpreters_are_clear_reasons(tmp_path: Path) -> None:
    with pytest.raises(llamacpp.Unavailable, match="--llamacpp off"):
        llamacpp.resolve("off")
    with pytest.raises(llamacpp.Unavailable, match="does not exist"):
        llamacpp.resolve(str(tmp_path / "nowhere" / "python"))
    no_llama = _python_without_llama_cpp(tmp_path)
    with pytest.raises(llamacpp.Unavailable, match=r"cannot import llama_cpp\.server \(ModuleNotFoundError"):
        llamacpp.resolve(str(no_llama))


def test_build_without_a_compiler_says_so_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    venv = tmp_path / "cache" / "llamacpp"
    with pytest.raises(llamacpp.Unavailable, match="no C/C.. compiler"):
        llamacpp.resolve("auto", venv)
    assert not venv.exists()


def test_failed_build_leaves_no_venv_and_names_its_log(tmp_path: Path) -> None:
    # A build step that fails (here the venv's creation, by an interpreter that half-makes
    # it and errs, as pip does without a network): the build stops there, the temporary
    # directory is removed, and the one-line reason names the error and the log.
    failing = tmp_path / "python"
    failing.write_text('#!/bin/sh\nmkdir -p "$3/bin"\necho "ERROR: Could not find a version that satisfies the requirement"\nexit 1\n')
    failing.chmod(0o755)
    venv = tmp_path / "cache" / "llamacpp"
    messages: list[str] = []
    with pytest.raises(llamacpp.Unavailable) as failure:
        llamacpp.build(venv, messages.append, base_python=str(failing))
    reason = str(failure.value)
    assert "building llama-cpp-python failed" in reason and "exited with 1" in reason, reason
    assert "ERROR: Could not find a version" in reason and "\n" not in reason
    log = Path(reason.rsplit("log: ", 1)[1])
    assert log.is_file() and "CMAKE_ARGS=-DGGML_NATIVE=OFF" in log.read_text()
    assert sorted(p.name for p in venv.parent.iterdir()) == [log.name]  # no venv, no temporary dir
    assert messages and "building" in messages[0] and str(log) in messages[0]


def test_a_directory_that_is_not_our_venv_is_never_replaced(tmp_path: Path) -> None:
    venv = tmp_path / "mine"
    venv.mkdir()
    (venv / "notes.txt").write_text("keep me")
    with pytest.raises(llamacpp.Unavailable, match="is not a venv this benchmark built"):
        llamacpp.resolve("auto", venv)
    assert (venv / "notes.txt").read_text() == "keep me"


def test_cmake_args_use_avx512_only_where_the_cpu_has_it() -> None:
    common = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    amx_off = "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    with_avx512 = llamacpp.cmake_args({"avx2", "fma", "f16c", "avx512f", "amx_tile"})
    assert with_avx512 == f"{common} -DGGML_AVX512=ON {amx_off}"
    assert llamacpp.cmake_args({"avx2", "fma", "f16c"}) == f"{common} -DGGML_AVX512=OFF {amx_off}"


def test_a_venv_built_for_avx512_is_not_reused_without_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dllm_p2p.engine import llamacpp_build

    (tmp_path / llamacpp.BUILD_INFO).write_text(json.dumps({"cmake_args": "-DGGML_AVX512=ON"}))
    monkeypatch.setattr(llamacpp_build, "cpu_flags", lambda: {"avx2", "fma"})
    assert llamacpp._needs_missing_features(tmp_path) is not None
    monkeypatch.setattr(llamacpp_build, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert llamacpp._needs_missing_features(tmp_path) is None


def test_default_venv_is_outside_the_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(llamacpp.VENV_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert llamacpp.default_venv() == Path.home() / ".cache" / "dllm-p2p" / f"llamacpp-{llamacpp.VERSION}"
    monkeypatch.setenv(llamacpp.VENV_ENV, str(tmp_path / "v"))
    assert llamacpp.default_venv() == tmp_path / "v"
    assert not str(llamacpp.default_venv()).startswith(str(ROOT))


def test_completions_body_bans_end_tokens() -> None:
    body = completions_body("Hi", 64, [0, 2])
    assert body == {"prompt": "Hi", "max_tokens": 64, "temperature": 0, "stream": False, "logit_bias": {"0": -100, "2": -100}}
    assert "logit_bias" not in completions_body("Hi", 64)


def test_end_tokens_need_llama_cpp(tmp_path: Path) -> None:
    with pytest.raises(llamacpp.Unavailable, match="cannot read the vocabulary of m.gguf: .*ModuleNotFoundError"):
        llamacpp.end_token_ids(_python_without_llama_cpp(tmp_path), tmp_path / "m.gguf")


# --- the report and the targets -------------------------------------------------------------


def _results(llamacpp_section: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {
        "meta": {
            "date": "2026-12-03T00:00:00+00:00", "git": "abc1234", "cpu": "test CPU", "cpus": 2, "torch": "2", "torch_threads": 2,
            "transformers": "5", "python": "3.11", "load_average_start": 0.5, "load_average_end": 0.7,
            "other_cpu_percent": 1.0, "steal_percent": 0.0, "duration_s": 60.0,
            "settings": {"new_tokens": 32, "llamacpp_new_tokens": 64, "batch_size": 16, "threads": 0, "only": ["llamacpp"]},
        },
        "llamacpp": llamacpp_section,
    }
    results["targets"] = evaluate(results)
    return results


def _measured() -> dict[str, Any]:
    def levels(tps: dict[int, float], ms: dict[int, float]) -> dict[str, Any]:
        return {str(k): {"clients": k, "tokens_per_s": v, "runs_tokens_per_s": [v], "median_latency_ms": ms[k], "requests": 2 * k} for k, v in tps.items()}

    return {
        "model": "smollm2", "new_tokens": 64, "gguf": "/x/SmolLM2.gguf", "requests_per_client": 2, "batch_size": 16,
        "load_average": [1.0], "other_cpu_percent": [0.0], "steal_percent": [1.0],
        "llama_cpp_server": {"llama_cpp_python": "0.3.36", "threads": 2, "n_ctx": 2048},
        "dllm": {"endpoint": "/api/generate", "completion_tokens": [64, 64], "levels": levels({1: 20.0, 8: 240.0}, {1: 3200.0, 8: 4100.0})},
        "llama_cpp": {"endpoint": "/v1/completions", "completion_tokens": [64, 64], "levels": levels({1: 40.0, 8: 60.0}, {1: 1600.0, 8: 9000.0})},
        "ratio": {"1": 0.5, "8": 4.0},
        "memory_mib": {"dllm_worker": {"rss_mib": 900.5, "peak_rss_mib": 1200.0}, "llama_cpp_server": {"rss_mib": 150.25, "peak_rss_mib": 160.0}},
    }


def _targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["key"]: t for t in results["targets"]}


def test_llamacpp_targets_pass_miss_and_not_measured() -> None:
    measured = _targets(_results(_measured()))
    assert measured["vs_llamacpp_8"]["value"] == 4.0 and measured["vs_llamacpp_8"]["status"] == "PASS"
    assert measured["vs_llamacpp_1"]["value"] == 0.5 and measured["vs_llamacpp_1"]["status"] == "MISS"

    skipped = _targets(_results({"model": "smollm2", "new_tokens": 64, "skipped": "no C/C++ compiler on PATH"}))
    for key in LLAMACPP_TARGETS:
        assert skipped[key]["value"] is None and skipped[key]["status"] == NOT_MEASURED
        assert skipped[key]["reason"] == "llama.cpp skipped: no C/C++ compiler on PATH"
    # Other targets whose benchmarks did not run are not measured either, without a reason.
    assert skipped["vs_baseline_8"]["status"] == NOT_MEASURED and "reason" not in skipped["vs_baseline_8"]

    absent = {t["key"]: t for t in evaluate({"meta": {}})}
    assert all(t["status"] == NOT_MEASURED for t in absent.values())


@pytest.mark.parametrize("style", ["plain", "markdown"])
def test_report_shows_the_llamacpp_comparison(style: str) -> None:
    out = io.StringIO()
    render(_results(_measured()), out, style)
    text = out.getvalue()
    assert "dllm-p2p vs llama.cpp (smollm2, same GGUF, 64 tokens" in text
    assert "64 new tokens per request" in text
    for figure in ("240.0", "60.0", "4.00x", "0.50x", "3200.0 ms", "9000.0 ms", "900.5 MiB", "1200.0 MiB", "150.2 MiB", "160.0 MiB"):
        assert figure in text, figure
    assert "Resident memory" in text and "PASS" in text and "MISS" in text
    if style == "markdown":
        assert "| 8 | 240.0 | 60.0 | 4.00x | 4100.0 ms | 9000.0 ms |" in text


@pytest.mark.parametrize("style", ["plain", "markdown"])
def test_report_shows_why_llamacpp_was_skipped(style: str) -> None:
    out = io.StringIO()
    render(_results({"model": "smollm2", "new_tokens": 64, "skipped": "pip failed; log: /tmp/x.log"}), out, style)
    text = out.getvalue()
    assert "not measured" in text and "pip failed; log: /tmp/x.log" in text
    assert "Resident memory" not in text and "PASS" not in text


def test_cli_options_reach_the_settings() -> None:
    from benchmarks.cli import build_parser, settings_from

    args = build_parser().parse_args(
        ["--only", "llamacpp", "--llamacpp", "off", "--llamacpp-venv", "/v", "--llamacpp-new-tokens", "16", "--gguf-model", "/m.gguf"]
    )
    settings = settings_from(args)
    settings.validate()
    assert (settings.only, settings.llamacpp, settings.llamacpp_venv, settings.llamacpp_new_tokens, settings.gguf_model) == (
        ("llamacpp",), "off", "/v", 16, "/m.gguf"
    )
    quick = settings_from(build_parser().parse_args(["--quick"]))
    assert "llamacpp" in quick.only and quick.levels == [1, 8] and quick.llamacpp == "auto"
    with pytest.raises(ValueError, match="--gguf-model"):
        settings_from(build_parser().parse_args(["--gguf-model", "tiny"])).validate()


def test_process_memory_reads_proc() -> None:
    from benchmarks.servers import proc_memory

    mine = proc_memory(os.getpid())
    if mine is None:
        pytest.skip("no /proc here")
    assert 0 < mine["rss_mib"] <= mine["peak_rss_mib"]
    assert proc_memory(None) is None


def test_ctrl_c_inside_trio_nurseries_counts_as_an_interrupt() -> None:
    from benchmarks.cli import _interrupted

    if sys.version_info >= (3, 11):
        group_type = BaseExceptionGroup
    else:
        from exceptiongroup import BaseExceptionGroup as group_type  # trio's dependency there
    group = group_type("nursery", [KeyboardInterrupt()])
    assert _interrupted(KeyboardInterrupt()) and _interrupted(group)
    assert _interrupted(group_type("outer", [group]))
    assert not _interrupted(group_type("mixed", [KeyboardInterrupt(), ValueError()]))
    assert not _interrupted(ValueError())


# --- spans: a model split across peers (opt-in; SmolLM2 is never loaded here) --------------


def _spans_section() -> dict[str, Any]:
    def config(name: str, workers: list[str], threads: int, tps: tuple[float, float], hops: list[float]) -> dict[str, Any]:
        def level(clients: int, value: float) -> dict[str, Any]:
            return {
                "clients": clients, "requests_per_client": 1, "requests": clients, "completion_tokens": [64, 64],
                "tokens_per_s": value, "median_latency_ms": 64000 / value, "step_ms": 1000 / value, "hops_ms": hops,
            }

        return {
            "name": name, "route_mode": "spans" if hops else "full", "workers": workers, "threads_per_worker": threads,
            "levels": {"1": level(1, tps[0]), "8": level(8, tps[1])},
            "memory": [{"layers": w, "full": not hops, "rss_mib": 700.0 + i, "model_rss_mib": 300.0 + i} for i, w in enumerate(workers)],
        }

    return {
        "model": "smollm2", "new_tokens": 64, "levels": [1, 8], "cores": 2, "sequential": 3, "requests_per_client": 1,
        "configs": [
            config("full worker", ["0:30"], 2, (25.0, 100.0), []),
            config("3 spans", ["0:10", "10:20", "20:30"], 1, (10.0, 40.0), [30.5, 31.25, 33.0]),
        ],
    }


@pytest.mark.parametrize("style", ["plain", "markdown"])
def test_report_shows_the_spans_routes(style: str) -> None:
    results = _results(_spans_section())
    results["spans"] = results.pop("llamacpp")
    results["meta"]["settings"].update(only=["spans"], spans_new_tokens=64)
    out = io.StringIO()
    render(results, out, style)
    text = out.getvalue()
    assert "A model split across peers: spans (smollm2, 64 tokens)" in text and "64 new tokens per request" in text
    for figure in ("100.0", "4.00x", "30.5 / 31.2 / 33.0", "3 x 1", "1 x 2", "0:10 10:20 20:30", "702.0 MiB", "302.0 MiB"):
        assert figure in text, figure
    if style == "markdown":
        assert "| 3 spans | 0:10 10:20 20:30 | 3 x 1 | 8 | 40.0 | 4.00x | 1600.0 ms | 25.0 ms | 30.5 / 31.2 / 33.0 |" in text


def test_spans_is_opt_in_and_skips_without_smollm2(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import spans
    from benchmarks.cli import build_parser, settings_from

    assert "spans" not in settings_from(build_parser().parse_args([])).only
    assert "spans" not in settings_from(build_parser().parse_args(["--quick"])).only
    settings = settings_from(build_parser().parse_args(["--only", "spans", "--spans-new-tokens", "16"]))
    settings.validate()
    assert settings.only == ("spans",) and settings.spans_new_tokens == 16 and settings.spans_levels == [1, 8]
    with pytest.raises(ValueError, match="--spans-new-tokens"):
        settings_from(build_parser().parse_args(["--spans-new-tokens", "1"])).validate()

    monkeypatch.setattr(spans, "find_smollm2", lambda: None)
    messages: list[str] = []
    section = spans.run(settings, messages.append)
    assert section["skipped"] and section["new_tokens"] == 16 and "configs" not in section
    assert messages == [f"spans: skipped: {section['skipped']}"]
    out = io.StringIO()
    results = _results(section)
    results["spans"] = results.pop("llamacpp")
    render(results, out, "plain")
    assert "spans (smollm2, 16 tokens): not measured" in out.getvalue()
