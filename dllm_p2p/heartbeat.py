"""Signed heartbeats: who is alive right now, and how loaded.

GossipSub already signs each message with the publisher's key (strict signing), but a
heartbeat carries its own signature too, so it stays verifiable wherever it is stored or
relayed, independent of the pubsub implementation. The topic validator checks both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack

from .identity import Identity, peer_id_for, verify

TOPIC = "/dllm/heartbeat/1"
DOMAIN = b"dllm-heartbeat/1\n"
MAX_BYTES = 8 * 1024
#: Heartbeats stamped further than this from our clock are refused (replays, bad clocks).
MAX_SKEW_S = 60.0

_FIELDS = {"peer_id": str, "public_key": bytes, "seq": int, "ts": float, "role": str, "models": list, "addrs": list, "load": dict}


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


def _body(fields: dict[str, Any]) -> bytes:
    return DOMAIN + msgpack.packb(fields, use_bin_type=True)


def make(
    identity: Identity, seq: int, *, role: str, models: list[str], addrs: list[str], load: dict[str, Any], now: float | None = None
) -> bytes:
    fields = {
        "peer_id": identity.peer_id.to_base58(),
        "public_key": identity.public_key_bytes,
        "seq": seq,
        "ts": float(time.time() if now is None else now),
        "role": role,
        "models": models,
        "addrs": addrs,
        "load": load,
    }
    return msgpack.packb({**fields, "sig": identity.sign(_body(fields))}, use_bin_type=True)


def parse(data: bytes, *, sender: str | None = None, now: float | None = None) -> Heartbeat:
    """Verify a heartbeat's shape, signature, key and freshness; raise ``InvalidHeartbeat``."""
    if len(data) > MAX_BYTES:
        raise InvalidHeartbeat(f"heartbeat of {len(data)} bytes is over {MAX_BYTES}")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise InvalidHeartbeat(f"not msgpack: {exc}") from None
    if not isinstance(message, dict) or set(message) != set(_FIELDS) | {"sig"}:
        raise InvalidHeartbeat("wrong fields")
    for key, kind in _FIELDS.items():
        value = message[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = message[key] = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidHeartbeat(f"'{key}' must be {kind.__name__}")
    if not all(isinstance(m, str) for m in message["models"] + message["addrs"]):
        raise InvalidHeartbeat("models and addrs must be strings")
    signature = message.pop("sig")
    if not isinstance(signature, bytes):
        raise InvalidHeartbeat("'sig' must be bytes")
    try:
        owner = peer_id_for(message["public_key"])
    except Exception:
        raise InvalidHeartbeat("unreadable public key") from None
    if owner != message["peer_id"]:
        raise InvalidHeartbeat("peer id does not match the public key")
    if sender is not None and sender != owner:
        raise InvalidHeartbeat("published by another peer")
    if not verify(message["public_key"], _body(message), signature):
        raise InvalidHeartbeat("bad signature")
    now = time.time() if now is None else now
    if abs(now - message["ts"]) > MAX_SKEW_S:
        raise InvalidHeartbeat(f"timestamp {message['ts']:.0f} is more than {MAX_SKEW_S:g} s from now")
    return Heartbeat(
        peer_id=owner,
        seq=message["seq"],
        ts=message["ts"],
        role=message["role"],
        models=message["models"],
        addrs=message["addrs"],
        load=message["load"],
    )
