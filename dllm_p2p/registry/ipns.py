"""IPNS records without a daemon: names, signed records, verification, selection.

An IPNS name is a mutable pointer: the multihash of a public key, under which its owner
publishes signed records saying "this name points at ``/ipfs/<cid>`` until time T". Spec:
https://specs.ipfs.tech/ipns/ipns-record/. What this module writes is byte-compatible with
Kubo (boxo's ``ipns.NewRecord`` with its default V1 compatibility):

* **Name.** A libp2p peer id is a multihash of the serialized public key; an Ed25519 key
  (36 bytes serialized) is inlined with the ``identity`` multihash, so the name carries
  the key. Its text form is a CIDv1 with codec libp2p-key (0x72) in multibase base36,
  lowercase (``k51...``); base32 (``bafz...``) and the bare base58 peer id
  (``12D3KooW...``, or ``Qm...`` for sha2-256 peer ids of large keys) name the same key.
* **Record.** A protobuf ``IpnsEntry``. The signed part is ``data``: the DAG-CBOR map
  ``{"TTL": int, "Value": bytes, "Sequence": int, "Validity": bytes, "ValidityType": 0}``
  (keys length first, then bytewise; minimal integers), and ``signatureV2`` is the
  key's signature over ``b"ipns-signature:" + data``. ``Validity`` is the expiry as
  RFC 3339 in UTC with up to nine fraction digits, trailing zeros dropped, as Go's
  ``time.RFC3339Nano`` writes it (``2026-11-30T01:02:03.123456789Z``); ``TTL`` is a
  caching hint in nanoseconds.
* **V1 copies.** For older readers the record repeats value, validity, validityType,
  sequence and ttl as protobuf fields 1-6, with ``signatureV1`` over
  ``value + validity + b"EOL"``. Readers must never trust those copies unless they equal
  the signed ``data``, which :func:`verify_record` checks.

The protobuf is written by hand, like dag-pb in :mod:`dllm_p2p.registry.ipfs`: py-libp2p's
generated ``IpnsEntry`` is proto3 without field presence, so it silently drops
``validityType = 0``, ``sequence = 0`` and ``ttl = 0``, and the JS ``ipns`` package then
refuses the record because the V1 copies no longer match ``data``.

Records live in the network's own Kademlia DHT under :func:`dht_key`, where py-libp2p's
``IPNSValidator`` checks them too.
"""

from __future__ import annotations

import calendar
import io
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cbor2
from libp2p.crypto.keys import PublicKey
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

from dllm_p2p.identity import inlined_public_key
from dllm_p2p.registry.car import LIBP2P_KEY, InvalidCid, _b36encode, _parse_cid_text, _read_varint
from dllm_p2p.registry.ipfs import (
    ContentCorrupt,
    IpfsError,
    _b58decode,
    _fields,
    _int_field,
    _len_field,
)

if TYPE_CHECKING:
    from dllm_p2p.identity import Identity

__all__ = [
    "MAX_RECORD_BYTES",
    "IpnsInvalid",
    "IpnsRecord",
    "dht_key",
    "ipns_name",
    "make_record",
    "newer",
    "peer_id_of_name",
    "select",
    "verify_record",
]

#: The spec's limit on a serialized record; larger ones are refused unread.
MAX_RECORD_BYTES = 10 * 1024
SIGNATURE_PREFIX = b"ipns-signature:"
#: The only validity type: ``Validity`` is an end of life.
VALIDITY_EOL = 0
MAX_UINT64 = 2**64 - 1
#: Key types whose serialized public key the identity multihash may inline (libp2p spec).
MAX_INLINE_KEY_BYTES = 42
_NS = 1_000_000_000
#: Unix time of 10000-01-01T00:00:00Z: RFC 3339 has four-digit years.
_YEAR_10000 = 253_402_300_800
_VALUE_PREFIXES = ("/ipfs/", "/ipns/")

# IpnsEntry field numbers (ipns-record spec, "Record Serialization Format").
_VALUE, _SIGNATURE_V1, _VALIDITY_TYPE, _VALIDITY, _SEQUENCE, _TTL, _PUBKEY, _SIGNATURE_V2, _DATA = range(1, 10)
_BYTES_FIELDS = {_VALUE, _SIGNATURE_V1, _VALIDITY, _PUBKEY, _SIGNATURE_V2, _DATA}
_INT_FIELDS = {_VALIDITY_TYPE, _SEQUENCE, _TTL}


class IpnsInvalid(IpfsError):
    """A name that is not an IPNS name, or a record that fails verification; the message
    names the first problem found."""


@dataclass(frozen=True)
class IpnsRecord:
    """What a verified record says."""

    #: The path the name points at, ``/ipfs/<cid>`` or ``/ipns/<name>``.
    value: str
    sequence: int
    #: End of validity, Unix seconds.
    validity: float
    #: How long readers may cache it, seconds.
    ttl: float


# --- names ------------------------------------------------------------------------------


def _check_peer_multihash(mh: bytes, shown: str) -> None:
    """A peer id is an identity multihash of a small key or a sha2-256 one of a large key."""
    try:
        code, pos = _read_varint(mh, 0)
        length, pos = _read_varint(mh, pos)
    except ValueError as exc:
        raise IpnsInvalid(f"{shown!r} is not an IPNS name: malformed multihash ({exc})") from None
    if len(mh) - pos != length:
        raise IpnsInvalid(f"{shown!r} is not an IPNS name: the multihash length does not match its digest")
    if not ((code == 0x00 and length <= MAX_INLINE_KEY_BYTES) or (code == 0x12 and length == 32)):
        raise IpnsInvalid(
            f"{shown!r} is not an IPNS name: multihash 0x{code:x} of {length} bytes is not a peer id "
            "(identity or sha2-256)"
        )


def peer_id_of_name(name: str | ID) -> ID:
    """The peer id an IPNS name stands for.

    Accepts ``k51...`` (base36 CIDv1 libp2p-key), ``bafz...`` (base32 CIDv1 libp2p-key)
    and base58 peer ids (``12D3KooW...``, ``Qm...``), each with or without ``/ipns/``.
    DNSLink names and CIDs of other codecs raise :class:`IpnsInvalid`.
    """
    if isinstance(name, ID):
        _check_peer_multihash(name.to_bytes(), name.to_base58())
        return name
    text = name.strip()
    shown = text
    if text.startswith("/ipns/"):
        text = text[len("/ipns/") :]
    if text.startswith(("k", "b")):
        try:
            cid = _parse_cid_text(text)
        except InvalidCid as exc:
            raise IpnsInvalid(f"{shown!r} is not an IPNS name: {exc}") from None
        if cid.codec != LIBP2P_KEY:
            raise IpnsInvalid(f"{shown!r} is a CID of codec 0x{cid.codec:x}, not a libp2p-key (0x72) IPNS name")
        mh = bytes(cid.raw[2:])  # after varint(1), varint(0x72): both one byte
    elif text.startswith(("1", "Q")):
        try:
            mh = _b58decode(text)
        except ValueError:
            raise IpnsInvalid(f"{shown!r} is not an IPNS name: not base58") from None
    else:
        raise IpnsInvalid(
            f"{shown!r} is not an IPNS name: expected k51... (base36 CIDv1), bafz... (base32 CIDv1) "
            "or a base58 peer id (12D3KooW..., Qm...); DNSLink names are not supported"
        )
    _check_peer_multihash(mh, shown)
    return ID(mh)


def ipns_name(peer_id: ID | str) -> str:
    """The canonical ``k51...`` name of a peer id: CIDv1, libp2p-key, base36 lowercase."""
    mh = peer_id_of_name(peer_id).to_bytes()
    return "k" + _b36encode(b"\x01" + bytes([LIBP2P_KEY]) + mh)


def dht_key(peer_id: ID | str) -> str:
    """The key of ``peer_id``'s record in the network's Kademlia DHT: ``/ipns/<base58 peer id>``.

    py-libp2p's KadDHT takes str keys (sent UTF-8 encoded) and its ``IPNSValidator``
    accepts ``/ipns/`` + base58 peer id. go-ipfs/Kubo use ``/ipns/`` followed by the
    *binary* multihash, so this DHT is the network's own, not the public Amino DHT:
    to publish there, hand the record bytes to Kubo (or a delegated router) instead.
    """
    return "/ipns/" + peer_id_of_name(peer_id).to_base58()


# --- time -------------------------------------------------------------------------------

_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})"
)


def _seconds_to_ns(seconds: float) -> int:
    """Float seconds to integer nanoseconds, without the float product losing the fraction."""
    whole = math.floor(seconds)
    return whole * _NS + round((seconds - whole) * _NS)


def _format_rfc3339(ns: int) -> str:
    """Go's ``t.UTC().Format(time.RFC3339Nano)``: fraction digits trimmed of trailing zeros."""
    seconds, fraction = divmod(ns, _NS)
    if not 0 <= seconds < _YEAR_10000:
        raise ValueError("RFC 3339 covers years 0000 to 9999 only; this is before 1970 or after 9999")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if fraction:
        stamp += "." + f"{fraction:09d}".rstrip("0")
    return stamp + "Z"


def _parse_rfc3339(text: str) -> int:
    """Unix nanoseconds of an RFC 3339 timestamp; ValueError when it is not one."""
    match = _RFC3339_RE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]):
        raise ValueError(f"{text!r} has no such date")
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(f"{text!r} has no such time")
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    zone = match.group(8)
    if zone != "Z":
        offset = int(zone[1:3]) * 3600 + int(zone[4:6]) * 60
        seconds -= offset if zone[0] == "+" else -offset
    fraction = int((match.group(7) or "0").ljust(9, "0"))
    return seconds * _NS + fraction


# --- encoding ---------------------------------------------------------------------------


def _encode_data(value: bytes, validity: bytes, sequence: int, ttl_ns: int) -> bytes:
    """The signed DAG-CBOR map. cbor2's canonical mode sorts keys length first, then
    bytewise, and writes minimal integers: DAG-CBOR's rules for these types."""
    return cbor2.dumps(
        {"Value": value, "Validity": validity, "ValidityType": VALIDITY_EOL, "Sequence": sequence, "TTL": ttl_ns},
        canonical=True,
    )


def _encode_entry(fields: dict[int, int | bytes]) -> bytes:
    """IpnsEntry in field-number order, as Go's protobuf writes it; every field given is
    written, zeros included (proto2 ``optional`` with presence)."""
    out = b""
    for number in sorted(fields):
        value = fields[number]
        out += _int_field(number, value) if isinstance(value, int) else _len_field(number, value)
    return out


def _parse_entry(data: bytes) -> dict[int, int | bytes]:
    """The IpnsEntry fields present (the last of repeated ones, as protobuf does);
    unknown fields are ignored, known ones of the wrong wire type refused."""
    fields: dict[int, int | bytes] = {}
    try:
        for number, value in _fields(data):
            expected = bytes if number in _BYTES_FIELDS else int if number in _INT_FIELDS else None
            if expected is not None and not isinstance(value, expected):
                raise IpnsInvalid(f"record field {number} has the wrong protobuf wire type")
            fields[number] = value
    except ContentCorrupt as exc:
        raise IpnsInvalid(f"record is not a protobuf IpnsEntry: {exc}") from None
    return fields


def make_record(
    identity: Identity,
    value: str,
    *,
    sequence: int,
    lifetime: float,
    ttl: float,
    now: float | None = None,
) -> bytes:
    """A signed, marshalled IpnsEntry pointing ``identity``'s name at ``value``.

    Valid until ``now + lifetime`` (seconds; ``now`` defaults to the clock), with a
    caching hint of ``ttl`` seconds. Carries the V2 signature and Kubo's V1 copies;
    no ``pubKey``, since an Ed25519 key is inlined in the name (a key too large to
    inline is embedded, as boxo does). Raises ValueError for arguments that cannot make
    a valid record.
    """
    if not value.startswith(_VALUE_PREFIXES):
        raise ValueError(f"IPNS value {value!r} must be an /ipfs/ or /ipns/ path")
    if not 0 <= sequence <= MAX_UINT64:
        raise ValueError(f"sequence {sequence} is not a uint64")
    if not lifetime > 0:
        raise ValueError("lifetime must be positive")
    ttl_ns = _seconds_to_ns(ttl)
    if not 0 <= ttl_ns <= MAX_UINT64:
        raise ValueError(f"ttl {ttl} is out of range")
    now_ns = time.time_ns() if now is None else _seconds_to_ns(now)
    try:
        validity = _format_rfc3339(now_ns + _seconds_to_ns(lifetime)).encode("ascii")
    except (OverflowError, ValueError, OSError):
        raise ValueError("now + lifetime is not a representable date") from None
    value_bytes = value.encode("utf-8")
    data = _encode_data(value_bytes, validity, sequence, ttl_ns)
    fields: dict[int, int | bytes] = {
        _VALUE: value_bytes,
        _SIGNATURE_V1: identity.sign(value_bytes + validity + b"EOL"),
        _VALIDITY_TYPE: VALIDITY_EOL,
        _VALIDITY: validity,
        _SEQUENCE: sequence,
        _TTL: ttl_ns,
        _SIGNATURE_V2: identity.sign(SIGNATURE_PREFIX + data),
        _DATA: data,
    }
    public_key = identity.key_pair.public_key
    if ID.from_pubkey(public_key).to_bytes()[:1] != b"\x00":  # not inlined in the name
        fields[_PUBKEY] = public_key.serialize()
    record = _encode_entry(fields)
    if len(record) > MAX_RECORD_BYTES:
        raise ValueError(f"the record would be {len(record)} bytes, above the limit of {MAX_RECORD_BYTES}")
    return record


# --- verification -----------------------------------------------------------------------


def _public_key(peer_id: ID, embedded: bytes | None, shown: str) -> PublicKey:
    """The key records of ``peer_id`` must be signed with: ``pubKey`` from the record
    when present (it must hash to the name), else the key inlined in the name."""
    if embedded is not None:
        try:
            key = deserialize_public_key(embedded)
        except Exception:
            raise IpnsInvalid("record pubKey is not a libp2p public key") from None
        if ID.from_pubkey(key) != peer_id:
            raise IpnsInvalid(f"record pubKey belongs to {ID.from_pubkey(key).to_base58()}, not to {shown}")
        return key
    inlined = inlined_public_key(peer_id)
    if inlined is None:
        raise IpnsInvalid(f"{shown} does not inline its public key and the record carries no pubKey")
    try:
        return deserialize_public_key(inlined)
    except Exception:
        raise IpnsInvalid(f"{shown} does not inline a valid libp2p public key") from None


def _decode_data(data: bytes) -> dict:
    """The signed DAG-CBOR map, refused unless it is exactly the canonical encoding of
    what it decodes to, as every producer (Kubo, JS ipns, ours) writes it. That also
    rules out duplicate keys, bignum tags and trailing bytes. (An extension field
    holding a float would be refused: cbor2 shortens floats where DAG-CBOR keeps 64
    bits. No producer writes one.)"""
    stream = io.BytesIO(data)
    try:
        decoded = cbor2.CBORDecoder(stream).decode()
        canonical = cbor2.dumps(decoded, canonical=True)
    except Exception:  # cbor2 raises several types on malformed input
        raise IpnsInvalid("record data is not CBOR") from None
    if not isinstance(decoded, dict):
        raise IpnsInvalid("record data is not a CBOR map")
    if stream.tell() != len(data) or canonical != data:
        raise IpnsInvalid("record data is not canonical DAG-CBOR")
    for key, kind in (("Value", bytes), ("Validity", bytes), ("ValidityType", int), ("Sequence", int), ("TTL", int)):
        if key not in decoded:
            raise IpnsInvalid(f"record data has no {key}")
        field = decoded[key]
        if not isinstance(field, kind) or isinstance(field, bool):
            raise IpnsInvalid(f"record data {key} must be {'a byte string' if kind is bytes else 'an integer'}")
        if kind is int and not 0 <= field <= MAX_UINT64:
            raise IpnsInvalid(f"record data {key} is not a uint64")
    if decoded["ValidityType"] != VALIDITY_EOL:
        raise IpnsInvalid(f"record ValidityType {decoded['ValidityType']} is not supported (only 0, EOL)")
    return decoded


def _check_v1_copies(fields: dict[int, int | bytes], data: dict) -> None:
    """Legacy fields, where present, must repeat the signed values exactly."""
    for number, name, key in (
        (_VALUE, "value", "Value"),
        (_VALIDITY, "validity", "Validity"),
        (_VALIDITY_TYPE, "validityType", "ValidityType"),
        (_SEQUENCE, "sequence", "Sequence"),
        (_TTL, "ttl", "TTL"),
    ):
        if number in fields and fields[number] != data[key]:
            raise IpnsInvalid(f"record V1 field {name} does not match the signed data {key}")


def verify_record(name_or_peer_id: str | ID, data: bytes, *, now: float | None = None) -> IpnsRecord:
    """Check a marshalled record for the name ``name_or_peer_id`` (any form
    :func:`peer_id_of_name` takes) and return what it says.

    The spec's verification, failing on the first problem with :class:`IpnsInvalid`:
    size at most 10 KiB; an IpnsEntry with ``signatureV2`` and ``data``; ``signatureV2``
    valid for the name's key (inlined in the name, or ``pubKey`` hashing to it);
    ``data`` the canonical DAG-CBOR map with Value and Validity as byte strings and
    ValidityType (0), Sequence and TTL as uint64; V1 copies, when present, equal to
    ``data``; not expired at ``now`` (default: the clock); Value an /ipfs/ or /ipns/ path.
    ``signatureV1`` is never checked: the spec forbids relying on it.
    """
    peer_id = peer_id_of_name(name_or_peer_id)
    shown = ipns_name(peer_id)
    if len(data) > MAX_RECORD_BYTES:
        raise IpnsInvalid(f"record is {len(data)} bytes, above the IPNS limit of {MAX_RECORD_BYTES}")
    fields = _parse_entry(data)
    signature, signed = fields.get(_SIGNATURE_V2), fields.get(_DATA)
    if not (isinstance(signature, bytes) and signature and isinstance(signed, bytes) and signed):
        raise IpnsInvalid("record has no signatureV2 or no data (V1-only records are not accepted)")
    embedded = fields.get(_PUBKEY)
    key = _public_key(peer_id, embedded if isinstance(embedded, bytes) else None, shown)
    try:
        valid = key.verify(SIGNATURE_PREFIX + signed, signature)
    except Exception:
        valid = False
    if not valid:
        raise IpnsInvalid(f"record signatureV2 does not verify for {shown}")
    content = _decode_data(signed)
    _check_v1_copies(fields, content)
    try:
        validity_text = content["Validity"].decode("ascii")
        validity_ns = _parse_rfc3339(validity_text)
    except (UnicodeDecodeError, ValueError):
        raise IpnsInvalid("record Validity is not an RFC 3339 timestamp") from None
    now_ns = time.time_ns() if now is None else _seconds_to_ns(now)
    if validity_ns <= now_ns:
        raise IpnsInvalid(f"record expired at {validity_text}")
    try:
        value = content["Value"].decode("utf-8")
    except UnicodeDecodeError:
        raise IpnsInvalid("record Value is not UTF-8") from None
    if not value.startswith(_VALUE_PREFIXES) or len(value) <= len("/ipfs/"):
        raise IpnsInvalid(f"record Value {value[:80]!r} is not an /ipfs/ or /ipns/ path")
    return IpnsRecord(value, content["Sequence"], validity_ns / _NS, content["TTL"] / _NS)


# --- selection --------------------------------------------------------------------------


def newer(a: IpnsRecord, b: IpnsRecord) -> bool:
    """True when ``a`` beats ``b``: higher sequence, or the same sequence and later
    validity (the spec's record selection; both must be verified already)."""
    return (a.sequence, a.validity) > (b.sequence, b.validity)


def select(records: Iterable[IpnsRecord]) -> IpnsRecord:
    """The record to use among verified ones (the first of equals); ValueError if none."""
    best: IpnsRecord | None = None
    for record in records:
        if best is None or newer(record, best):
            best = record
    if best is None:
        raise ValueError("no IPNS records to select from")
    return best
