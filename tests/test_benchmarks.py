"""Smoke test of ``python -m benchmarks``: a tiny run end to end, checking the JSON's shape.

No speed is asserted (the figures are benchmark results, not test outcomes); this only
proves that every benchmark runs, that its servers start and stop, and that each figure
is a positive number.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from .procs import ROOT, offline_env

pytestmark = pytest.mark.integration


def test_quick_benchmark_on_tiny_produces_every_figure() -> None:
    command = [
        sys.executable, "-m", "benchmarks", "--model", "tiny", "--quick", "--json",
        "--new-tokens", "8", "--sequential", "2", "--latency-requests", "3", "--warmup", "1",
    ]
    done = subprocess.run(command, cwd=ROOT, env=offline_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)

    assert {"meta", "overhead", "latency", "concurrency", "baseline", "limit", "targets"} <= results.keys()
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
    assert [t["key"] for t in results["targets"]] == [
        "single_request_vs_generate", "added_latency_ms", "scaling_8_vs_1", "vs_baseline_8", "vs_raw_loop_8"
    ]
    for target in results["targets"]:
        assert target["status"] in {"PASS", "MISS"} and target["value"] is not None
    assert "benchmark failed" not in done.stderr
