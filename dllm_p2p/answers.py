"""Signed answers: any answer can be attributed, offline, to the worker that produced it.

A worker signs every final ``done`` frame with its node key. The signed statement names
the request (the sha256 of the exact request frame body the worker read, so the dialer,
who wrote those bytes, can check it), the output (sha256 of the text, and of the token
ids), the model and its fingerprint, usage and finish reason, and the worker's peer id.
It is signed over ``DOMAIN`` + the canonical JSON of the statement (keys sorted, no
whitespace, ASCII), the registry's pattern, so no other signature of the node can be
replayed as an answer's, nor an answer's as anything else.

What a valid signature proves: this peer id's key signed that this text (and these tokens)
answered the request with that hash, using a model it calls by that name and fingerprint.
It does not prove the model was actually run: that is what audits are for.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from .identity import Identity, peer_id_for, verify

DOMAIN = b"dllm-answer/1\n"
FIELDS = ("peer_id", "id", "request", "output", "tokens", "model", "fingerprint", "finish_reason", "usage")


class InvalidAnswer(ValueError):
    """A signature object that does not verify, or does not match the answer."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def token_digest(token_ids: list[int]) -> str:
    """sha256 of the token ids as consecutive 4-byte big-endian unsigned integers."""
    return digest(b"".join(int(t).to_bytes(4, "big") for t in token_ids))


def canonical(statement: dict[str, Any]) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def sign(
    identity: Identity,
    *,
    request_body: bytes,
    request_id: str | None,
    text: str,
    token_ids: list[int],
    model: str,
    fingerprint: str | None,
    finish_reason: str,
    usage: dict[str, int],
) -> dict[str, Any]:
    """The ``signature`` object of a ``done`` frame."""
    statement = {
        "peer_id": identity.peer_id.to_base58(),
        "id": request_id,
        "request": digest(request_body),
        "output": digest(text.encode("utf-8")),
        "tokens": token_digest(token_ids),
        "model": model,
        "fingerprint": fingerprint,
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": int(usage["prompt_tokens"]), "completion_tokens": int(usage["completion_tokens"])},
    }
    signature = identity.sign(DOMAIN + canonical(statement))
    return {**statement, "public_key": identity.public_key_b64, "sig": base64.b64encode(signature).decode("ascii")}


def check(signature: Any, *, text: str | None = None, request_body: bytes | None = None, peer_id: str | None = None) -> dict[str, Any]:
    """Verify a ``signature`` object; with ``text``, ``request_body`` or ``peer_id`` also
    check that it is about that text, that request and that signer. Returns the
    statement; raises ``InvalidAnswer`` naming the first problem."""
    if not isinstance(signature, dict):
        raise InvalidAnswer("signature must be a map")
    missing = [f for f in (*FIELDS, "public_key", "sig") if f not in signature]
    if missing:
        raise InvalidAnswer(f"signature lacks {', '.join(missing)}")
    statement = {f: signature[f] for f in FIELDS}
    try:
        public_key = base64.b64decode(signature["public_key"], validate=True)
        raw = base64.b64decode(signature["sig"], validate=True)
        owner = peer_id_for(public_key)
        body = canonical(statement)
    except Exception as exc:
        raise InvalidAnswer(f"unreadable signature: {type(exc).__name__}") from None
    if owner != statement["peer_id"]:
        raise InvalidAnswer("peer id does not match the public key")
    if peer_id is not None and owner != peer_id:
        raise InvalidAnswer(f"signed by {owner}, not by the node that answered ({peer_id})")
    if not verify(public_key, DOMAIN + body, raw):
        raise InvalidAnswer("bad signature")
    if text is not None and statement["output"] != digest(text.encode("utf-8")):
        raise InvalidAnswer("the signature is about another text")
    if request_body is not None and statement["request"] != digest(request_body):
        raise InvalidAnswer("the signature is about another request")
    return statement
