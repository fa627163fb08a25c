"""Credits without a blockchain: bilateral receipts in per-peer hash-chained ledgers.

The design follows Tribler's TrustChain: nothing global is agreed on. Every completed
request yields a **receipt** that the worker signs (in its ``done`` frame) and the
requester countersigns (on the same stream). Each of the two appends the receipt to its
own **ledger**, a hash chain of records signed by its owner (``<data-dir>/ledger.json``).
A balance is computed from the receipts alone, by anyone holding them. A peer that signs
two different records with the same sequence number has **forked** its ledger: whoever
sees both (in gossiped heartbeat summaries, or a record it got in an exchange) holds a
transferable proof and stops trusting it.

Amounts are whole **millicredits** (mc). One credit is one generated token of a model of
one billion parameters; a prompt token costs a quarter of a generated one. See
docs/CREDITS.md for the rules and the threats considered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libp2p.peer.id import ID

from .answers import canonical  # the one canonical JSON (as registry records and answers)
from .fsutil import write_atomic
from .identity import Identity, inlined_public_key, verify

log = logging.getLogger("dllm_p2p.credits")

RECEIPT_DOMAIN = b"dllm-receipt/1\n"
RECORD_DOMAIN = b"dllm-ledger/1\n"
LEDGER_FILE = "ledger.json"
ARCHIVE_FILE = "ledger-archive.jsonl"
GENESIS = "0" * 64
#: Every new identity starts with this many millicredits (1,000 credits: about 7,400
#: generated tokens of a 135M-parameter model).
ALLOWANCE_MC = 1_000_000
#: A generated token weighs this many prompt tokens.
COMPLETION_WEIGHT = 4
#: A checkpoint of the balances is written after this many receipts; the records before
#: it move to ``ledger-archive.jsonl`` (kept, never deleted), so ``ledger.json`` stays small.
CHECKPOINT_EVERY = 200
#: Receipt ids a ledger remembers to refuse replays, across checkpoints.
MAX_IDS = 10_000
#: A receipt's time may differ from the countersigner's clock by this much.
MAX_RECEIPT_SKEW_S = 600
#: Bounds of what a receipt may claim (far above any real request).
MAX_TOKENS = 1_000_000
MAX_PARAMS = 10**13
MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 256

RECEIPT_FIELDS = (
    "worker", "requester", "id", "request", "answer", "model", "fingerprint", "params",
    "prompt_tokens", "completion_tokens", "amount", "time",
)


class InvalidReceipt(ValueError):
    """A receipt that does not verify or breaks the rules."""


class DuplicateReceipt(InvalidReceipt):
    """A receipt the ledger holds already (a replay)."""


class InvalidLedger(ValueError):
    """A ledger whose chain, signatures or receipts do not hold; names the first bad record."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message if seq is None else f"record {seq}: {message}")
        self.seq = seq


def amount_mc(params: int, prompt_tokens: int, completion_tokens: int) -> int:
    """The price of one request, in millicredits: (prompt + 4 x completion tokens) x
    params / 4,000,000, rounded up, at least 1. A generated token of a 1B model costs
    1,000 mc (one credit); of SmolLM2-135M (134,515,008 parameters) about 135 mc."""
    weight = prompt_tokens + COMPLETION_WEIGHT * completion_tokens
    return max(1, -(-weight * params // (COMPLETION_WEIGHT * 1_000_000)))


def public_key_of(peer_id: str) -> bytes:
    """The protobuf public key an Ed25519 peer id carries inline (an identity multihash)."""
    key = inlined_public_key(ID.from_base58(peer_id))
    if key is None:
        raise ValueError(f"{peer_id[:60]} does not carry its public key (not an Ed25519 peer id)")
    return key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str) or len(text) > 200:
        raise InvalidReceipt(f"{what} must be base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except Exception:
        raise InvalidReceipt(f"{what} is not base64") from None


def _whole(value: Any, top: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top


# --- receipts ------------------------------------------------------------------------


def make_receipt(
    identity: Identity,
    *,
    requester: str,
    request_id: str | None,
    request_digest: str,
    signature: dict[str, Any],
    params: int,
    now: float | None = None,
) -> dict[str, Any]:
    """The worker's half: the statement about an answer it signed, with ``worker_sig``."""
    usage = signature["usage"]
    statement = {
        "worker": identity.peer_id.to_base58(),
        "requester": requester,
        "id": request_id,
        "request": request_digest,
        "answer": answer_digest(signature),
        "model": signature["model"],
        "fingerprint": signature["fingerprint"],
        "params": int(params),
        "prompt_tokens": int(usage["prompt_tokens"]),
        "completion_tokens": int(usage["completion_tokens"]),
        "amount": amount_mc(int(params), int(usage["prompt_tokens"]), int(usage["completion_tokens"])),
        "time": int(time.time() if now is None else now),
    }
    return {**statement, "worker_sig": _b64(identity.sign(RECEIPT_DOMAIN + canonical(statement)))}


def answer_digest(signature: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a ``done`` frame's whole ``signature`` object."""
    return hashlib.sha256(canonical(signature)).hexdigest()


def statement_of(receipt: dict[str, Any]) -> dict[str, Any]:
    return {key: receipt[key] for key in RECEIPT_FIELDS}


def receipt_id(receipt: dict[str, Any]) -> str:
    return hashlib.sha256(RECEIPT_DOMAIN + canonical(statement_of(receipt))).hexdigest()


def check_receipt(receipt: Any, *, countersigned: bool = True) -> dict[str, Any]:
    """Check a receipt's shape, the pricing rule and its signatures (the requester's too,
    unless ``countersigned`` is False: the worker's half, before countersigning).
    Returns it; raises ``InvalidReceipt`` naming the first problem."""
    if not isinstance(receipt, dict):
        raise InvalidReceipt("a receipt must be a map")
    allowed = set(RECEIPT_FIELDS) | {"worker_sig", "requester_sig"}
    required = allowed if countersigned else allowed - {"requester_sig"}
    if not required <= set(receipt) <= allowed:
        missing, extra = required - set(receipt), set(receipt) - allowed
        raise InvalidReceipt(f"receipt fields: missing {sorted(missing)}, unknown {sorted(extra)}")
    for key in ("worker", "requester", "model", "request", "answer"):
        if not isinstance(receipt[key], str) or not 0 < len(receipt[key]) <= MAX_TEXT_CHARS:
            raise InvalidReceipt(f"{key} must be a string of 1 to {MAX_TEXT_CHARS} characters")
    for key in ("id", "fingerprint"):
        if receipt[key] is not None and (not isinstance(receipt[key], str) or len(receipt[key]) > MAX_TEXT_CHARS):
            raise InvalidReceipt(f"{key} must be null or a short string")
    for key, top in (("params", MAX_PARAMS), ("prompt_tokens", MAX_TOKENS), ("completion_tokens", MAX_TOKENS), ("time", 2**40)):
        if not _whole(receipt[key], top):
            raise InvalidReceipt(f"{key} must be a whole number from 0 to {top}")
    if receipt["params"] < 1:
        raise InvalidReceipt("params must be at least 1")
    rule = amount_mc(receipt["params"], receipt["prompt_tokens"], receipt["completion_tokens"])
    if receipt["amount"] != rule:
        raise InvalidReceipt(f"amount {receipt['amount']!r} mc, the rule gives {rule} mc")
    if receipt["worker"] == receipt["requester"]:
        raise InvalidReceipt("a node cannot pay itself")
    body = RECEIPT_DOMAIN + canonical(statement_of(receipt))
    signers = [("worker", "worker_sig")] + ([("requester", "requester_sig")] if countersigned else [])
    for who, field in signers:
        try:
            key = public_key_of(receipt[who])
        except Exception as exc:
            raise InvalidReceipt(f"{who}: {exc}") from None
        if not verify(key, body, _unb64(receipt[field], field)):
            raise InvalidReceipt(f"{field} does not verify")
    return receipt


def countersign(identity: Identity, receipt: dict[str, Any]) -> dict[str, Any]:
    """The requester's half: the receipt with ``requester_sig`` added."""
    body = RECEIPT_DOMAIN + canonical(statement_of(receipt))
    return {**statement_of(receipt), "worker_sig": receipt["worker_sig"], "requester_sig": _b64(identity.sign(body))}


def check_offer(
    receipt: Any, *, requester: str, worker: str, done: dict[str, Any], params: int | None = None,
    now: float | None = None, request_digest: str | None = None,
) -> dict[str, Any]:
    """What a requester checks before countersigning the receipt in a ``done`` frame: it
    is about this answer, to us, from the worker we dialed, for the tokens it reported,
    priced by the rule (and, when the requester knows the model's size, at that size)."""
    receipt = check_receipt(receipt, countersigned=False)
    if receipt["requester"] != requester:
        raise InvalidReceipt(f"the receipt names requester {receipt['requester']}, not us")
    if receipt["worker"] != worker:
        raise InvalidReceipt("the receipt is not from the worker we asked")
    if request_digest is not None and receipt["request"] != request_digest:
        raise InvalidReceipt("the receipt is about another request")
    signature = done.get("signature")
    try:
        answered = isinstance(signature, dict) and receipt["answer"] == answer_digest(signature)
    except (TypeError, ValueError, RecursionError):  # a signature object that is not plain JSON
        answered = False
    if not answered:
        raise InvalidReceipt("the receipt is about another answer")
    usage = done.get("usage") or {}
    if (receipt["prompt_tokens"], receipt["completion_tokens"]) != (usage.get("prompt_tokens"), usage.get("completion_tokens")):
        raise InvalidReceipt("the receipt counts other tokens than the answer's usage")
    if receipt["fingerprint"] != done.get("fingerprint") or receipt["model"] != done.get("model"):
        raise InvalidReceipt("the receipt names another model")
    if params is not None and receipt["params"] != params:
        raise InvalidReceipt(f"the receipt prices a model of {receipt['params']} parameters, this one has {params}")
    now = time.time() if now is None else now
    if abs(receipt["time"] - now) > MAX_RECEIPT_SKEW_S:
        raise InvalidReceipt(f"the receipt's time is more than {MAX_RECEIPT_SKEW_S} s from ours")
    return receipt


# --- ledger records ------------------------------------------------------------------


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "sig"}
    return hashlib.sha256(RECORD_DOMAIN + canonical(body)).hexdigest()


def sign_record(identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "sig": _b64(identity.sign(RECORD_DOMAIN + canonical(body)))}


#: A record's fields besides owner, seq, prev, kind and sig, by kind.
RECORD_KINDS = {"receipt": ("receipt",), "checkpoint": ("time", "earned", "spent", "receipts")}
#: Largest record (canonical JSON): a receipt record is about 1.1 KB.
MAX_RECORD_BYTES = 4096


def check_record_signature(record: Any, owner: str | None = None) -> dict[str, Any]:
    """A record's shape (exactly its kind's fields, at most ``MAX_RECORD_BYTES``) and its
    owner's signature (not its place in a chain)."""
    base = {"owner", "seq", "prev", "kind", "sig"}
    if not isinstance(record, dict) or not base <= set(record) or record["kind"] not in RECORD_KINDS:
        raise InvalidReceipt("a ledger record needs owner, seq, prev, a known kind and sig")
    if set(record) != base | set(RECORD_KINDS[record["kind"]]):
        raise InvalidReceipt(f"a {record['kind']} record has exactly the fields {sorted(base | set(RECORD_KINDS[record['kind']]))}")
    if owner is not None and record["owner"] != owner:
        raise InvalidReceipt(f"record of {record['owner']!r}, not of {owner}")
    if not isinstance(record["owner"], str) or not _whole(record["seq"], 2**53) or not isinstance(record["prev"], str):
        raise InvalidReceipt("owner, seq or prev has the wrong type")
    try:
        key = public_key_of(record["owner"])
    except Exception as exc:
        raise InvalidReceipt(f"owner: {exc}") from None
    body = {k: v for k, v in record.items() if k != "sig"}
    try:
        data = RECORD_DOMAIN + canonical(body)
    except (TypeError, ValueError, RecursionError):
        raise InvalidReceipt("a record must be plain JSON") from None
    if len(data) > MAX_RECORD_BYTES:
        raise InvalidReceipt(f"a record of {len(data)} bytes, over {MAX_RECORD_BYTES}")
    if not verify(key, data, _unb64(record["sig"], "sig")):
        raise InvalidReceipt("the owner's signature does not verify")
    return record


@dataclass
class Totals:
    earned: int = 0
    spent: int = 0
    receipts: int = 0

    @property
    def balance(self) -> int:
        """With the allowance: what an identity with a proof of work holds (``net`` without)."""
        return ALLOWANCE_MC + self.net

    @property
    def net(self) -> int:
        return self.earned - self.spent

    def add(self, owner: str, receipt: dict[str, Any]) -> None:
        if receipt["worker"] == owner:
            self.earned += receipt["amount"]
        else:
            self.spent += receipt["amount"]
        self.receipts += 1

    def to_json(self) -> dict[str, int]:
        return {"earned": self.earned, "spent": self.spent, "receipts": self.receipts, "balance": self.balance}


def verify_records(records: list[Any], owner: str | None = None, *, trust_checkpoint: bool = True) -> Totals:
    """Check a ledger's records in order: each signed by the one owner, numbered 1, 2, ...
    (or on from a first checkpoint), each ``prev`` the hash of the one before, every
    receipt valid, countersigned, naming the owner and held once; checkpoints equal to
    the totals so far. Returns the totals; raises ``InvalidLedger`` at the first bad record.

    A ledger that starts at a checkpoint (its older records archived) starts from the
    checkpoint's totals, which are its owner's word. With ``trust_checkpoint`` False (a
    peer's ledger) only the debt in them counts: credit older than the checkpoint is
    not believed, debt is."""
    totals = Totals()
    prev, seq, seen = GENESIS, 0, set()
    for index, record in enumerate(records):
        at = record.get("seq") if isinstance(record, dict) else None
        at = at if isinstance(at, int) else None
        try:
            check_record_signature(record, owner)
        except InvalidReceipt as exc:
            raise InvalidLedger(str(exc), at if at is not None else index + 1) from None
        owner = record["owner"]
        if index == 0 and record["kind"] == "checkpoint":
            totals = _checkpoint_totals(record)  # a trimmed ledger: its start is the owner's word
            if not trust_checkpoint:
                totals = Totals(0, max(0, totals.spent - totals.earned), totals.receipts)
        else:
            if record["seq"] != seq + 1:
                raise InvalidLedger(f"expected sequence number {seq + 1}", record["seq"])
            if record["prev"] != prev:
                raise InvalidLedger("prev is not the hash of the record before it", record["seq"])
            if record["kind"] == "receipt":
                try:
                    receipt = check_receipt(record.get("receipt"))
                except InvalidReceipt as exc:
                    raise InvalidLedger(f"bad receipt: {exc}", record["seq"]) from None
                if owner not in (receipt["worker"], receipt["requester"]):
                    raise InvalidLedger("a receipt that does not name the ledger's owner", record["seq"])
                rid = receipt_id(receipt)
                if rid in seen:
                    raise InvalidLedger("the same receipt twice (a replay)", record["seq"])
                seen.add(rid)
                totals.add(owner, receipt)
            elif record["kind"] == "checkpoint":
                if _checkpoint_totals(record) != totals:
                    raise InvalidLedger("a checkpoint whose totals are not those of the records before it", record["seq"])
            else:
                raise InvalidLedger(f"unknown kind {record['kind']!r}", record["seq"])
        prev, seq = record_hash(record), record["seq"]
    return totals


def _checkpoint_totals(record: dict[str, Any]) -> Totals:
    values = [record.get(k) for k in ("earned", "spent", "receipts")]
    if not all(_whole(v, 2**62) for v in values):
        raise InvalidLedger("a checkpoint needs whole earned, spent and receipts", record.get("seq"))
    return Totals(*values)


def load_ledger_file(path: str | Path) -> dict[str, Any]:
    """Read a ledger file: ``{"version": 1, "owner": ..., "records": [...]}``."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InvalidLedger(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidLedger(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("records"), list):
        raise InvalidLedger(f"{path} is not a dllm ledger (version 1 with records)")
    if not isinstance(data.get("owner"), str):
        raise InvalidLedger(f"{path} names no owner")
    return data


def _last_archived(path: Path) -> int:
    """The number of the last record in an archive file (0 when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = [line for line in f.read().splitlines() if line.strip()]
        return int(json.loads(lines[-1])["seq"]) if lines else 0
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 0


def allowance_holds(owner: str, proof: Any, bits: int | None = None) -> bool:
    """Whether ``proof`` (``{"bits", "nonce"}``) is ``owner``'s proof of work of at least
    ``bits`` bits (of the bits it claims, when ``bits`` is None): the allowance's price."""
    from .registry.chain import pow_ok

    if not isinstance(proof, dict) or not isinstance(proof.get("bits"), int) or isinstance(proof.get("bits"), bool):
        return False
    claimed = proof["bits"]
    if not 0 <= claimed <= 64 or (bits is not None and claimed < bits):
        return False
    return pow_ok(owner, proof.get("nonce"), claimed)


def verify_file(path: str | Path) -> tuple[str, Totals, list[dict[str, Any]]]:
    data = load_ledger_file(path)
    return data["owner"], verify_records(data["records"], data["owner"]), data["records"]


class Ledger:
    """This node's own ledger, kept in ``<data-dir>/ledger.json``. Thread-safe. Every
    write replaces the file atomically. ``append(..., save=False)`` changes only memory
    and ``flush()`` writes (the ledger service flushes in the background, so a receipt
    costs no disk wait on the request's path; a crash can lose the receipts of the last
    flush's few milliseconds, which the counterparty still holds)."""

    def __init__(self, data_dir: str | Path, identity: Identity) -> None:
        #: This identity's proof of work (``{"bits", "nonce"}``), saved with the ledger
        #: once known: it is what earns the allowance (``allowance_holds``).
        self.pow: dict[str, Any] | None = None
        self.dir = Path(data_dir).expanduser()
        self.path = self.dir / LEDGER_FILE
        self.identity = identity
        self.owner = identity.peer_id.to_base58()
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.totals = Totals()
        #: Receipts held (by id), across checkpoints: the last MAX_IDS, oldest first.
        self._ids: dict[str, None] = {}
        #: The highest record number in the archive (records are archived once).
        self._archived = 0
        #: ``summary()`` as of the last write: peers hear only of records on disk, so a
        #: node that crashes never told anyone of a record it lost (that would be a fork).
        self._durable: dict[str, Any] = {}
        #: Records to append to the archive at the next flush (after a checkpoint).
        self._to_archive: list[dict[str, Any]] = []
        #: Each record's JSON text, made once: a flush joins them instead of encoding the
        #: whole file again (3 ms of held GIL for 200 records).
        self._lines: dict[int, str] = {}
        self._dirty = False
        self._flushing = threading.Lock()  # one writer at a time, writes in order
        self._load()
        self._durable = self._summary_now()

    def _load(self) -> None:
        self._archived = _last_archived(self.dir / ARCHIVE_FILE)
        if not self.path.exists():
            return
        try:
            data = load_ledger_file(self.path)
            owner, records = data["owner"], data["records"]
            totals = verify_records(records, owner)
            if owner != self.owner:
                raise InvalidLedger(f"it belongs to {owner}, not to this node ({self.owner})")
        except InvalidLedger as exc:
            aside = self.path.with_name(f"{LEDGER_FILE}.invalid-{int(time.time())}")
            self.path.rename(aside)
            log.error("%s does not verify (%s): kept as %s; starting a new ledger", self.path, exc, aside.name)
            return
        self.records, self.totals = records, totals
        self.pow = data["pow"] if isinstance(data.get("pow"), dict) else None
        self._ids = {receipt_id(r["receipt"]): None for r in records if r["kind"] == "receipt"}

    @property
    def seq(self) -> int:
        return self.records[-1]["seq"] if self.records else 0

    @property
    def head(self) -> str:
        return record_hash(self.records[-1]) if self.records else GENESIS

    def append(self, receipt: dict[str, Any], save: bool = True) -> dict[str, Any]:
        """Append a countersigned receipt naming this node; returns the new record. A
        receipt already held raises ``DuplicateReceipt``. Written to disk before
        returning, unless ``save`` is False (then by ``flush``)."""
        check_receipt(receipt)
        if self.owner not in (receipt["worker"], receipt["requester"]):
            raise InvalidReceipt("the receipt does not name this node")
        rid = receipt_id(receipt)
        with self._lock:
            if rid in self._ids:
                raise DuplicateReceipt("this receipt is in the ledger already")
            record = self._next({"kind": "receipt", "receipt": receipt})
            self.records.append(record)
            self._ids[rid] = None
            while len(self._ids) > MAX_IDS:
                del self._ids[next(iter(self._ids))]
            self.totals.add(self.owner, receipt)
            since = sum(1 for r in self.records if r["kind"] == "receipt")
            if since >= CHECKPOINT_EVERY:
                self._checkpoint()
            self._dirty = True
        if save:
            self.flush()
        return record

    def _next(self, body: dict[str, Any]) -> dict[str, Any]:
        return sign_record(self.identity, {"owner": self.owner, "seq": self.seq + 1, "prev": self.head, **body})

    def _checkpoint(self) -> None:
        """Sign the totals so far; the records before it move to the archive at the next
        flush (one JSON line each, appended and fsynced before ledger.json drops them)."""
        point = self._next({"kind": "checkpoint", "time": int(time.time()), **{
            "earned": self.totals.earned, "spent": self.totals.spent, "receipts": self.totals.receipts}})
        self._to_archive.extend(self.records)
        self.records = [point]

    def flush(self) -> None:
        """Write what changed since the last flush (archive lines first, then the file)."""
        with self._flushing:
            with self._lock:
                if not self._dirty:
                    return
                archive, self._to_archive = self._to_archive, []
                records = list(self.records)
                head = {"version": 1, "owner": self.owner, **({"pow": self.pow} if self.pow else {})}
                summary = self._summary_now()
                self._dirty = False
            lines = [self._line(r) for r in records]  # off the lock: appends go on meanwhile
            # One record per line, keys sorted: the same JSON as json.dumps, cheaper.
            text = json.dumps(head, sort_keys=True)[:-1] + ', "records": [\n' + ",\n".join(lines) + "\n]}\n"
            try:
                fresh = [r for r in archive if r["seq"] > self._archived]  # never twice, even after a failure
                if fresh:
                    with open(self.dir / ARCHIVE_FILE, "a", encoding="ascii") as f:
                        for record in fresh:
                            f.write(json.dumps(record, sort_keys=True) + "\n")
                        f.flush()
                        os.fsync(f.fileno())
                    self._archived = fresh[-1]["seq"]
                write_atomic(self.path, text.encode("ascii"))
            except BaseException:
                with self._lock:  # try again at the next flush
                    self._to_archive[:0] = archive
                    self._dirty = True
                raise
            self._lines = {r["seq"]: line for r, line in zip(records, lines)}
            self._durable = summary

    def _line(self, record: dict[str, Any]) -> str:
        line = self._lines.get(record["seq"])
        return line if line is not None else json.dumps(record, sort_keys=True)

    @property
    def dirty(self) -> bool:
        return self._dirty

    def set_pow(self, proof: dict[str, Any]) -> None:
        """Keep our proof of work in the file (written at the next flush)."""
        with self._lock:
            self.pow = proof
            self._dirty = True

    @property
    def durable_seq(self) -> int:
        return self._durable.get("seq", 0)

    def summary(self) -> dict[str, Any]:
        """What heartbeats carry: the head, the totals, and the hashes of the last records
        (so a peer that held another record at one of those numbers sees the fork), as
        of the last write."""
        return dict(self._durable)

    def _summary_now(self, recent: int = 4) -> dict[str, Any]:
        tail = self.records[-recent:]
        return {
            "seq": self.seq, "head": self.head, "earned": self.totals.earned, "spent": self.totals.spent,
            "recent": [[r["seq"], record_hash(r)] for r in tail],
        }

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.records)


# --- what a node knows of its peers --------------------------------------------------


#: Peers remembered, and record numbers remembered per peer (a hash each). Evidence (the
#: signed heartbeat or record that committed to a hash, at most 8 KB) is kept for a
#: peer's last EVIDENCE_PER_PEER commitments only: about 32 MB when every bound is reached.
MAX_PEERS = 1024
MAX_SEEN_PER_PEER = 64
EVIDENCE_PER_PEER = 4
#: Forks remembered (the oldest are forgotten first; a forked peer stays refused while remembered).
MAX_FORKS = 256
#: A peer that countersigned with a record numbered N and still says, this long after,
#: that its ledger ends before N, withheld the record from its own ledger.
WITHHELD_GRACE_S = 120.0


@dataclass
class Fork:
    """Proof that ``peer`` signed two records with the same ``seq``: two signed objects
    (heartbeats or ledger records, as received) that each commit to one of the hashes;
    or (``hashes[1] == "withheld"``) that it signed a record numbered ``seq`` and then
    kept publishing a ledger that ends before it. Evidence of an older commitment may
    have been forgotten (``None``)."""

    peer: str
    seq: int
    hashes: tuple[str, str]
    evidence: tuple[Any, Any]
    found_at: float

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "seq": self.seq, "hashes": list(self.hashes), "found_at": round(self.found_at, 1)}


class PeerLedgers:
    """Per peer: the ledger hashes it committed to (in signed heartbeats and records), its
    latest gossiped totals, its balance as verified from its records, and forks. Every
    table is bounded. Thread-safe."""

    def __init__(self, data_dir: str | Path | None = None) -> None:
        #: peer -> seq -> (hash, evidence key or None); peer -> evidence key -> evidence
        self._seen: OrderedDict[str, OrderedDict[int, tuple[str, int | None]]] = OrderedDict()
        self._evidence: dict[str, OrderedDict[int, Any]] = {}
        #: peer -> (highest seq of a record it gave us directly, when)
        self._given: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.summaries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        #: peer -> (totals, head, when, whether its proof of work earns it the allowance)
        self.verified: OrderedDict[str, tuple[Totals, str, float, bool]] = OrderedDict()
        self.forks: OrderedDict[str, Fork] = OrderedDict()
        self.path = None if data_dir is None else Path(data_dir).expanduser() / "forks.json"
        self.forks_dirty = False
        self._counter = 0
        self._lock = threading.Lock()

    def _keep(self, peer: str, evidence: Any) -> int:
        self._counter += 1
        kept = self._evidence.setdefault(peer, OrderedDict())
        kept[self._counter] = evidence
        while len(kept) > EVIDENCE_PER_PEER:
            kept.popitem(last=False)
        return self._counter

    def commit(self, peer: str, seq: int, digest: str, evidence: Any) -> Fork | None:
        """Note that ``peer`` committed (signed) hash ``digest`` at ``seq``; return the
        fork if it had committed another."""
        with self._lock:
            seen = self._seen.pop(peer, None) or OrderedDict()
            self._seen[peer] = seen
            while len(self._seen) > MAX_PEERS:
                gone, _ = self._seen.popitem(last=False)
                self._evidence.pop(gone, None)
            held = seen.get(seq)
            if held is None:
                seen[seq] = (digest, self._keep(peer, evidence))
                while len(seen) > MAX_SEEN_PER_PEER:
                    seen.popitem(last=False)
                return None
            if held[0] == digest:
                return None
            if peer in self.forks:
                return self.forks[peer]
            earlier = self._evidence.get(peer, {}).get(held[1]) if held[1] is not None else None
            fork = self._add_fork(Fork(peer, seq, (held[0], digest), (earlier, evidence), time.time()))
        log.warning("peer %s forked its ledger: two different records numbered %d", peer, seq)
        return fork

    def _add_fork(self, fork: Fork) -> Fork:
        self.forks[fork.peer] = fork
        while len(self.forks) > MAX_FORKS:
            self.forks.popitem(last=False)
        self.forks_dirty = True
        return fork

    def take_summary(self, peer: str, summary: dict[str, Any], evidence: Any) -> Fork | None:
        """A verified heartbeat's ``ledger`` summary."""
        with self._lock:
            self.summaries[peer] = summary
            self.summaries.move_to_end(peer)
            while len(self.summaries) > MAX_PEERS:
                self.summaries.popitem(last=False)
        fork = None
        for seq, digest in summary.get("recent", []):
            fork = self.commit(peer, seq, digest, evidence) or fork
        if summary["seq"] > 0:
            fork = self.commit(peer, summary["seq"], summary["head"], evidence) or fork
        given = self._given.get(peer)
        if fork is None and given is not None and summary["seq"] < given[0] and time.time() - given[1] > WITHHELD_GRACE_S:
            with self._lock:
                if peer not in self.forks:
                    held = self._seen.get(peer, {}).get(given[0])
                    record = self._evidence.get(peer, {}).get(held[1]) if held and held[1] is not None else None
                    fork = self._add_fork(Fork(peer, given[0], (held[0] if held else "?", "withheld"), (record, evidence), time.time()))
                    log.warning("peer %s countersigned with record %d and never published it", peer, given[0])
        return fork

    def take_record(self, record: dict[str, Any], given: bool = False) -> Fork | None:
        """A peer's signed ledger record (checked by the caller); ``given``: it came to us
        in a countersign frame, so the peer must publish it."""
        peer = record["owner"]
        if given:
            with self._lock:
                previous = self._given.pop(peer, (0, 0.0))
                self._given[peer] = (record["seq"], time.time()) if record["seq"] > previous[0] else previous
                while len(self._given) > MAX_PEERS:
                    self._given.popitem(last=False)
        return self.commit(peer, record["seq"], record_hash(record), record)

    def set_verified(self, peer: str, totals: Totals, head: str, allowance: bool = True) -> None:
        with self._lock:
            self.verified[peer] = (totals, head, time.time(), allowance)
            self.verified.move_to_end(peer)
            while len(self.verified) > MAX_PEERS:
                self.verified.popitem(last=False)

    def balance(self, peer: str) -> int | None:
        """The peer's balance as verified from its ledger (None: not verified yet);
        a forked peer has none worth anything."""
        if peer in self.forks:
            return -(2**62)
        held = self.verified.get(peer)
        if held is None:
            return None
        return held[0].balance if held[3] else held[0].net

    def save_forks(self) -> None:
        """Write ``forks.json`` when forks changed (blocking: call it from a thread)."""
        if self.path is None or not self.forks_dirty:
            return
        self.forks_dirty = False
        with self._lock:
            forks = list(self.forks.values())
        data = [{**f.to_json(), "evidence": [_evidence_json(e) for e in f.evidence]} for f in forks]
        try:
            write_atomic(self.path, (json.dumps(data, indent=1) + "\n").encode())
        except OSError as exc:
            self.forks_dirty = True
            log.warning("could not write %s: %r", self.path, exc)


def _evidence_json(evidence: Any) -> Any:
    if isinstance(evidence, bytes):
        return {"heartbeat": _b64(evidence)}
    return evidence if evidence is None else {"record": evidence}
