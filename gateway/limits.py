"""Per-client rate limiting: a token bucket per API key (or client address)."""

from __future__ import annotations

import time
from collections import OrderedDict


class RateLimiter:
    """``rate`` requests per second sustained, bursts up to ``burst``; 0 turns it off.

    Buckets are kept for at most ``max_clients`` clients (least recently seen dropped),
    so a flood of distinct addresses can't grow memory without bound.
    """

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, client: str, now: float | None = None) -> tuple[bool, float]:
        """(allowed, seconds to wait before the next request would be)."""
        if self.rate <= 0:
            return True, 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return allowed, 0.0 if allowed else (1.0 - tokens) / self.rate
