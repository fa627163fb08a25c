"""Signed answers: what a signature covers, and that nothing else verifies."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from dllm_p2p import answers
from dllm_p2p.identity import generate
from dllm_p2p.registry.chain import make_record, signing_bytes

REQUEST = b"\x81\xa6prompt\xa2hi"


def signed(**overrides: Any) -> tuple[Any, dict[str, Any]]:
    me = generate()
    fields: dict[str, Any] = dict(request_body=REQUEST, request_id="r1", text="Paris.", token_ids=[42, 7], model="smollm2",
                                  fingerprint="sha256:" + "ab" * 32, finish_reason="stop", usage={"prompt_tokens": 3, "completion_tokens": 2})
    fields.update(overrides)
    return me, answers.sign(me, **fields)


def test_a_signed_answer_verifies_for_its_text_request_and_signer() -> None:
    me, signature = signed()
    statement = answers.check(signature, text="Paris.", request_body=REQUEST, peer_id=me.peer_id.to_base58())
    assert statement["output"] == answers.digest("Paris.".encode()) and statement["tokens"] == answers.token_digest([42, 7])
    assert statement["fingerprint"] == "sha256:" + "ab" * 32 and statement["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "tamper, fragment",
    [
        (lambda s: {**s, "model": "gpt-5"}, "bad signature"),
        (lambda s: {**s, "usage": {"prompt_tokens": 3, "completion_tokens": 2000}}, "bad signature"),
        (lambda s: {**s, "fingerprint": "sha256:" + "cd" * 32}, "bad signature"),
        (lambda s: {**s, "public_key": generate().public_key_b64}, "does not match"),
        (lambda s: {**s, "sig": "!!"}, "unreadable"),
        (lambda s: {k: v for k, v in s.items() if k != "request"}, "lacks request"),
    ],
)
def test_a_changed_statement_does_not_verify(tamper: Any, fragment: str) -> None:
    _, signature = signed()
    with pytest.raises(answers.InvalidAnswer, match=fragment):
        answers.check(tamper(signature))


def test_the_signature_is_bound_to_the_text_the_request_and_the_signer() -> None:
    me, signature = signed()
    with pytest.raises(answers.InvalidAnswer, match="another text"):
        answers.check(signature, text="Lyon.")
    with pytest.raises(answers.InvalidAnswer, match="another request"):
        answers.check(signature, request_body=REQUEST + b"x")
    with pytest.raises(answers.InvalidAnswer, match="not by the node"):
        answers.check(signature, peer_id=generate().peer_id.to_base58())


def test_a_registry_signature_cannot_be_replayed_as_an_answer() -> None:
    me, signature = signed()
    record = make_record(me, "register", [], ["smollm2"], seq=1, ttl=600)
    assert signing_bytes(record).startswith(b"dllm-registry-record/1\n")
    forged = {**signature, "sig": record["signature"]}
    with pytest.raises(answers.InvalidAnswer, match="bad signature"):
        answers.check(forged)
    raw = base64.b64decode(signature["sig"])
    assert not me.key_pair.public_key.verify(signing_bytes(record), raw)  # and the other way round
