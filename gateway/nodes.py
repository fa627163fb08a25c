"""What the gateway knows about each worker, and how it picks one for a request.

Nodes come from the verified registry (who exists, where, which models) and from signed
heartbeats (who is alive now, and how loaded). On top the gateway keeps what it observes
itself: latency, successes and failures, and a backoff for nodes that just failed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dllm_p2p.heartbeat import liveness_ttl
from dllm_p2p.route import Hop, plan_best, plan_route


NEUTRAL_REPUTATION = 0.8
#: Nodes the table remembers. Past it, nodes without a registry record are forgotten,
#: least recently heard first: a flood of fresh keys must not grow the table for ever.
MAX_NODES = 10_000
REPUTATION_HALF_LIFE = 300.0
REPUTATION_ALPHA = 0.25
TYPICAL_TOKENS = 32
#: What ``/api/spans`` shows of a span worker's load.
_SPAN_LOAD_KEYS = ("sessions", "max_sessions", "running", "capacity", "queued", "kv_cache_mb", "kv_cache_reserved_mb", "kv_cache_budget_mb")


@dataclass
class NodeState:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    role: str = "worker"
    registered: bool = False
    expires: float = 0.0
    #: Time of the last heartbeat (or successful request); 0 when never seen.
    last_seen: float = 0.0
    #: Seconds between its heartbeats, as it says (0: not said); see ``online``.
    every: float = 0.0
    first_seen: float = 0.0
    load: dict[str, Any] = field(default_factory=dict)
    #: Per model, as the node's heartbeats say: ``{"fingerprint": str | None, "chat": bool}``
    #: and, when it says which layers it holds, ``span`` ``[start, end]`` of ``layers``,
    #: ``hidden`` and ``forward`` (see ``serves_forward``).
    model_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    # observed by this gateway
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    latency_ms: float | None = None  # EWMA of time to first token
    tokens_per_s: float | None = None  # EWMA of decode speed
    backoff_until: float = 0.0
    last_error: str | None = None
    #: EWMA of outcomes (1 success, 0 failure or stall), from 0 to 1; see ``reputation``.
    outcome: float = NEUTRAL_REPUTATION
    last_outcome_at: float = 0.0
    # audits (gateway.audit)
    audits_passed: int = 0
    audits_failed: int = 0
    #: A failed audit: never routed to until it passes probe audits again.
    quarantined: bool = False
    quarantine_reason: str | None = None
    probation_passes: int = 0

    def online(self, now: float, ttl: float) -> bool:
        """Heard from within ``ttl``, or within three of its own intervals when it beats
        more slowly."""
        return self.last_seen > 0 and now - self.last_seen <= liveness_ttl(ttl, self.every)

    @property
    def success_rate(self) -> float | None:
        total = self.successes + self.failures
        return None if total == 0 else self.successes / total

    def reputation(self, now: float | None = None) -> float:
        """How much this gateway trusts the node, 0 to 1, from what it observed.

        An EWMA of request outcomes, so errors and stalls sink it fast and successes lift
        it back; with no traffic it drifts back toward neutral (half the gap every
        ``REPUTATION_HALF_LIFE`` seconds) so a node that failed once is tried again.
        """
        now = time.time() if now is None else now
        idle = max(0.0, now - self.last_outcome_at) if self.last_outcome_at else 0.0
        pull = 1 - 0.5 ** (idle / REPUTATION_HALF_LIFE)
        return self.outcome + (NEUTRAL_REPUTATION - self.outcome) * pull

    def load_fraction(self) -> float:
        capacity = max(1, int(self.load.get("capacity") or 1))
        busy = int(self.load.get("running") or 0) + int(self.load.get("queued") or 0)
        return busy / capacity

    def cost(self, now: float | None = None) -> float:
        """Lower is better: the expected time for a typical answer, in ms, divided by
        reputation. Unknown latency counts as 100 ms and unknown speed as 20 tokens/s, so
        new nodes get tried."""
        latency = self.latency_ms if self.latency_ms is not None else 100.0
        decode = TYPICAL_TOKENS * 1000.0 / (self.tokens_per_s or 20.0)
        return (latency + decode) * (1.0 + self.load_fraction()) / max(self.reputation(now), 0.05)

    # --- spans ---------------------------------------------------------------------------

    def serves_forward(self, model: str) -> bool:
        """Whether the node serves ``model`` as a span over ``/dllm/forward/1.0.0`` (and so
        not over ``/dllm/generate``). Its heartbeat says so with ``forward``; without it, a
        span that is not the whole model, or session counts in its load, mean a span worker
        (a full worker announces span ``[0, layers]`` too)."""
        info = self.model_info.get(model) or {}
        if "forward" in info:
            return bool(info["forward"])
        span = info.get("span")
        if span is None:
            return False
        return "max_sessions" in self.load or tuple(span) != (0, info.get("layers"))

    def generates(self, model: str | None) -> bool:
        """Whether the node answers ``/dllm/generate`` for ``model`` (None: for any model)."""
        if model is None:
            return any(not self.serves_forward(m) for m in self.models)
        return model in self.models and not self.serves_forward(model)

    def hop(self, model: str, now: float | None = None) -> Hop | None:
        """This node as a candidate hop of a route for ``model``, if it serves one."""
        info = self.model_info.get(model) or {}
        span, layers, fingerprint = info.get("span"), info.get("layers"), info.get("fingerprint")
        if model not in self.models or not self.serves_forward(model) or not span or not layers or not fingerprint:
            return None
        fraction = (span[1] - span[0]) / layers
        return Hop(self.peer_id, tuple(self.addrs), span[0], span[1], fingerprint, layers, info.get("hidden"), self.span_cost(fraction, now))

    def span_cost(self, fraction: float, now: float | None = None) -> float:
        """``cost`` of a span holding ``fraction`` of its model's layers, from its measured
        prompt latency and steps per second; unmeasured, a span is assumed to take that
        fraction of an unmeasured full worker's time. Busy means sessions or KV cache."""
        latency = self.latency_ms if self.latency_ms is not None else 100.0 * fraction
        decode = TYPICAL_TOKENS * 1000.0 / (self.tokens_per_s or 20.0 / max(fraction, 1e-3))
        return (latency + decode) * (1.0 + self.span_load()) / max(self.reputation(now), 0.05)

    def span_load(self) -> float:
        """The larger of a span worker's session occupancy and its KV-cache reservation."""
        load = self.load
        kv, budget = load.get("kv_cache_reserved_mb", load.get("kv_cache_mb")), load.get("kv_cache_budget_mb")
        cache = kv / budget if isinstance(kv, (int, float)) and isinstance(budget, (int, float)) and budget > 0 else 0.0
        return max(self.load_fraction(), min(cache, 1.0))


class NoLiveNode(Exception):
    def __init__(self, model: str | None) -> None:
        what = f"model {model!r}" if model else "any model"
        super().__init__(f"no live node serves {what}")
        self.model = model


class NodeTable:
    """All known nodes, keyed by peer id. Single-threaded: used from the trio loop only."""

    def __init__(
        self,
        ttl: float = 15.0,
        policy: str = "p2c",
        backoff_base: float = 2.0,
        backoff_max: float = 120.0,
        rng: random.Random | None = None,
        allow: Iterable[str] | None = None,
    ) -> None:
        if policy not in {"p2c", "random"}:
            raise ValueError(f"unknown policy {policy!r}: use p2c or random")
        self.ttl = ttl
        self.policy = policy
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.rng = rng or random.Random()
        #: When set, only these peer ids are ever routed to (an allow-list of workers).
        self.allow = frozenset(allow) if allow else None
        self.nodes: dict[str, NodeState] = {}

    def _get(self, peer_id: str) -> NodeState:
        node = self.nodes.get(peer_id)
        if node is None:
            if len(self.nodes) >= MAX_NODES:
                self._forget_one()
            node = self.nodes[peer_id] = NodeState(peer_id=peer_id, first_seen=time.time())
        return node

    def _forget_one(self) -> None:
        """Make room: drop the unregistered node heard from least recently (or, if all
        are registered, the one heard from least recently)."""
        pool = [n for n in self.nodes.values() if not n.registered] or list(self.nodes.values())
        victim = min(pool, key=lambda n: (n.last_seen, n.peer_id))
        del self.nodes[victim.peer_id]

    # --- updates -----------------------------------------------------------------------

    def update_from_registry(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace registry facts with the live records of a verified chain."""
        live = {self.register(record) for record in records if record.get("role", "worker") == "worker"}
        for peer_id, node in self.nodes.items():
            if peer_id not in live:
                node.registered = False

    def register(self, record: dict[str, Any]) -> str:
        """Take one verified registry record's facts; returns its peer id."""
        node = self._get(record["peer_id"])
        node.addrs = list(record.get("addrs", []))
        node.models = list(record.get("models", []))
        for name, facts in (record.get("spans") or {}).items():
            # Until its heartbeats say more (load, hidden size), a span worker's record
            # already says which layers of which weights it serves.
            known = node.model_info.setdefault(name, {"chat": False})
            known.setdefault("fingerprint", facts["fingerprint"])
            known.setdefault("span", list(facts["span"]))
            known.setdefault("layers", facts["layers"])
            known.setdefault("forward", True)
        node.expires = float(record.get("expires", 0))
        node.registered = True
        return node.peer_id

    def heartbeat(
        self,
        peer_id: str,
        *,
        models: list[str],
        load: dict[str, Any],
        addrs: list[str] | None = None,
        meta: dict[str, dict[str, Any]] | None = None,
        every: float = 0.0,
        now: float | None = None,
    ) -> None:
        node = self._get(peer_id)
        node.last_seen = max(node.last_seen, now if now is not None else time.time())
        node.every = every
        node.models = list(models) or node.models
        node.load = dict(load)
        if meta is not None:
            node.model_info = {name: dict(facts) for name, facts in meta.items() if name in node.models}
        if addrs:
            node.addrs = list(addrs)

    def bad_heartbeat(self, peer_id: str, reason: str) -> None:
        """A known node gossiped a heartbeat we cannot use: it costs reputation (no
        backoff: it may still answer well). Unknown senders are not added to the table."""
        if peer_id in self.nodes:
            self.record_failure(peer_id, f"bad heartbeat: {reason}", backoff=False)

    def forget(self, peer_id: str) -> None:
        """A node deregistered: drop it from routing at once."""
        node = self.nodes.get(peer_id)
        if node is not None:
            node.last_seen = 0.0
            node.registered = False

    def record_success(self, peer_id: str, first_token_ms: float, tokens: int, decode_s: float) -> None:
        node = self._get(peer_id)
        node.successes += 1
        node.consecutive_failures = 0
        node.backoff_until = 0.0
        node.last_seen = max(node.last_seen, time.time())
        node.latency_ms = _ewma(node.latency_ms, first_token_ms)
        node.outcome = _ewma(node.reputation(), 1.0, REPUTATION_ALPHA)
        node.last_outcome_at = time.time()
        if tokens > 1 and decode_s > 0:
            node.tokens_per_s = _ewma(node.tokens_per_s, tokens / decode_s)

    def record_failure(self, peer_id: str, error: str, *, backoff: bool = True) -> None:
        """Count a failure (lowers reputation); with ``backoff`` the node is skipped for
        2, 4, 8... seconds while other nodes can answer."""
        node = self._get(peer_id)
        node.failures += 1
        node.last_error = error
        node.outcome = _ewma(node.reputation(), 0.0, REPUTATION_ALPHA)
        node.last_outcome_at = time.time()
        if backoff:
            node.consecutive_failures += 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** (node.consecutive_failures - 1))
            node.backoff_until = time.time() + delay

    # --- queries -----------------------------------------------------------------------

    def online(self, now: float | None = None) -> list[NodeState]:
        now = time.time() if now is None else now
        return [n for n in self.nodes.values() if n.online(now, self.ttl) and n.addrs]

    def routable(self, now: float | None = None) -> list[NodeState]:
        """Online workers with a registry record: a heartbeat alone does not make a node
        routable (anyone can gossip one; a record is signed into the shared registry)."""
        return [
            n
            for n in self.online(now)
            if n.role == "worker" and n.registered and not n.quarantined and (self.allow is None or n.peer_id in self.allow)
        ]

    def auditors(self, model: str | None, fingerprint: str | None, exclude: Iterable[str] = ()) -> list[NodeState]:
        """Routable workers that serve ``model`` with exactly the weights ``fingerprint``
        names: only they can check an answer made with those weights."""
        excluded = set(exclude)
        return [
            n
            for n in self.routable()
            if n.peer_id not in excluded
            and fingerprint is not None
            and n.generates(model)
            and any(info.get("fingerprint") == fingerprint for name, info in n.model_info.items() if model is None or name == model)
        ]

    # --- audits ------------------------------------------------------------------------

    def record_audit(self, peer_id: str, *, passed: bool, reason: str) -> None:
        node = self._get(peer_id)
        if passed:
            node.audits_passed += 1
        else:
            node.audits_failed += 1

    def quarantine(self, peer_id: str, reason: str) -> bool:
        """Stop routing to ``peer_id`` after a failed audit; True if it was not already."""
        node = self._get(peer_id)
        node.audits_failed += 1
        node.probation_passes = 0
        node.quarantine_reason = reason
        node.outcome = 0.0
        node.last_outcome_at = time.time()
        newly, node.quarantined = not node.quarantined, True
        return newly

    def probation_pass(self, peer_id: str, needed: int) -> None:
        """A quarantined node passed a probe audit; after ``needed`` in a row it is free."""
        node = self._get(peer_id)
        if not node.quarantined:
            return
        node.probation_passes += 1
        if node.probation_passes >= needed:
            node.quarantined = False
            node.probation_passes = 0

    def models(self) -> list[str]:
        return sorted({m for n in self.routable() for m in n.models})

    def model_facts(self) -> dict[str, dict[str, Any]]:
        """Per model served by an online node: whether it is a chat model (any node says
        so) and the fingerprints it is served under (a name may cover several builds)."""
        facts: dict[str, dict[str, Any]] = {}
        for node in self.routable():
            for model in node.models:
                entry = facts.setdefault(model, {"chat": False, "fingerprints": []})
                info = node.model_info.get(model, {})
                entry["chat"] = entry["chat"] or bool(info.get("chat"))
                fingerprint = info.get("fingerprint")
                if fingerprint and fingerprint not in entry["fingerprints"]:
                    entry["fingerprints"].append(fingerprint)
        return dict(sorted(facts.items()))

    def candidates(self, model: str | None, exclude: Iterable[str] = (), now: float | None = None) -> list[NodeState]:
        """Routable workers that answer whole generations of ``model`` (span workers don't)."""
        now = time.time() if now is None else now
        excluded = set(exclude)
        return [n for n in self.routable(now) if n.peer_id not in excluded and n.generates(model)]

    # --- routes of spans -----------------------------------------------------------------

    def span_candidates(self, model: str, fingerprint: str | None = None, exclude: Iterable[str] = (), now: float | None = None) -> list[Hop]:
        """Routable span workers of ``model`` (of ``fingerprint`` when given) as candidate
        hops, with their costs; nodes in backoff are left out (a route has other ways)."""
        now = time.time() if now is None else now
        excluded = set(exclude)
        hops = []
        for node in self.routable(now):
            if node.peer_id in excluded or node.backoff_until > now:
                continue
            hop = node.hop(model, now)
            if hop is not None and (fingerprint is None or hop.fingerprint == fingerprint):
                hops.append(hop)
        return hops

    def has_spans(self, model: str | None, now: float | None = None) -> bool:
        """Whether any routable span worker serves ``model`` (None: any model)."""
        return any(node.hop(m, now) is not None for node in self.routable(now) for m in node.models if model in (None, m))

    def plan(self, model: str | None, now: float | None = None) -> tuple[str | None, list[Hop]]:
        """The cheapest complete route of spans for ``model`` (None: for any model that has
        one, by name), and the model; ``(model, [])`` when there is none."""
        models = [model] if model is not None else sorted({m for n in self.routable(now) for m in n.models})
        for name in models:
            route = plan_best(self.span_candidates(name, now=now))
            if route:
                return name, route
        return model, []

    def spans(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per model served by span workers: their spans, whether they chain into a
        complete route (and which), and how many full workers serve it too. A model whose
        spans come in several fingerprints shows the one closest to complete; the others
        are under ``alternatives``."""
        now = time.time() if now is None else now
        groups: dict[str, dict[tuple[str, int], list[NodeState]]] = {}
        for node in self.routable(now):
            for model in node.models:
                info = node.model_info.get(model) or {}
                if node.hop(model, now) is not None:
                    groups.setdefault(model, {}).setdefault((info["fingerprint"], info["layers"]), []).append(node)
        out: dict[str, dict[str, Any]] = {}
        for model, by_build in sorted(groups.items()):
            described = [self._describe_spans(model, fingerprint, layers, nodes, now) for (fingerprint, layers), nodes in by_build.items()]
            described.sort(key=lambda g: (not g["complete"], -g["covered"], g["fingerprint"]))
            best, *others = described
            out[model] = {**best, "full_workers": len(self.candidates(model, now=now)), "alternatives": others}
        return out

    def _describe_spans(self, model: str, fingerprint: str, layers: int, nodes: list[NodeState], now: float) -> dict[str, Any]:
        route = plan_route(self.span_candidates(model, fingerprint, now=now), layers)
        covered = set()
        spans = []
        for node in sorted(nodes, key=lambda n: (n.model_info[model]["span"], n.peer_id)):
            info = node.model_info[model]
            covered.update(range(*info["span"]))
            spans.append(
                {
                    "peer_id": node.peer_id,
                    "span": list(info["span"]),
                    "hidden": info.get("hidden"),
                    "load": {k: node.load[k] for k in _SPAN_LOAD_KEYS if k in node.load},
                    "cost_ms": round(node.span_cost((info["span"][1] - info["span"][0]) / layers, now), 1),
                    "latency_ms": None if node.latency_ms is None else round(node.latency_ms, 1),
                    "steps_per_s": None if node.tokens_per_s is None else round(node.tokens_per_s, 1),
                    "backoff_s": max(0.0, round(node.backoff_until - now, 1)),
                    "reputation": round(node.reputation(now), 3),
                }
            )
        return {
            "fingerprint": fingerprint,
            "layers": layers,
            "spans": spans,
            "covered": len(covered),
            "complete": bool(route),
            "route": [hop.describe() for hop in route] or None,
        }

    def choose(self, model: str | None, exclude: Iterable[str] = ()) -> NodeState:
        """Pick a node for ``model``: nodes in backoff only when nothing else is left.

        ``p2c`` (power of two choices): sample two candidates, keep the lower cost. It
        spreads load almost as well as picking the global best, without every gateway
        herding onto the same node.
        """
        now = time.time()
        candidates = self.candidates(model, exclude, now)
        if not candidates:
            raise NoLiveNode(model)
        ready = [n for n in candidates if n.backoff_until <= now] or candidates
        if self.policy == "random" or len(ready) == 1:
            return self.rng.choice(ready)
        a, b = self.rng.sample(ready, 2)
        return a if a.cost(now) <= b.cost(now) else b

    def describe(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        out = []
        for node in sorted(self.nodes.values(), key=lambda n: n.peer_id):
            rate = node.success_rate
            out.append(
                {
                    "peer_id": node.peer_id,
                    "online": node.online(now, self.ttl),
                    "role": node.role,
                    "registered": node.registered,
                    "models": node.models,
                    "model_info": node.model_info,
                    #: Models it serves as a span (``/dllm/forward``): the layers it holds.
                    "spans": {m: list(node.model_info[m]["span"]) for m in node.models if node.serves_forward(m) and node.model_info.get(m, {}).get("span")},
                    "addrs": node.addrs,
                    "last_seen": node.last_seen or None,
                    "seen_ago_s": round(now - node.last_seen, 1) if node.last_seen else None,
                    "uptime_s": node.load.get("uptime_s"),
                    "load": node.load,
                    "latency_ms": None if node.latency_ms is None else round(node.latency_ms, 1),
                    "tokens_per_s": None if node.tokens_per_s is None else round(node.tokens_per_s, 1),
                    "success_rate": None if rate is None else round(rate, 3),
                    "requests": node.successes + node.failures,
                    "backoff_s": max(0.0, round(node.backoff_until - now, 1)),
                    "last_error": node.last_error,
                    "reputation": round(node.reputation(now), 3),
                    "quarantined": node.quarantined,
                    "quarantine_reason": node.quarantine_reason,
                    "audits": {"passed": node.audits_passed, "failed": node.audits_failed},
                    "cost_ms": round(node.cost(now), 1),
                }
            )
        return out


def _ewma(previous: float | None, value: float, alpha: float = 0.3) -> float:
    """Exponentially weighted moving average; the first value is taken as is."""
    return value if previous is None else (1 - alpha) * previous + alpha * value
