"""Timed samples and their summaries (medians, as the issue asks)."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Sample:
    """One timed request: wall seconds and the tokens it produced."""

    seconds: float
    tokens: int
    #: The serving engine's own time for this request, when the server reports it (ms).
    engine_ms: float | None = None
    #: Time to the first streamed text (streamed requests that produced text only).
    first_token_ms: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Median latency and tokens/s of one-at-a-time requests, plus the spread."""
    ms = [s.seconds * 1000 for s in samples]
    return {
        "requests": len(samples),
        "tokens_per_request": median([s.tokens for s in samples]),
        "median_ms": round(median(ms), 2),
        "min_ms": round(min(ms), 2) if ms else None,
        "max_ms": round(max(ms), 2) if ms else None,
        "median_tokens_per_s": round(median([s.tokens_per_second for s in samples]), 2),
        "median_first_token_ms": _round(median(first)) if (first := [s.first_token_ms for s in samples if s.first_token_ms is not None]) else None,
    }


def _round(value: float) -> float:
    return round(value, 2)


class CpuMeter:
    """CPU time used on this machine by processes other than this run (this process and its
    children, the servers), over an interval: the contamination a shared machine adds.

    Machine-wide busy time comes from ``/proc/stat``; ours from ``os.times`` (this process
    and children already reaped) plus ``/proc/<pid>/stat`` of live children. Linux only;
    elsewhere ``other_percent`` is None.
    """

    def __init__(self) -> None:
        self._start = self._snapshot()

    def other_percent(self) -> float | None:
        """Share of the machine's total CPU capacity (all cores) used by others since creation."""
        return self._percent(lambda start, end: max(0.0, (end[1] - start[1]) - (end[2] - start[2])))

    def steal_percent(self) -> float | None:
        """Share of the CPU capacity the hypervisor gave to other virtual machines (``steal``)."""
        return self._percent(lambda start, end: end[3] - start[3])

    def _percent(self, seconds: Any) -> float | None:
        end = self._snapshot()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        cpus = os.cpu_count() or 1
        return round(seconds(self._start, end) / ((end[0] - self._start[0]) * cpus) * 100, 1)

    @staticmethod
    def _snapshot() -> tuple[float, float, float, float] | None:
        try:
            hz = os.sysconf("SC_CLK_TCK")
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            # user nice system idle iowait irq softirq steal ...: busy = user..softirq minus idle, iowait
            busy = (sum(fields[:7]) - fields[3] - fields[4]) / hz
            steal = fields[7] / hz if len(fields) > 7 else 0.0
            t = os.times()
            ours = t.user + t.system + t.children_user + t.children_system
            me = os.getpid()
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                rest = stat[stat.rfind(")") + 2 :].split()
                if int(rest[1]) == me:  # ppid
                    ours += (int(rest[11]) + int(rest[12])) / hz  # utime + stime
            return time.monotonic(), busy, ours, steal
        except (OSError, ValueError, IndexError):
            return None


def load_average() -> float:
    """The 1-minute load average (the machine is shared: every phase records it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")
