"""Resident memory of a process, from ``/proc`` (Linux; ``None`` elsewhere).

Workers report it in their heartbeats, with the share their model takes: what a process
holds before its model loads (Python, torch, libp2p: about 400 MiB here) is the same for
a worker holding 3 layers or 300, so the model's own memory is the figure that tells an
operator what a span costs.
"""

from __future__ import annotations


def proc_memory(pid: int | str = "self") -> dict[str, float] | None:
    """Resident set size now (``rss_mib``, VmRSS) and at its peak (``peak_rss_mib``, VmHWM), in MiB."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["rss_mib" if key == "VmRSS" else "peak_rss_mib"] = round(int(value.split()[0]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return out or None


def resident_mib(pid: int | str = "self") -> float | None:
    memory = proc_memory(pid)
    return None if memory is None else memory.get("rss_mib")
