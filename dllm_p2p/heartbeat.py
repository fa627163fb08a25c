"""Signed heartbeats: who is alive right now, and how loaded.

GossipSub already signs each message with the publisher's key (strict signing), but a
heartbeat carries its own signature too, so it stays verifiable wherever it is stored or
relayed, independent of the pubsub implementation. The topic validator checks both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .identity import Identity, peer_id_for, verify

TOPIC = "/dllm/heartbeat/1"
DOMAIN = b"dllm-heartbeat/1\n"
MAX_BYTES = 8 * 1024
#: Heartbeats stamped further than this from our clock are refused (old replays). Clocks
#: within it are tolerated: liveness is measured on the receiver's clock (Membership).
MAX_SKEW_S = 600.0

_FIELDS = {"peer_id": str, "public_key": bytes, "seq": int, "ts": float, "role": str, "models": list, "addrs": list, "load": dict}
#: Optional: per model, its fingerprint, whether it is a chat model and which layers it holds (``_parse_meta``);
#: ``every``, the sender's seconds between heartbeats, so that nodes beating at different
#: rates judge each other alive by the sender's rate (``Heartbeat.ttl``).
_OPTIONAL = {"meta": dict, "every": float, "ledger": dict}
MAX_EVERY_S = 3600.0
MAX_META_MODELS = 16
MAX_FINGERPRINT_CHARS = 80
MAX_MODELS = 16
MAX_ADDRS = 16
MAX_TEXT_CHARS = 256
MAX_LOAD_ENTRIES = 32
#: Bounds of a model's decoder layer count and hidden width in ``meta`` (far above any model).
MAX_LAYERS = 10_000
MAX_HIDDEN = 65_536
#: Load figures that routing computes with: whole numbers, ``capacity`` at least 1.
_LOAD_COUNTS = ("running", "queued", "capacity", "max_queue", "in_flight")


class InvalidHeartbeat(ValueError):
    pass


@dataclass(frozen=True)
class Heartbeat:
    peer_id: str
    seq: int
    ts: float
    role: str
    models: list[str]
    addrs: list[str]
    load: dict[str, Any]
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The sender's seconds between heartbeats (0: not said, an older sender).
    every: float = 0.0
    #: When it was sent, on the receiver's clock (set by ``Membership``; 0 until then).
    seen_at: float = 0.0
    #: The sender's ledger summary (credits.Ledger.summary), checked for shape only.
    ledger: dict[str, Any] | None = None
    #: The heartbeat as received: signed, so it is evidence of what the sender claimed.
    signed: bytes = field(default=b"", repr=False, compare=False)

    def ttl(self, default: float) -> float:
        return liveness_ttl(default, self.every)


def liveness_ttl(default: float, every: float) -> float:
    """Seconds a heartbeat keeps its sender online: the receiver's ``default``, or three
    of the sender's intervals (``every``, 0 when not said) and a second when it beats
    more slowly."""
    return max(default, 3 * every + 1.0)


def _body(fields: dict[str, Any]) -> bytes:
    return DOMAIN + msgpack.packb(fields, use_bin_type=True)


def make(
    identity: Identity,
    seq: int,
    *,
    role: str,
    models: list[str],
    addrs: list[str],
    load: dict[str, Any],
    meta: dict[str, dict[str, Any]] | None = None,
    every: float | None = None,
    now: float | None = None,
    ledger: dict[str, Any] | None = None,
) -> bytes:
    fields: dict[str, Any] = {
        "peer_id": identity.peer_id.to_base58(),
        "public_key": identity.public_key_bytes,
        "seq": seq,
        "ts": float(time.time() if now is None else now),
        "role": role,
        "models": models,
        "addrs": addrs,
        "load": load,
    }
    if meta:
        fields["meta"] = meta
    if every is not None:
        fields["every"] = float(every)
    if ledger is not None:
        fields["ledger"] = ledger
    return msgpack.packb({**fields, "sig": identity.sign(_body(fields))}, use_bin_type=True)


def parse(data: bytes, *, sender: str | None = None, now: float | None = None) -> Heartbeat:
    """Verify a heartbeat's shape, signature, key and freshness; raise ``InvalidHeartbeat``."""
    if len(data) > MAX_BYTES:
        raise InvalidHeartbeat(f"heartbeat of {len(data)} bytes is over {MAX_BYTES}")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise InvalidHeartbeat(f"not msgpack: {exc}") from None
    # Unknown keys are allowed (and signed): a newer sender's fields must not make an older
    # receiver drop its heartbeats.
    if not isinstance(message, dict) or not set(_FIELDS) | {"sig"} <= set(message) or len(message) > 32:
        raise InvalidHeartbeat("wrong fields")
    for key, kind in _FIELDS.items():
        value = message[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = message[key] = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidHeartbeat(f"'{key}' must be {kind.__name__}")
    if len(message["models"]) > MAX_MODELS or len(message["addrs"]) > MAX_ADDRS:
        raise InvalidHeartbeat(f"at most {MAX_MODELS} models and {MAX_ADDRS} addrs")
    if not all(isinstance(m, str) and 0 < len(m) <= MAX_TEXT_CHARS for m in message["models"] + message["addrs"]):
        raise InvalidHeartbeat(f"models and addrs must be strings of 1 to {MAX_TEXT_CHARS} characters")
    if message["role"] not in ("worker", "gateway", "relay"):
        raise InvalidHeartbeat("unknown role")
    _check_load(message["load"])
    signature = message.pop("sig")
    if not isinstance(signature, bytes):
        raise InvalidHeartbeat("'sig' must be bytes")
    try:
        owner = peer_id_for(message["public_key"])
    except Exception:
        raise InvalidHeartbeat("unreadable public key") from None
    if owner != message["peer_id"]:
        raise InvalidHeartbeat("peer id does not match the public key")
    if not all(addr.startswith("/") and addr.endswith(f"/p2p/{owner}") for addr in message["addrs"]):
        raise InvalidHeartbeat("every address must be a multiaddr ending in the sender's /p2p/<peer-id>")
    if sender is not None and sender != owner:
        raise InvalidHeartbeat("published by another peer")
    if not verify(message["public_key"], _body(message), signature):
        raise InvalidHeartbeat("bad signature")
    now = time.time() if now is None else now
    if abs(now - message["ts"]) > MAX_SKEW_S:
        raise InvalidHeartbeat(f"timestamp {message['ts']:.0f} is more than {MAX_SKEW_S:g} s from now")
    meta = _parse_meta(message.get("meta", {}))
    every = message.get("every", 0.0)
    if isinstance(every, int) and not isinstance(every, bool):
        every = float(every)
    if not isinstance(every, float) or not 0 <= every <= MAX_EVERY_S:
        raise InvalidHeartbeat(f"'every' must be a number of seconds from 0 to {MAX_EVERY_S:g}")
    ledger = _parse_ledger(message["ledger"]) if "ledger" in message else None
    return Heartbeat(
        ledger=ledger,
        signed=data,
        meta=meta,
        every=every,
        peer_id=owner,
        seq=message["seq"],
        ts=message["ts"],
        role=message["role"],
        models=message["models"],
        addrs=message["addrs"],
        load=message["load"],
    )


def _parse_meta(meta: Any) -> dict[str, dict[str, Any]]:
    """The known facts per model, typed; unknown keys are ignored (newer senders).

    Besides ``fingerprint`` and ``chat``, a worker may say which decoder layers it holds:
    ``span`` ``[start, end]`` of ``layers`` in all, ``hidden`` (the width of the hidden
    states a span sends), and ``forward`` (it serves the span over
    ``/dllm/forward/1.0.0`` rather than whole generations). Routing chains spans by these
    numbers, so they are checked here, where a lie costs the liar its heartbeat.
    """
    if not isinstance(meta, dict) or len(meta) > MAX_META_MODELS:
        raise InvalidHeartbeat(f"'meta' must be a map of at most {MAX_META_MODELS} models")
    out: dict[str, dict[str, Any]] = {}
    for name, facts in meta.items():
        if not isinstance(name, str) or not isinstance(facts, dict):
            raise InvalidHeartbeat("'meta' must map model names to maps")
        fingerprint, chat = facts.get("fingerprint"), facts.get("chat", False)
        if fingerprint is not None and (not isinstance(fingerprint, str) or len(fingerprint) > MAX_FINGERPRINT_CHARS):
            raise InvalidHeartbeat(f"meta[{name!r}].fingerprint must be a string of at most {MAX_FINGERPRINT_CHARS} characters")
        if not isinstance(chat, bool):
            raise InvalidHeartbeat(f"meta[{name!r}].chat must be a boolean")
        out[name] = {"fingerprint": fingerprint, "chat": chat, **_span_facts(name, facts)}
    return out


def _span_facts(name: str, facts: dict[str, Any]) -> dict[str, Any]:
    """``span``, ``layers``, ``hidden`` and ``forward`` of one model's meta, those present."""
    out: dict[str, Any] = {}
    for key, top in (("layers", MAX_LAYERS), ("hidden", MAX_HIDDEN)):
        if facts.get(key) is not None:
            value = facts[key]
            if not _whole(value) or not 1 <= value <= top:
                raise InvalidHeartbeat(f"meta[{name!r}].{key} must be a whole number from 1 to {top}")
            out[key] = value
    if facts.get("span") is not None:
        span, layers = facts["span"], out.get("layers", MAX_LAYERS)
        if not isinstance(span, list) or len(span) != 2 or not all(_whole(v) for v in span) or not 0 <= span[0] < span[1] <= layers:
            raise InvalidHeartbeat(f"meta[{name!r}].span must be [start, end] with 0 <= start < end <= {layers}")
        out["span"] = [span[0], span[1]]
    if facts.get("forward") is not None:
        if not isinstance(facts["forward"], bool):
            raise InvalidHeartbeat(f"meta[{name!r}].forward must be a boolean")
        out["forward"] = facts["forward"]
    return out


MAX_LEDGER_RECENT = 8


def _parse_ledger(summary: Any) -> dict[str, Any]:
    """``ledger``: the sender's ledger head and totals (credits.Ledger.summary)."""
    def digest(value: Any) -> bool:
        return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)

    if not isinstance(summary, dict) or not {"seq", "head", "earned", "spent", "recent"} <= set(summary):
        raise InvalidHeartbeat("'ledger' needs seq, head, earned, spent and recent")
    if not all(_whole(summary[k]) and 0 <= summary[k] < 2**62 for k in ("seq", "earned", "spent")) or not digest(summary["head"]):
        raise InvalidHeartbeat("'ledger' seq, earned and spent must be whole numbers >= 0 and head a sha256")
    recent = summary["recent"]
    if not isinstance(recent, list) or len(recent) > MAX_LEDGER_RECENT or not all(
        isinstance(r, list) and len(r) == 2 and _whole(r[0]) and 0 < r[0] <= summary["seq"] and digest(r[1]) for r in recent
    ):
        raise InvalidHeartbeat(f"'ledger.recent' must be at most {MAX_LEDGER_RECENT} [seq, sha256] pairs")
    return {k: summary[k] for k in ("seq", "head", "earned", "spent")} | {"recent": [list(r) for r in recent]}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_load(load: dict[str, Any]) -> None:
    """``load`` is read by routing and shown on the page: small, flat and typed."""
    if len(load) > MAX_LOAD_ENTRIES:
        raise InvalidHeartbeat(f"'load' has more than {MAX_LOAD_ENTRIES} entries")
    for key, value in load.items():
        if not isinstance(key, str) or len(key) > 32:
            raise InvalidHeartbeat("'load' keys must be short strings")
        if isinstance(value, str):
            if len(value) > 32:
                raise InvalidHeartbeat(f"load.{key} is too long")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 2**53:
            raise InvalidHeartbeat(f"load.{key} must be a number >= 0 or a short string")
    for key in _LOAD_COUNTS:
        if key in load and (not isinstance(load[key], int) or isinstance(load[key], bool)):
            raise InvalidHeartbeat(f"load.{key} must be a whole number")
    if load.get("capacity", 1) < 1:
        raise InvalidHeartbeat("load.capacity must be at least 1")
