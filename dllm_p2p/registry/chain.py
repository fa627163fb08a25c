"""The registry chain: signed node records in hash-linked blocks (docs/REGISTRY.md).

A chain is one checkpoint block followed by one block per record. Every record is signed
by the node it describes with its libp2p key, so anyone can check a whole file offline
and nobody but a node can speak for it; the hash links make any edit, reordering or
truncation in the middle of a file visible.

What a chain *means* is its set of records. Merging two chains is therefore a union of
their records, cut down to the ones that can still matter and put in a canonical order,
so peers that have seen the same records converge on the same head whatever order they
saw them in. Compaction is the same cut at a given time, stamped into the checkpoint so
that it sticks when compacted and uncompacted copies meet.

Only functions of this module build a ``Chain`` (``Chain()``, ``verify_chain``,
``append``, ``merge``, ``compact``), so holding a ``Chain`` means holding records that
verified; merges and compactions reuse those records without checking signatures again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from dllm_p2p import identity as _identity
from dllm_p2p.identity import Identity

FORMAT = "dllm-registry/1"
#: Prepended to a record's canonical encoding before signing, so a registry signature can
#: never be replayed as (or forged from) a signature the same key makes for anything else.
RECORD_DOMAIN = b"dllm-registry-record/1\n"
#: ``prev`` of the checkpoint block, which has no predecessor.
ZERO_HASH = "0" * 64
OPS = ("register", "renew", "deregister")
ROLES = ("worker", "gateway", "relay")

# Bounds. A chain arrives from untrusted peers, so everything that costs memory or time
# to check is capped before it is checked. A real record is about 600 bytes; the caps
# are chosen so that a full chain of the largest records, as ``to_json`` writes it,
# still fits in MAX_FILE_BYTES (the registry's IPFS limit too). tests/test_chain.py
# checks that arithmetic.
MAX_BLOCKS = 5_000
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_RECORD_BYTES = 2048
MAX_ADDRS = 16
MAX_MODELS = 32
MAX_ADDR_CHARS = 256
MAX_MODEL_CHARS = 128
MAX_PEER_ID_CHARS = 128
MAX_KEY_CHARS = 1024
MAX_SIGNATURE_CHARS = 1024
MAX_URL_CHARS = 512
#: Largest integer accepted anywhere: what a JavaScript number holds exactly.
MAX_INT = 2**53 - 1
#: How far in the future a checkpoint's ``compacted_at`` may be. The stamp is not signed,
#: and merges drop records that expired before it, so it must not be far ahead of the
#: verifier's clock: otherwise a hostile chain could expire everybody at once.
MAX_CLOCK_SKEW = 300
#: How far a record's ``issued`` may be ahead of the verifier's clock. Loose on purpose:
#: a verifier whose clock is slow must still accept honest records, and with the cap on
#: a record's life a record from the future still expires within a day of its issue.
MAX_ISSUED_SKEW = 3600
#: Longest life a record may claim (``expires - issued``): without a cap a record could
#: claim to live for ever and never be compacted away. Nodes renew long before this.
MAX_RECORD_TTL = 86_400
#: Proof of work: a registering identity shows ``pow_bits`` leading zero bits of
#: sha256(POW_DOMAIN + peer id + "\n" + nonce). The chain's checkpoint sets the difficulty
#: (absent: 0); a node starting a new registry uses DEFAULT_POW_BITS, about a second of one
#: core, and a check costs one hash.
POW_DOMAIN = b"dllm-pow/1\n"
DEFAULT_POW_BITS = 20
MAX_POW_BITS = 32
MAX_POW_CHARS = 32
#: Records whose signatures already verified, by the hash of their canonical encoding:
#: a chain fetched again costs hashing, not 5,000 signature checks (~1.1 s).
VERIFIED_CACHE = 20_000

Record = dict[str, Any]

_REQUIRED_FIELDS = (
    "op", "peer_id", "public_key", "addrs", "models", "seq", "issued", "expires", "signature",
)
_OPTIONAL_FIELDS = ("role", "gateway_url", "pow", "spans")
#: Order of a record's keys in the file (for people; hashing sorts keys anyway).
_FIELD_ORDER = (
    "op", "peer_id", "role", "addrs", "models", "spans", "gateway_url",
    "seq", "issued", "expires", "pow", "public_key", "signature",
)
_HEX = frozenset("0123456789abcdef")


class RegistryError(Exception):
    """Base class of every registry error."""


class InvalidRecord(RegistryError):
    """A record is malformed, forged, or does not fit the chain it is offered to."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidChain(RegistryError):
    """A chain failed verification.

    ``index`` is the first bad block, or None when the document as a whole is bad (not
    JSON, wrong format, too large); ``str()`` reads ``"block N: reason"``.
    """

    def __init__(self, index: int | None, reason: str) -> None:
        super().__init__(reason if index is None else f"block {index}: {reason}")
        self.index = index
        self.reason = reason


class ChainFull(RegistryError):
    """The result would hold more than ``MAX_BLOCKS`` blocks; compact first."""


class _BadBlock(Exception):
    """Internal: a block-level reason, turned into ``InvalidChain`` with its index."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- encoding


def canonical(obj: Any) -> bytes:
    """The canonical encoding: JSON, keys sorted, no whitespace, ASCII only.

    Every string the format allows is printable ASCII, so ``ensure_ascii`` never has to
    escape anything and any JSON encoder that sorts keys produces the same bytes.
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def signing_bytes(record: Record) -> bytes:
    """What a record's signature covers: the domain string, then the canonical
    encoding of the record without its ``signature`` field."""
    return RECORD_DOMAIN + canonical({k: v for k, v in record.items() if k != "signature"})


def block_hash(block: dict[str, Any]) -> str:
    """sha256 (lowercase hex) of the canonical encoding of a block without its ``hash``."""
    return hashlib.sha256(canonical({k: v for k, v in block.items() if k != "hash"})).hexdigest()


def _checkpoint_block(compacted_at: int, pow_bits: int = 0) -> dict[str, Any]:
    checkpoint: dict[str, Any] = {"compacted_at": compacted_at}
    if pow_bits:
        checkpoint["pow_bits"] = pow_bits  # absent when 0: older chains hash as they did
    return {"index": 0, "prev": ZERO_HASH, "checkpoint": checkpoint}


def pow_ok(peer_id: str, nonce: Any, bits: int) -> bool:
    """Whether ``nonce`` is a proof of ``bits`` bits of work for ``peer_id``."""
    if bits <= 0:
        return True
    if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_POW_CHARS:
        return False
    digest = hashlib.sha256(POW_DOMAIN + peer_id.encode("ascii", "replace") + b"\n" + nonce.encode("ascii", "replace")).digest()
    return int.from_bytes(digest, "big") >> (256 - bits) == 0


def solve_pow(peer_id: str, bits: int) -> str:
    """A nonce proving ``bits`` bits of work for ``peer_id`` (2^bits hashes on average:
    about a second at 20 bits). Blocking: call it from a thread."""
    prefix = POW_DOMAIN + peer_id.encode("ascii") + b"\n"
    limit = 1 << (256 - bits)
    sha256 = hashlib.sha256
    counter = 0
    while True:
        nonce = format(counter, "x")
        if int.from_bytes(sha256(prefix + nonce.encode()).digest(), "big") < limit:
            return nonce
        counter += 1


def _ordered(record: Record) -> Record:
    """A copy with keys in the documented order and lists copied (callers may mutate it)."""
    out: Record = {}
    for key in _FIELD_ORDER:
        if key in record:
            value = record[key]
            out[key] = list(value) if isinstance(value, list) else value
    return out


def _link(compacted_at: int, records: Sequence[Record], pow_bits: int = 0) -> list[str]:
    hashes = [block_hash(_checkpoint_block(compacted_at, pow_bits))]
    for index, record in enumerate(records, 1):
        hashes.append(block_hash({"index": index, "prev": hashes[-1], "record": record}))
    return hashes


# --------------------------------------------------------------------------- records


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_fields(obj: dict[str, Any], required: Iterable[str], optional: Iterable[str]) -> str | None:
    """The first problem with ``obj``'s key set, or None."""
    required = tuple(required)
    for key in required:
        if key not in obj:
            return f"missing field {key!r}"
    allowed = set(required) | set(optional)
    for key in obj:
        if key not in allowed:
            return f"unknown field {_show(key)}"
    return None


def _check_str(name: str, value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise InvalidRecord(f"{name} must be a string")
    if not value or len(value) > max_chars:
        raise InvalidRecord(f"{name} must be 1 to {max_chars} characters")
    if not (value.isascii() and value.isprintable()):
        raise InvalidRecord(f"{name} must be printable ASCII")
    return value


def _check_int(name: str, value: Any) -> int:
    # bool is an int subclass in Python but not an integer in JSON.
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise InvalidRecord(f"{name} must be an integer from 0 to 2^53-1")
    return value


def _check_list(name: str, value: Any, max_items: int, max_chars: int) -> list[str]:
    if not isinstance(value, list):
        raise InvalidRecord(f"{name} must be a list")
    if len(value) > max_items:
        raise InvalidRecord(f"{name} has {len(value)} entries, more than {max_items}")
    for item in value:
        _check_str(f"{name} entry", item, max_chars)
    return value


def _decode_b64(name: str, value: str) -> bytes:
    """Standard base64 with padding, in its one canonical spelling."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRecord(f"{name} is not valid base64") from None
    if not raw or base64.b64encode(raw).decode("ascii") != value:
        raise InvalidRecord(f"{name} is not canonical base64")
    return raw


def _check_shape(record: Any) -> None:
    if not isinstance(record, dict):
        raise InvalidRecord("record must be a JSON object")
    problem = _check_fields(record, _REQUIRED_FIELDS, _OPTIONAL_FIELDS)
    if problem:
        raise InvalidRecord(problem)
    if record["op"] not in OPS:
        raise InvalidRecord(f"unknown op {_show(record['op'])}")
    _check_str("peer_id", record["peer_id"], MAX_PEER_ID_CHARS)
    _check_str("public_key", record["public_key"], MAX_KEY_CHARS)
    _check_str("signature", record["signature"], MAX_SIGNATURE_CHARS)
    for addr in _check_list("addrs", record["addrs"], MAX_ADDRS, MAX_ADDR_CHARS):
        if not addr.startswith("/") or " " in addr:
            raise InvalidRecord(f"addrs entry {_show(addr)} is not a multiaddr")
    _check_list("models", record["models"], MAX_MODELS, MAX_MODEL_CHARS)
    _check_int("seq", record["seq"])
    issued = _check_int("issued", record["issued"])
    if _check_int("expires", record["expires"]) <= issued:
        raise InvalidRecord("expires must be after issued")
    if record["expires"] - issued > MAX_RECORD_TTL:
        raise InvalidRecord(f"a record may live at most {MAX_RECORD_TTL} s (expires - issued)")
    role = record.get("role", "worker")
    if role not in ROLES:
        raise InvalidRecord(f"unknown role {_show(role)}")
    if "pow" in record:
        _check_str("pow", record["pow"], MAX_POW_CHARS)
    if "spans" in record:
        _check_spans(record["spans"], record["models"])
    if "gateway_url" in record:
        url = _check_str("gateway_url", record["gateway_url"], MAX_URL_CHARS)
        if not url.startswith(("http://", "https://")) or " " in url:
            raise InvalidRecord("gateway_url must be an http(s) URL")
        if role != "gateway":
            raise InvalidRecord("gateway_url is only allowed with role 'gateway'")
    if len(canonical(record)) > MAX_RECORD_BYTES:
        raise InvalidRecord(f"record is larger than {MAX_RECORD_BYTES} bytes")


#: Longest model fingerprint in a record's ``spans`` ("sha256:" and 64 hex digits, with room).
MAX_FINGERPRINT_CHARS = 80
MAX_LAYERS = 10_000


def _check_spans(spans: Any, models: list[str]) -> None:
    """``spans``: per model this node serves as a span of layers (``--layers``), which
    layers of how many, of which weights: ``{"<model>": {"fingerprint": "sha256:...",
    "span": [start, end], "layers": total}}``."""
    if not isinstance(spans, dict) or not spans or len(spans) > MAX_MODELS:
        raise InvalidRecord(f"spans must be a map of 1 to {MAX_MODELS} models")
    for name, facts in spans.items():
        if name not in models:
            raise InvalidRecord(f"spans names {_show(name)}, which is not in models")
        if not isinstance(facts, dict) or _check_fields(facts, ("fingerprint", "span", "layers"), ()):
            raise InvalidRecord("each spans entry must be {fingerprint, span, layers}")
        _check_str("spans fingerprint", facts["fingerprint"], MAX_FINGERPRINT_CHARS)
        layers, span = facts["layers"], facts["span"]
        if type(layers) is not int or not 1 <= layers <= MAX_LAYERS:
            raise InvalidRecord(f"spans layers must be a whole number from 1 to {MAX_LAYERS}")
        if (
            not isinstance(span, list) or len(span) != 2 or not all(type(v) is int for v in span)
            or not 0 <= span[0] < span[1] <= layers
        ):
            raise InvalidRecord("spans span must be [start, end] with 0 <= start < end <= layers")


_verified: OrderedDict[bytes, None] = OrderedDict()
_verified_lock = threading.Lock()


def validate_record(record: Any, now: float | None = None) -> Record:
    """Check a record on its own: fields, bounds, peer id == key, signature, and that it
    was not issued more than ``MAX_ISSUED_SKEW`` after ``now`` (default: the clock).

    Returns the record; raises ``InvalidRecord``. Whether its ``seq`` fits is a question
    for the chain it joins (``Chain.append``). A record that verified before is
    recognised by its hash and not checked again.
    """
    _check_shape(record)
    t = time.time() if now is None else now
    if record["issued"] > t + MAX_ISSUED_SKEW:
        raise InvalidRecord(f"issued in the future ({record['issued']}, more than {MAX_ISSUED_SKEW} s ahead)")
    key = hashlib.sha256(canonical(record)).digest()
    with _verified_lock:
        if key in _verified:
            _verified.move_to_end(key)
            return record
    public_key = _decode_b64("public_key", record["public_key"])
    signature = _decode_b64("signature", record["signature"])
    try:
        peer_id = _identity.peer_id_for(public_key)
    except Exception:  # any decoding failure of untrusted bytes means the same thing
        raise InvalidRecord("public_key is not a libp2p public key") from None
    if peer_id != record["peer_id"]:
        raise InvalidRecord("peer id does not match the public key")
    if not _identity.verify(public_key, signing_bytes(record), signature):
        raise InvalidRecord("bad signature")
    with _verified_lock:
        _verified[key] = None
        while len(_verified) > VERIFIED_CACHE:
            _verified.popitem(last=False)
    return record


def make_record(
    identity: Identity,
    op: str,
    addrs: Iterable[object],
    models: Iterable[str],
    seq: int,
    ttl: float,
    now: float | None = None,
    **extra: Any,
) -> Record:
    """A record about ``identity``'s node, signed with its key.

    ``addrs`` may be multiaddr objects (they are turned into strings). ``extra`` takes the
    optional fields: ``role``, ``gateway_url``, ``pow`` and ``spans``. The record lives from ``now`` (default:
    the clock) for ``ttl`` seconds. Raises ``InvalidRecord`` when the result would not
    verify, so a node finds out here rather than from its peers.
    """
    for key in extra:
        if key not in _OPTIONAL_FIELDS:
            raise InvalidRecord(f"unknown field {key!r}")
    issued = int(time.time() if now is None else now)
    record: Record = {
        "op": op,
        "peer_id": identity.peer_id.to_base58(),
        "public_key": identity.public_key_b64,
        "addrs": [str(addr) for addr in addrs],
        "models": list(models),
        "seq": seq,
        "issued": issued,
        "expires": issued + math.ceil(ttl),
        **extra,
    }
    _check_shape({**record, "signature": "AA=="})  # fail on bad input before signing
    record["signature"] = base64.b64encode(identity.sign(signing_bytes(record))).decode("ascii")
    return _ordered(validate_record(record, now=issued))


# --------------------------------------------------------------------------- chain


class Chain:
    """A verified registry chain; immutable (``append``, ``merge``, ``compact`` return new ones).

    ``Chain()`` is the empty chain: a checkpoint block with ``compacted_at`` 0 (and, with
    ``pow_bits``, the proof of work its records need). Two chains are equal when their
    heads are, which (sha256) means when their blocks are.
    """

    __slots__ = ("_compacted_at", "_pow_bits", "_records", "_hashes")

    _compacted_at: int
    _pow_bits: int
    _records: tuple[Record, ...]
    _hashes: tuple[str, ...]

    def __init__(self, pow_bits: int = 0) -> None:
        if not 0 <= pow_bits <= MAX_POW_BITS:
            raise ValueError(f"pow_bits must be between 0 and {MAX_POW_BITS}")
        self._compacted_at = 0
        self._pow_bits = pow_bits
        self._records = ()
        self._hashes = tuple(_link(0, (), pow_bits))

    @classmethod
    def _trusted(
        cls, compacted_at: int, records: Sequence[Record], hashes: Sequence[str] | None = None, pow_bits: int = 0
    ) -> Chain:
        """Build from records that already verified (no signature checks here)."""
        if len(records) + 1 > MAX_BLOCKS:
            raise ChainFull(f"{len(records) + 1} blocks is more than {MAX_BLOCKS}")
        chain = object.__new__(cls)
        chain._compacted_at = compacted_at
        chain._pow_bits = pow_bits
        chain._records = tuple(records)
        chain._hashes = tuple(_link(compacted_at, records, pow_bits) if hashes is None else hashes)
        return chain

    @property
    def pow_bits(self) -> int:
        """Proof of work every record of this chain carries (leading zero bits)."""
        return self._pow_bits

    # ---- reading

    @property
    def head(self) -> str:
        """Hash of the last block: names the whole chain."""
        return self._hashes[-1]

    @property
    def compacted_at(self) -> int:
        """The checkpoint's stamp: records that expired by then are gone for good."""
        return self._compacted_at

    @property
    def records(self) -> list[Record]:
        """The records in chain order (copies)."""
        return [_ordered(record) for record in self._records]

    @property
    def blocks(self) -> list[dict[str, Any]]:
        """The blocks as they appear in the file."""
        checkpoint = {**_checkpoint_block(self._compacted_at, self._pow_bits), "hash": self._hashes[0]}
        return [checkpoint] + [
            {"index": i, "prev": self._hashes[i - 1], "record": _ordered(record), "hash": self._hashes[i]}
            for i, record in enumerate(self._records, 1)
        ]

    def nodes(self, now: float | None = None) -> dict[str, Record]:
        """peer id -> the record that describes the node at ``now``, for live nodes only.

        A peer's current record is its highest-``seq`` record that has not expired
        (live while ``now < expires``); the peer is left out when that record is a
        ``deregister`` or when all its records have expired.
        """
        t = time.time() if now is None else now
        current: dict[str, Record] = {}
        for record in self._records:
            if record["expires"] > t:
                seen = current.get(record["peer_id"])
                if seen is None or record["seq"] > seen["seq"]:
                    current[record["peer_id"]] = record
        return {
            peer: _ordered(record)
            for peer, record in sorted(current.items())
            if record["op"] != "deregister"
        }

    def next_seq(self, peer_id: str) -> int:
        """One more than the highest ``seq`` this chain holds for ``peer_id`` (1 if none)."""
        return 1 + max((r["seq"] for r in self._records if r["peer_id"] == peer_id), default=0)

    # ---- growing

    def append(self, record: Record) -> Chain:
        """This chain plus one block carrying ``record``.

        The record must verify on its own and its ``seq`` must be higher than every
        record this chain already holds for the same peer. Raises ``InvalidRecord`` (or
        ``ChainFull``).
        """
        validate_record(record)
        if not pow_ok(record["peer_id"], record.get("pow"), self._pow_bits):
            raise InvalidRecord(_pow_reason(self._pow_bits))
        for index in range(len(self._records), 0, -1):  # the peer's latest record is last
            held = self._records[index - 1]
            if held["peer_id"] == record["peer_id"]:
                if held["seq"] >= record["seq"]:
                    raise InvalidRecord(_seq_reason(record["seq"], index, held["seq"]))
                break
        record = _ordered(record)
        index = len(self._records) + 1
        new_hash = block_hash({"index": index, "prev": self.head, "record": record})
        return Chain._trusted(
            self._compacted_at, self._records + (record,), self._hashes + (new_hash,), self._pow_bits
        )

    # ---- files

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "blocks": self.blocks}

    def to_json(self) -> str:
        """The file text: indented for people; the hashes do not depend on layout."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=True) + "\n"

    def to_compact_json(self) -> bytes:
        """The same document without layout, for the wire (about a third smaller)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes | str, *, now: float | None = None, clamp: bool = False) -> Chain:
        """Same as ``verify_chain``."""
        return verify_chain(data, now=now, clamp=clamp)

    # ---- identity

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Chain) and other.head == self.head

    def __hash__(self) -> int:
        return hash(self.head)

    def __repr__(self) -> str:
        return f"<Chain {len(self._records)} records, head {self.head[:12]}>"


def _pow_reason(bits: int) -> str:
    return f"no proof of work of {bits} bits for this peer id ('pow')"


def _seq_reason(seq: int, index: int, held: int) -> str:
    return f"seq {seq} does not grow: block {index} of the same peer has seq {held}"


# --------------------------------------------------------------------------- verification


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins, so a document with one is ambiguous.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse(data: bytes | str) -> Any:
    if len(data) > MAX_FILE_BYTES:
        raise InvalidChain(None, f"larger than {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise InvalidChain(None, f"duplicate key {_show(exc.key)}") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidChain(None, f"not valid JSON: {exc}") from None


def _check_link(block: Any, index: int, prev: str, payload: str) -> None:
    """Everything about a block except its payload and its own hash."""
    if not isinstance(block, dict):
        raise _BadBlock("block must be a JSON object")
    if index == 0 and "record" in block:
        raise _BadBlock("the first block must be a checkpoint")
    if index > 0 and "checkpoint" in block:
        raise _BadBlock("only the first block may be a checkpoint")
    problem = _check_fields(block, ("index", "prev", payload, "hash"), ())
    if problem:
        raise _BadBlock(problem)
    if type(block["index"]) is not int:
        raise _BadBlock("index must be an integer")
    if block["index"] != index:
        raise _BadBlock(f"out of order: index {block['index']} at position {index}")
    for name in ("prev", "hash"):
        value = block[name]
        if not isinstance(value, str) or len(value) != 64 or not set(value) <= _HEX:
            raise _BadBlock(f"{name} must be 64 lowercase hex digits")
    if block["prev"] != prev:
        raise _BadBlock(
            "the first block's prev must be 64 zeros" if index == 0
            else f"broken link: prev is not the hash of block {index - 1}"
        )


def _check_hash(block: dict[str, Any]) -> str:
    if block_hash(block) != block["hash"]:
        raise _BadBlock("hash mismatch: the block does not hash to its 'hash' field")
    return block["hash"]


def _check_checkpoint(block: Any, now: float, clamp: bool = False) -> tuple[int, int]:
    _check_link(block, 0, ZERO_HASH, "checkpoint")
    checkpoint = block["checkpoint"]
    if not isinstance(checkpoint, dict):
        raise _BadBlock("checkpoint must be a JSON object")
    problem = _check_fields(checkpoint, ("compacted_at",), ("pow_bits",))
    if problem:
        raise _BadBlock(f"checkpoint: {problem}")
    compacted_at = checkpoint["compacted_at"]
    if type(compacted_at) is not int or not 0 <= compacted_at <= MAX_INT:
        raise _BadBlock("compacted_at must be an integer from 0 to 2^53-1")
    if compacted_at > now + MAX_CLOCK_SKEW and not clamp:
        raise _BadBlock(f"checkpoint is in the future (compacted_at {compacted_at})")
    pow_bits = checkpoint.get("pow_bits", 0)
    if "pow_bits" in checkpoint and (type(pow_bits) is not int or not 1 <= pow_bits <= MAX_POW_BITS):
        raise _BadBlock(f"pow_bits must be an integer from 1 to {MAX_POW_BITS} (absent for 0)")
    _check_hash(block)
    return compacted_at, pow_bits


def verify_chain(data: bytes | str, *, now: float | None = None, clamp: bool = False) -> Chain:
    """Parse and verify a whole ``blockchain.json`` document.

    Checks, block by block: fields and bounds, index == position, ``prev`` links, each
    record's peer id == key and signature, each peer's ``seq`` strictly growing, then the
    block's own ``hash``. Raises ``InvalidChain`` naming the first bad block and why.
    ``now`` (default: the clock) bounds the checkpoint stamp and the records' ``issued``.

    With ``clamp`` (how a node takes a peer's chain) a checkpoint stamped more than
    ``MAX_CLOCK_SKEW`` ahead of ``now`` is not refused but taken as stamped at ``now +
    MAX_CLOCK_SKEW``, and the chain re-linked on that stamp: a node whose clock is slow
    still takes honest chains, and a chain stamped far ahead still cannot expire records
    beyond that bound.
    """
    doc = _parse(data)
    if not isinstance(doc, dict):
        raise InvalidChain(None, "the document must be a JSON object")
    problem = _check_fields(doc, ("format", "blocks"), ())
    if problem:
        raise InvalidChain(None, problem)
    if doc["format"] != FORMAT:
        raise InvalidChain(None, f"unsupported format {_show(doc['format'])}, expected {FORMAT!r}")
    blocks = doc["blocks"]
    if not isinstance(blocks, list):
        raise InvalidChain(None, "blocks must be a list")
    if not blocks:
        raise InvalidChain(None, "no blocks: a chain starts with a checkpoint block")
    if len(blocks) > MAX_BLOCKS:
        raise InvalidChain(None, f"{len(blocks)} blocks is more than {MAX_BLOCKS}")

    t = time.time() if now is None else now
    try:
        compacted_at, pow_bits = _check_checkpoint(blocks[0], t, clamp)
    except _BadBlock as exc:
        raise InvalidChain(0, exc.reason) from None
    hashes = [blocks[0]["hash"]]
    records: list[Record] = []
    last_seq: dict[str, tuple[int, int]] = {}  # peer id -> (block index, seq)
    for index in range(1, len(blocks)):
        block = blocks[index]
        try:
            _check_link(block, index, hashes[-1], "record")
            record = _check_record(block["record"], pow_bits, t)
            seen = last_seq.get(record["peer_id"])
            if seen is not None and record["seq"] <= seen[1]:
                raise InvalidRecord(_seq_reason(record["seq"], *seen))
            hashes.append(_check_hash(block))
        except (_BadBlock, InvalidRecord) as exc:
            raise InvalidChain(index, exc.reason) from None
        last_seq[record["peer_id"]] = (index, record["seq"])
        records.append(record)
    if compacted_at > t + MAX_CLOCK_SKEW:  # only with clamp: re-linked on the bound
        bound = int(t + MAX_CLOCK_SKEW)
        return Chain._trusted(bound, _settle(records, bound), pow_bits=pow_bits)
    return Chain._trusted(compacted_at, records, hashes, pow_bits)


def _check_record(record: Any, pow_bits: int, now: float) -> Record:
    """What every record of a peer's chain must pass: its own checks and the network's
    proof of work. Raises ``InvalidRecord``."""
    record = validate_record(record, now=now)
    if not pow_ok(record["peer_id"], record.get("pow"), pow_bits):
        raise InvalidRecord(_pow_reason(pow_bits))
    return record


def record_chain(record: Any, compacted_at: Any, pow_bits: int, *, now: float | None = None) -> Chain:
    """A chain of one ``record`` on a checkpoint stamped ``compacted_at``, checked as
    ``verify_chain(..., clamp=True)`` checks a peer's chain (record, proof of work, the
    stamp held to ``MAX_CLOCK_SKEW`` ahead of ``now``). How a node takes a record that a
    peer gossiped without fetching its whole chain. Raises ``InvalidRecord``."""
    t = time.time() if now is None else now
    if not isinstance(compacted_at, int) or isinstance(compacted_at, bool) or compacted_at < 0:
        raise InvalidRecord("the checkpoint stamp must be a whole number of seconds")
    record = _check_record(record, pow_bits, t)
    at = min(compacted_at, int(t + MAX_CLOCK_SKEW))
    return Chain._trusted(at, _settle([record], at), pow_bits=pow_bits)


# --------------------------------------------------------------------------- merge, compaction


def _preferred(record: Record) -> tuple[int, bytes]:
    """Sort key among conflicting records with the same (peer, seq): smallest wins.

    The longest-lived one wins (ties: the lowest canonical bytes). Preferring the
    longest expiry is what keeps merge associative with compaction: a version that
    loses can never outlive the one that wins, so dropping either early changes nothing.
    """
    return (-record["expires"], canonical(record))


def _settle(records: Iterable[Record], at: int) -> list[Record]:
    """The records that can still matter after ``at``, in canonical order.

    1. One record per (peer, seq): the ``_preferred`` one.
    2. Keep a record only if it is live after ``at`` and it outlives every record of the
       same peer with a higher seq. Otherwise it is invisible at every time >= ``at``:
       either expired, or shadowed by a newer record that is live whenever it is.
    3. Order by (issued, peer id, seq), where a record's issued is raised to the largest
       issued of the same peer's lower-seq records, so each peer's seq still grows along
       the chain even if its clock went backwards.
    """
    best: dict[tuple[str, int], Record] = {}
    for record in records:
        key = (record["peer_id"], record["seq"])
        held = best.get(key)
        if held is None or _preferred(record) < _preferred(held):
            best[key] = record

    by_peer: dict[str, list[Record]] = {}
    for record in best.values():
        by_peer.setdefault(record["peer_id"], []).append(record)

    keyed: list[tuple[tuple[int, str, int], Record]] = []
    for peer, peer_records in by_peer.items():
        peer_records.sort(key=lambda r: r["seq"], reverse=True)
        outlived = at  # expiry a record must beat: `at`, then every newer record's expiry
        kept: list[Record] = []
        for record in peer_records:
            if record["expires"] > outlived:
                kept.append(record)
            outlived = max(outlived, record["expires"])
        issued = 0
        for record in reversed(kept):  # ascending seq
            issued = max(issued, record["issued"])
            keyed.append(((issued, peer, record["seq"]), record))
    keyed.sort(key=lambda item: item[0])
    return [record for _, record in keyed]


#: Orders peers for eviction from a full chain: smaller keys are kept first.
PeerRank = Callable[[str, list[Record]], Any]


def fit(records: list[Record], keep: str, rank: PeerRank, capacity: int | None = None) -> list[Record]:
    """Settled ``records`` cut to fit a chain, whole peers at a time: ``keep``'s records
    always stay, the other peers in ``rank`` order while they fit.

    A full chain must not stop a node from renewing itself (a flood of records from fresh
    keys would otherwise expire every honest node). Peers are evicted whole because
    dropping a peer's newest record would bring an older one (say, its ``register``
    before its ``deregister``) back to life. This is a node's local choice, not part of
    the deterministic merge: nodes only disagree on what they hold while the registry is
    over capacity.
    """
    room = (MAX_BLOCKS if capacity is None else capacity) - 1
    if len(records) <= room:
        return records
    by_peer: dict[str, list[Record]] = {}
    for record in records:
        by_peer.setdefault(record["peer_id"], []).append(record)
    kept = set()
    used = len(by_peer.get(keep, []))
    if keep in by_peer:
        kept.add(keep)
    for peer in sorted((p for p in by_peer if p != keep), key=lambda p: rank(p, by_peer[p])):
        if used + len(by_peer[peer]) <= room:
            kept.add(peer)
            used += len(by_peer[peer])
    return [record for record in records if record["peer_id"] in kept]


def merge_fitting(a: Chain, b: Chain, keep: str, rank: PeerRank) -> Chain:
    """``merge(a, b)``, or when that would be over capacity, the merge cut by ``fit``."""
    at, bits = max(a.compacted_at, b.compacted_at), _same_difficulty(a, b)
    return Chain._trusted(at, fit(_settle(a._records + b._records, at), keep, rank), pow_bits=bits)


class OtherNetwork(RegistryError):
    """Two chains ask for different proofs of work: they are registries of different networks."""


def _same_difficulty(a: Chain, b: Chain) -> int:
    """The proof of work of a merge. A peer must not be able to raise (or lower) it:
    raised, it would drop every honest record; so chains that differ do not merge. The
    empty chain (a node that has not joined yet) takes the other's."""
    if a.pow_bits == b.pow_bits or not b._records and not b.compacted_at:
        return a.pow_bits
    if not a._records and not a.compacted_at:
        return b.pow_bits
    raise OtherNetwork(f"the chains ask for {a.pow_bits} and {b.pow_bits} bits of proof of work: different networks")


def merge(a: Chain, b: Chain) -> Chain:
    """The chain both peers should hold after exchanging ``a`` and ``b``.

    The union of their records, settled at the later of their checkpoint stamps (see
    ``_settle``) and re-linked on a checkpoint with that stamp. It depends only on the
    union of records and the larger stamp, hence commutative, associative and idempotent:
    peers converge on one head whatever order chains reach them in. Raises ``ChainFull``,
    or ``OtherNetwork`` when the two ask for different proofs of work.
    """
    at, bits = max(a.compacted_at, b.compacted_at), _same_difficulty(a, b)
    return Chain._trusted(at, _settle(a._records + b._records, at), pow_bits=bits)


def compact(chain: Chain, now: float | None = None) -> Chain:
    """``chain`` without the records that cannot matter any more at ``now``.

    Drops expired records and records shadowed by a newer record of the same peer, and
    stamps the checkpoint with ``now`` so merges with older copies drop them too. Every
    node live at ``now`` keeps its current record, with its original signature, and
    ``nodes(t)`` is unchanged for every ``t >= now``.
    """
    at = max(chain.compacted_at, int(time.time() if now is None else now))
    return Chain._trusted(at, _settle(chain._records, at), pow_bits=chain.pow_bits)
