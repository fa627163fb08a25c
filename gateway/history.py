"""A bounded history of the network as this gateway sees it, for ``/api/history`` and the
page's charts.

Every ``interval`` seconds (``--history-interval``, 10 by default) ``History.sample`` takes
one sample of every node in the ``NodeTable`` (from ``NodeTable.describe``) and one of the
gateway as a whole. Memory is bounded whatever the network does:

* each node keeps its last ``CAPACITY`` samples (360: an hour at 10 s), in a ring of
  doubles rather than a deque of Python objects: 8 bytes a value, about 43 KB a node;
* at most ``MAX_NODES`` (512) nodes are kept, about 22 MB at worst; past that the least
  recently seen (by heartbeat) are dropped, so a flood of fresh keys never grows it;
* a node gone from the table keeps its samples until they are all older than the
  window (``CAPACITY`` samples), or until a more recently seen node needs its place.

The answer's shape: column arrays, one list per series, index ``i`` of every list from
the same sample; ``null`` where a value was unknown (no latency measured yet, no ledger)::

    {"enabled": true, "interval_s": 10, "capacity": 360, "max_nodes": 512, "now": 1700000000.0,
     "gateway": {"samples": 2, "series": {"t": [...], "online": [...], "known": [...], "requests": [...], "errors": [...],
                                          "blocks": [...], "records": [...]},
                 "publications": [{"cid": "bafy...", "first_seen": 1699999990.0, "published_at": 1699999989.5,
                                   "head": "9f2c...", "blocks": 7, "ipns": "k51...", "ipns_cid": "bafy...",
                                   "named_at": 1699999995.1}, ...]},
     "nodes": {"12D3KooW...": {"peer_id": "12D3KooW...", "role": "worker", "last_seen": 1699999999.2,
                               "samples": 2, "series": {"t": [...], "online": [1, 1], "tokens_per_s": [...], ...}}}}

``t`` is the sample's time (Unix seconds). Node series (``NODE_SERIES``): ``online`` and
``quarantined`` are 0/1 (the uptime timeline is ``online``); ``tokens_per_s`` is the
worker's recent throughput as its heartbeat says (``load.tokens_per_second``) and
``decode_tokens_per_s`` the decode speed this gateway measured; ``latency_ms`` the measured
time to first token; ``running``, ``queued``, ``capacity`` its load; ``requests`` and
``errors`` are cumulative counts of this gateway's requests to it (so a chart of errors
plots their increase between samples); ``success_rate``, ``reputation``; ``earned_mc`` and
``spent_mc`` its gossiped ledger totals. Gateway series (``GATEWAY_SERIES``): ``online``
and ``known`` nodes, the cumulative ``requests`` and ``errors`` of its HTTP API, and the
registry as ``/api/registry`` says (the ``registry`` callable, ``describe_registry``):
its ``blocks`` and its live ``records`` (null without a registry).

``publications``: the registry's publications this gateway saw, one per distinct CID,
oldest first, the last ``MAX_PUBLICATIONS`` (64) only: the ``cid``, when a sample first
saw it (``first_seen``) and when the publisher says it published it (``published_at``),
the chain's ``head`` hash and ``blocks`` at that sample, the registry's IPNS name
(``ipns``) and the CID that name pointed to then (``ipns_cid``), and ``named_at``: when the
name was first seen pointing at this CID (the publisher's ``ipns_at``), null until then.
Fields unknown are null. ``since`` leaves out those first seen up to that time too.
"""

from __future__ import annotations

import logging
import math
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import trio

from .nodes import NodeTable

log = logging.getLogger(__name__)

#: Samples kept per node: an hour at the default interval.
CAPACITY = 360
#: Nodes kept at most; the least recently seen are dropped first.
MAX_NODES = 512
#: Publications of the registry kept (distinct CIDs); the oldest are dropped first.
MAX_PUBLICATIONS = 64
DEFAULT_INTERVAL = 10.0

NODE_SERIES = (
    "t", "online", "tokens_per_s", "decode_tokens_per_s", "latency_ms", "running", "queued", "capacity",
    "requests", "errors", "success_rate", "reputation", "quarantined", "earned_mc", "spent_mc",
)
GATEWAY_SERIES = ("t", "online", "known", "requests", "errors", "blocks", "records")

Value = float | int | bool | None


class Ring:
    """The last ``capacity`` rows of ``len(columns)`` numbers, in one flat array of
    doubles (NaN for None): a fixed size whatever is stored, no object per value."""

    __slots__ = ("capacity", "width", "data", "count", "head")

    def __init__(self, capacity: int, width: int) -> None:
        if capacity < 1 or width < 1:
            raise ValueError("a ring needs room for at least one row of one value")
        self.capacity = capacity
        self.width = width
        self.data = array("d")
        self.count = 0  # rows held
        self.head = 0  # the oldest row, once full

    def __len__(self) -> int:
        return self.count

    def append(self, row: Sequence[Value]) -> None:
        if len(row) != self.width:
            raise ValueError(f"a row of {len(row)} values in a ring {self.width} wide")
        values = array("d", (math.nan if v is None else float(v) for v in row))
        if self.count < self.capacity:
            self.data.extend(values)
            self.count += 1
        else:
            at = self.head * self.width
            self.data[at : at + self.width] = values
            self.head = (self.head + 1) % self.capacity

    def _row(self, k: int) -> int:
        """Where the ``k``-th oldest row starts in ``data``."""
        return ((self.head + k) % self.capacity) * self.width

    def rows(self) -> Iterator[array]:  # type: ignore[type-arg]
        for k in range(self.count):
            at = self._row(k)
            yield self.data[at : at + self.width]

    def last(self, column: int) -> float | None:
        if not self.count:
            return None
        value = self.data[self._row(self.count - 1) + column]
        return None if math.isnan(value) else value

    def columns(self, names: Sequence[str], since: float | None = None) -> dict[str, list[Value]]:
        """Column arrays, oldest first; with ``since``, only rows whose first value (the
        time) is above it."""
        out: dict[str, list[Value]] = {name: [] for name in names}
        lists = [out[name] for name in names]
        for row in self.rows():
            if since is not None and not row[0] > since:
                continue
            for target, value in zip(lists, row):
                target.append(_json_number(value))
        return out


class _Track:
    __slots__ = ("role", "seen", "ring")

    def __init__(self, role: str, capacity: int) -> None:
        self.role = role
        #: When the table last heard from the node (0: never): what eviction goes by.
        self.seen = 0.0
        self.ring = Ring(capacity, len(NODE_SERIES))


class History:
    """The last ``capacity`` samples of every node (at most ``max_nodes``) and of the gateway.

    ``sample()`` takes one sample now (``clock()``, wall time by default); ``run()`` does it
    every ``interval`` seconds, forever. ``credits`` gives a peer's ledger summary (as
    ``LedgerService.peer_credits``) and ``figures`` the gateway's cumulative counts
    (``{"requests": n, "errors": n}``, see ``metrics_figures``); ``registry`` the registry's
    state (as ``/api/registry``: ``head``, ``blocks``, ``nodes``, ``cid``, ``ipns``...); all
    are optional. Single-threaded: used from the trio loop, like the table.
    """

    def __init__(
        self,
        table: NodeTable,
        *,
        interval: float = DEFAULT_INTERVAL,
        capacity: int = CAPACITY,
        max_nodes: int = MAX_NODES,
        clock: Callable[[], float] = time.time,
        credits: Callable[[str], dict[str, Any] | None] | None = None,
        figures: Callable[[], dict[str, float]] | None = None,
        registry: Callable[[], dict[str, Any]] | None = None,
        max_publications: int = MAX_PUBLICATIONS,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"the history interval must be above 0 seconds, not {interval:g}")
        if max_nodes < 1:
            raise ValueError("the history must keep at least one node")
        self.table = table
        self.interval = float(interval)
        self.capacity = capacity
        self.max_nodes = max_nodes
        self.clock = clock
        self.credits = credits
        self.figures = figures
        self.registry = registry
        self.max_publications = max_publications
        #: The registry's publications by CID, oldest first (dicts keep their order).
        self.publications: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, _Track] = {}
        self.gateway = Ring(capacity, len(GATEWAY_SERIES))

    @property
    def window(self) -> float:
        """Seconds of history kept: ``capacity`` samples ``interval`` apart."""
        return self.capacity * self.interval

    # --- sampling ----------------------------------------------------------------------

    async def run(self) -> None:
        """Sample now, then every ``interval`` seconds (on trio's clock, without drift)."""
        deadline = trio.current_time()
        while True:
            self.sample()
            deadline += self.interval
            await trio.sleep_until(max(deadline, trio.current_time()))

    def sample(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        rows = {row["peer_id"]: row for row in self.table.describe(now)}
        self._make_room(rows)
        online = 0
        for peer_id, row in rows.items():
            online += bool(row.get("online"))
            track = self.nodes.get(peer_id)
            if track is None:
                continue  # no room: less recently seen than every node kept
            track.role = str(row.get("role") or "worker")
            track.seen = float(row.get("last_seen") or 0.0)
            track.ring.append(self._node_row(now, row))
        self._drop_expired(now)
        figures = self.figures() if self.figures is not None else {}
        registry = self._registry()
        blocks, records = _count(registry.get("blocks")), _count(registry.get("nodes"))
        self._note_publication(now, registry, blocks)
        self.gateway.append((round(now, 3), online, len(rows), figures.get("requests"), figures.get("errors"), blocks, records))

    def _registry(self) -> dict[str, Any]:
        """The registry's state now; empty without one (or when it cannot be read: a
        sample is still taken, and the loop goes on)."""
        if self.registry is None:
            return {}
        try:
            info = self.registry()
        except Exception:
            log.warning("history: cannot read the registry's state", exc_info=True)
            return {}
        return info if isinstance(info, dict) else {}

    def _note_publication(self, now: float, registry: dict[str, Any], blocks: int | float | None) -> None:
        """Remember the registry's CID if it is new, and when its IPNS name points at one kept."""
        cid, target = _text(registry.get("cid")), _text(registry.get("ipns_cid"))
        if cid is not None and cid not in self.publications:
            self.publications[cid] = {
                "cid": cid,
                "first_seen": round(now, 3),
                "published_at": _number(registry.get("published_at")),
                "head": _text(registry.get("head")),
                "blocks": blocks,
                "ipns": _text(registry.get("ipns")),
                "ipns_cid": target,
                "named_at": None,
            }
            while len(self.publications) > self.max_publications:
                del self.publications[next(iter(self.publications))]
        named = self.publications.get(target) if target is not None else None
        if named is not None and named["named_at"] is None:
            named["named_at"] = _number(registry.get("ipns_at")) or round(now, 3)

    def _make_room(self, rows: dict[str, dict[str, Any]]) -> None:
        """Keep the ``max_nodes`` most recently seen of the nodes in the table and those
        remembered; a node already kept wins a tie (no churn among never-seen nodes)."""
        candidates: dict[str, tuple[float, bool]] = {peer_id: (track.seen, True) for peer_id, track in self.nodes.items()}
        for peer_id, row in rows.items():
            candidates[peer_id] = (float(row.get("last_seen") or 0.0), peer_id in self.nodes)
        if len(candidates) > self.max_nodes:
            ranked = sorted(candidates, key=lambda p: (-candidates[p][0], not candidates[p][1], p))
            keep = set(ranked[: self.max_nodes])
            for peer_id in [p for p in self.nodes if p not in keep]:
                del self.nodes[peer_id]
        else:
            keep = set(candidates)
        for peer_id, row in rows.items():
            if peer_id in keep and peer_id not in self.nodes:
                self.nodes[peer_id] = _Track(str(row.get("role") or "worker"), self.capacity)

    def _drop_expired(self, now: float) -> None:
        """Forget nodes whose newest sample left the window (they left the table)."""
        for peer_id in [p for p, track in self.nodes.items() if (track.ring.last(0) or 0.0) < now - self.window]:
            del self.nodes[peer_id]

    def _node_row(self, now: float, row: dict[str, Any]) -> tuple[Value, ...]:
        load = row.get("load") if isinstance(row.get("load"), dict) else {}
        node = self.table.nodes.get(row["peer_id"])
        requests = _number(row.get("requests"))
        if node is not None:
            errors: Value = node.failures
        elif requests is not None and _number(row.get("success_rate")) is not None:
            errors = round(requests * (1 - row["success_rate"]))
        else:
            errors = None
        credits = self.credits(row["peer_id"]) if self.credits is not None else row.get("credits")
        credits = credits if isinstance(credits, dict) else {}
        values = {
            "t": round(now, 3),
            "online": bool(row.get("online")),
            "tokens_per_s": _number(load.get("tokens_per_second")),
            "decode_tokens_per_s": _number(row.get("tokens_per_s")),
            "latency_ms": _number(row.get("latency_ms")),
            "running": _number(load.get("running")),
            "queued": _number(load.get("queued")),
            "capacity": _number(load.get("capacity")),
            "requests": requests,
            "errors": errors,
            "success_rate": _number(row.get("success_rate")),
            "reputation": _number(row.get("reputation")),
            "quarantined": bool(row.get("quarantined")),
            "earned_mc": _number(credits.get("earned_mc")),
            "spent_mc": _number(credits.get("spent_mc")),
        }
        return tuple(values[name] for name in NODE_SERIES)

    # --- reading -----------------------------------------------------------------------

    def _head(self) -> dict[str, Any]:
        return {"enabled": True, "interval_s": self.interval, "capacity": self.capacity, "max_nodes": self.max_nodes, "now": round(self.clock(), 3)}

    def describe(self, since: float | None = None, nodes: bool = True) -> dict[str, Any]:
        """Everything (see the module's docstring); ``nodes=False`` leaves the nodes out
        (the gateway's series only), ``since`` leaves out samples taken up to that time."""
        out = self._head()
        out["gateway"] = {
            "samples": len(self.gateway),
            "series": self.gateway.columns(GATEWAY_SERIES, since),
            "publications": [dict(p) for p in self.publications.values() if since is None or p["first_seen"] > since],
        }
        out["nodes"] = {peer_id: self._node(peer_id, track, since) for peer_id, track in sorted(self.nodes.items())} if nodes else {}
        return out

    def node(self, peer_id: str, since: float | None = None) -> dict[str, Any] | None:
        """One node's history, as in ``describe``; None for a node without one."""
        track = self.nodes.get(peer_id)
        if track is None:
            return None
        return {**self._head(), **self._node(peer_id, track, since)}

    def _node(self, peer_id: str, track: _Track, since: float | None) -> dict[str, Any]:
        return {
            "peer_id": peer_id,
            "role": track.role,
            "last_seen": track.seen or None,
            "samples": len(track.ring),
            "series": track.ring.columns(NODE_SERIES, since),
        }

    @staticmethod
    def empty() -> dict[str, Any]:
        """What ``/api/history`` says for a gateway that keeps none."""
        return {
            "enabled": False, "interval_s": None, "capacity": 0, "max_nodes": 0, "now": round(time.time(), 3),
            "gateway": {"samples": 0, "series": {name: [] for name in GATEWAY_SERIES}, "publications": []}, "nodes": {},
        }


def metrics_figures(metrics: Any) -> Callable[[], dict[str, float]]:
    """The gateway's cumulative counts from its Prometheus metrics (``gateway.app.Metrics``):
    requests answered on every endpoint whatever the status, and errors."""
    return lambda: {"requests": counter_total(metrics.requests), "errors": counter_total(metrics.errors)}


def counter_total(counter: Any) -> float:
    """The sum of a Prometheus counter over all its labels."""
    return sum(s.value for metric in counter.collect() for s in metric.samples if s.name.endswith("_total"))


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _count(value: Any) -> int | float | None:
    """A count from the registry's state: a number, or the length of a list of things."""
    return len(value) if isinstance(value, (list, tuple, dict)) else _number(value)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _json_number(value: float) -> float | int | None:
    if math.isnan(value):
        return None
    return int(value) if value.is_integer() and abs(value) < 2**53 else value
