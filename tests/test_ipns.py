"""IPNS records without a daemon: names, signing, verification, selection."""

from __future__ import annotations

import cbor2
import cid as py_cid
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.records.ipns import IPNSValidator
from libp2p.records.utils import InvalidRecordType

from dllm_p2p.identity import Identity
from dllm_p2p.registry import ipns
from dllm_p2p.registry.ipfs import IpfsError, _int_field, _len_field
from dllm_p2p.registry.ipns import IpnsInvalid, IpnsRecord

EMPTY_DIR = "/ipfs/QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
DAY = 86_400.0

# The Ed25519 key of the all-zero seed. Kubo's own tests pair its peer id with this name
# (ipfs/kubo core/node/p2pforge_resolver_test.go, testPeerID).
ZERO_SEED_PEER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
ZERO_SEED_NAME = "k51qzi5uqu5dhnwe629wdlncpql6frppdpwnz4wtlcw816aysd5wwlk63g4wmh"


@pytest.fixture(scope="module")
def me() -> Identity:
    return Identity(create_new_key_pair(bytes(32)))


@pytest.fixture(scope="module")
def other() -> Identity:
    return Identity(create_new_key_pair(b"\x01" * 32))


def record(identity: Identity, value: str = EMPTY_DIR, *, sequence: int = 7, now: float = NOW) -> bytes:
    return ipns.make_record(identity, value, sequence=sequence, lifetime=DAY, ttl=300.0, now=now)


def signed(identity: Identity, data: bytes, **extra: int | bytes) -> bytes:
    """A V2-only record around arbitrary ``data``, properly signed: to reach the checks
    that come after the signature."""
    fields: dict[int, int | bytes] = {8: identity.sign(ipns.SIGNATURE_PREFIX + data), 9: data}
    fields.update({int(k[1:]): v for k, v in extra.items()})
    return ipns._encode_entry(fields)


def data_of(**overrides: object) -> dict:
    base = {
        "Value": EMPTY_DIR.encode(),
        "Validity": b"2027-01-16T08:00:00Z",
        "ValidityType": 0,
        "Sequence": 7,
        "TTL": 300_000_000_000,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


# --- names ------------------------------------------------------------------------------


def test_name_of_zero_seed_key_matches_kubo(me: Identity) -> None:
    assert me.peer_id.to_base58() == ZERO_SEED_PEER
    assert ipns.ipns_name(me.peer_id) == ZERO_SEED_NAME
    assert ipns.ipns_name(ZERO_SEED_PEER) == ZERO_SEED_NAME


def test_name_agrees_with_py_cid(other: Identity) -> None:
    mh = other.peer_id.to_bytes()
    independent = py_cid.make_cid(1, "libp2p-key", mh)
    name = ipns.ipns_name(other.peer_id)
    assert name == independent.encode("base36").decode()
    assert name.startswith("k51")
    base32 = independent.encode("base32").decode()
    assert base32.startswith("bafz")
    for form in (name, base32, other.peer_id.to_base58(), "/ipns/" + name, "/ipns/" + base32):
        assert ipns.peer_id_of_name(form) == other.peer_id


def test_sha256_peer_ids_are_names() -> None:
    qm_peer = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"  # any sha2-256 multihash
    peer = ipns.peer_id_of_name(qm_peer)
    assert peer.to_base58() == qm_peer
    assert ipns.peer_id_of_name(ipns.ipns_name(peer)) == peer


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("example.com", "DNSLink names are not supported"),
        ("/ipns/example.com", "DNSLink"),
        ("bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354", "codec 0x70"),
        ("k51qzi5uqu5dhnwe629wdlncpql6frppdpwnz4wtlcw816aysd5wwlk63g4wm!", "not lowercase base36"),
        ("12D3KooW0000", "not base58"),
        ("QmShort", "is not an IPNS name"),
    ],
)
def test_bad_names_are_refused(name: str, message: str) -> None:
    with pytest.raises(IpnsInvalid, match=message):
        ipns.peer_id_of_name(name)


def test_dht_key_is_libp2p_style(me: Identity) -> None:
    assert ipns.dht_key(me.peer_id) == "/ipns/" + ZERO_SEED_PEER
    assert ipns.dht_key(ZERO_SEED_NAME) == "/ipns/" + ZERO_SEED_PEER


# --- records ----------------------------------------------------------------------------


def test_round_trip(me: Identity) -> None:
    rec = ipns.verify_record(ZERO_SEED_NAME, record(me), now=NOW)
    assert rec == IpnsRecord(EMPTY_DIR, 7, NOW + DAY, 300.0)
    # every accepted spelling of the name verifies the same record
    assert ipns.verify_record(me.peer_id, record(me), now=NOW) == rec
    assert ipns.verify_record("/ipns/" + ZERO_SEED_PEER, record(me), now=NOW) == rec


def test_fields_are_kubos(me: Identity) -> None:
    fields = ipns._parse_entry(record(me))
    assert sorted(fields) == [1, 2, 3, 4, 5, 6, 8, 9]  # no pubKey (7): the key is in the name
    assert fields[1] == EMPTY_DIR.encode()
    assert fields[3] == 0 and fields[5] == 7 and fields[6] == 300_000_000_000
    assert fields[4] == b"2027-01-16T08:00:00Z"
    # zero-valued V1 copies are still written (proto2 presence), as JS ipns requires
    zero = ipns._parse_entry(ipns.make_record(me, EMPTY_DIR, sequence=0, lifetime=DAY, ttl=0, now=NOW))
    assert zero[3] == 0 and zero[5] == 0 and zero[6] == 0
    # signatureV1 covers value || validity || "EOL"
    assert me.key_pair.public_key.verify(fields[1] + fields[4] + b"EOL", fields[2])


def test_validity_is_rfc3339_nano() -> None:
    assert ipns._format_rfc3339(1_796_000_000_123_456_789) == "2026-11-30T00:53:20.123456789Z"
    assert ipns._format_rfc3339(1_796_000_000_120_000_000) == "2026-11-30T00:53:20.12Z"  # Go trims zeros
    assert ipns._format_rfc3339(1_796_000_000_000_000_000) == "2026-11-30T00:53:20Z"
    assert ipns._parse_rfc3339("2026-11-30T00:53:20.123456789Z") == 1_796_000_000_123_456_789
    assert ipns._parse_rfc3339("2026-11-30T01:53:20.5+01:00") == 1_796_000_000_500_000_000
    for bad in ("2026-11-29 23:33:20Z", "2026-02-30T00:00:00Z", "2026-11-29T23:33:20.1234567891Z"):
        with pytest.raises(ValueError):
            ipns._parse_rfc3339(bad)


def test_clock_default_gives_nanoseconds(me: Identity) -> None:
    rec = ipns.make_record(me, EMPTY_DIR, sequence=1, lifetime=60, ttl=1)
    assert ipns.verify_record(me.peer_id, rec).sequence == 1


def test_dag_cbor_bytes_are_hand_checked() -> None:
    value = EMPTY_DIR.encode()
    validity = b"2026-11-30T01:02:03.123456789Z"
    data = ipns._encode_data(value, validity, 7, 60_000_000_000)
    expected = (
        "a5"  # map, 5 pairs
        + "63" + b"TTL".hex() + "1b" + "0000000df8475800"  # 60e9 needs a uint64
        + "65" + b"Value".hex() + "5834" + value.hex()  # 52-byte string
        + "68" + b"Sequence".hex() + "07"  # "Sequence" before "Validity": both 8 bytes, S < V
        + "68" + b"Validity".hex() + "581e" + validity.hex()  # 30-byte string
        + "6c" + b"ValidityType".hex() + "00"
    )
    assert data.hex() == expected
    assert list(cbor2.loads(data)) == ["TTL", "Value", "Sequence", "Validity", "ValidityType"]
    assert cbor2.dumps(cbor2.loads(data), canonical=True) == data


def test_record_data_is_the_hand_checked_encoding(me: Identity) -> None:
    fields = ipns._parse_entry(record(me))
    assert fields[9] == ipns._encode_data(EMPTY_DIR.encode(), b"2027-01-16T08:00:00Z", 7, 300_000_000_000)


def test_make_record_refuses_bad_arguments(me: Identity) -> None:
    with pytest.raises(ValueError, match="/ipfs/ or /ipns/"):
        ipns.make_record(me, "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn", sequence=1, lifetime=DAY, ttl=1)
    with pytest.raises(ValueError, match="uint64"):
        ipns.make_record(me, EMPTY_DIR, sequence=-1, lifetime=DAY, ttl=1)
    with pytest.raises(ValueError, match="lifetime"):
        ipns.make_record(me, EMPTY_DIR, sequence=1, lifetime=0, ttl=1)
    with pytest.raises(ValueError, match="above the limit"):
        ipns.make_record(me, "/ipfs/" + "x" * 5000, sequence=1, lifetime=DAY, ttl=1)


# --- verification failures ----------------------------------------------------------------


def tampered(rec: bytes, number: int, value: int | bytes) -> bytes:
    fields = ipns._parse_entry(rec)
    fields[number] = value
    return ipns._encode_entry(fields)


def test_tampered_v1_value_is_refused(me: Identity) -> None:
    bad = tampered(record(me), 1, b"/ipfs/QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")
    with pytest.raises(IpnsInvalid, match="V1 field value does not match the signed data Value"):
        ipns.verify_record(me.peer_id, bad, now=NOW)


def test_tampered_v1_sequence_is_refused(me: Identity) -> None:
    with pytest.raises(IpnsInvalid, match="V1 field sequence does not match the signed data Sequence"):
        ipns.verify_record(me.peer_id, tampered(record(me), 5, 8), now=NOW)
    with pytest.raises(IpnsInvalid, match="V1 field ttl"):
        ipns.verify_record(me.peer_id, tampered(record(me), 6, 1), now=NOW)
    with pytest.raises(IpnsInvalid, match="V1 field validity does not match"):
        ipns.verify_record(me.peer_id, tampered(record(me), 4, b"2099-01-01T00:00:00Z"), now=NOW)


def test_tampered_signature_is_refused(me: Identity) -> None:
    sig = ipns._parse_entry(record(me))[8]
    assert isinstance(sig, bytes)
    bad = tampered(record(me), 8, bytes([sig[0] ^ 1]) + sig[1:])
    with pytest.raises(IpnsInvalid, match=f"signatureV2 does not verify for {ZERO_SEED_NAME}"):
        ipns.verify_record(me.peer_id, bad, now=NOW)


def test_tampered_data_is_refused(me: Identity) -> None:
    fields = ipns._parse_entry(record(me))
    data = cbor2.loads(fields[9])
    data["Sequence"] = 8
    with pytest.raises(IpnsInvalid, match="signatureV2 does not verify"):
        ipns.verify_record(me.peer_id, tampered(record(me), 9, cbor2.dumps(data, canonical=True)), now=NOW)


def test_record_for_another_key_is_refused(me: Identity, other: Identity) -> None:
    with pytest.raises(IpnsInvalid, match="signatureV2 does not verify for k51"):
        ipns.verify_record(other.peer_id, record(me), now=NOW)
    # an embedded pubKey must belong to the name
    with pytest.raises(IpnsInvalid, match="pubKey belongs to"):
        ipns.verify_record(other.peer_id, tampered(record(me), 7, me.public_key_bytes), now=NOW)
    # ...and when it does, it is used
    assert ipns.verify_record(me.peer_id, tampered(record(me), 7, me.public_key_bytes), now=NOW).sequence == 7


def test_expired_record_is_refused(me: Identity) -> None:
    rec = record(me)
    assert ipns.verify_record(me.peer_id, rec, now=NOW + DAY - 1).sequence == 7
    with pytest.raises(IpnsInvalid, match="expired at 2027-01-16T08:00:00Z"):
        ipns.verify_record(me.peer_id, rec, now=NOW + DAY)


def test_oversized_record_is_refused(me: Identity) -> None:
    padded = record(me) + _len_field(15, b"x" * 10_000)  # an unknown field, else valid
    with pytest.raises(IpnsInvalid, match="above the IPNS limit of 10240"):
        ipns.verify_record(me.peer_id, padded, now=NOW)
    small_padding = record(me) + _len_field(15, b"x" * 100)
    assert ipns.verify_record(me.peer_id, small_padding, now=NOW).sequence == 7


def test_garbage_is_refused(me: Identity) -> None:
    with pytest.raises(IpnsInvalid, match="not a protobuf IpnsEntry"):
        ipns.verify_record(me.peer_id, b"\x0a\xff\xff\xff", now=NOW)
    with pytest.raises(IpnsInvalid, match="no signatureV2 or no data"):
        ipns.verify_record(me.peer_id, b"", now=NOW)
    with pytest.raises(IpnsInvalid, match="wrong protobuf wire type"):
        ipns.verify_record(me.peer_id, _int_field(9, 5), now=NOW)


def test_v2_only_record_is_accepted(me: Identity) -> None:
    rec = signed(me, cbor2.dumps(data_of(), canonical=True))
    assert ipns.verify_record(me.peer_id, rec, now=NOW) == IpnsRecord(EMPTY_DIR, 7, NOW + DAY, 300.0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (cbor2.dumps(data_of(TTL=None), canonical=True), "has no TTL"),
        (cbor2.dumps(data_of(Value=EMPTY_DIR), canonical=True), "Value must be a byte string"),
        (cbor2.dumps(data_of(Sequence="7"), canonical=True), "Sequence must be an integer"),
        (cbor2.dumps(data_of(Sequence=True), canonical=True), "Sequence must be an integer"),
        (cbor2.dumps(data_of(Sequence=2**64), canonical=True), "Sequence is not a uint64"),
        (cbor2.dumps(data_of(ValidityType=1), canonical=True), "ValidityType 1 is not supported"),
        (cbor2.dumps(data_of(Validity=b"tomorrow"), canonical=True), "Validity is not an RFC 3339"),
        (cbor2.dumps(data_of(Value=EMPTY_DIR[len("/ipfs/") :].encode()), canonical=True), "not an /ipfs/"),
        (cbor2.dumps(data_of(), canonical=False), "not canonical DAG-CBOR"),  # insertion order
        (cbor2.dumps(data_of(), canonical=True) + b"\x00", "not canonical DAG-CBOR"),
        (cbor2.dumps([1, 2], canonical=True), "not a CBOR map"),
        (b"\xff", "not CBOR"),
    ],
)
def test_signed_but_malformed_data_is_refused(me: Identity, data: bytes, message: str) -> None:
    with pytest.raises(IpnsInvalid, match=message):
        ipns.verify_record(me.peer_id, signed(me, data), now=NOW)


def test_extension_fields_are_ignored(me: Identity) -> None:
    data = cbor2.dumps(data_of(_note=b"hi", _n=3), canonical=True)
    assert ipns.verify_record(me.peer_id, signed(me, data), now=NOW).value == EMPTY_DIR


def test_errors_are_ipfs_errors() -> None:
    assert issubclass(IpnsInvalid, IpfsError)


# --- libp2p's validator and selection ----------------------------------------------------


def test_libp2p_validator_accepts_our_records(me: Identity) -> None:
    rec = ipns.make_record(me, EMPTY_DIR, sequence=7, lifetime=DAY, ttl=300.0)  # clock time
    validator = IPNSValidator()
    validator.validate(ipns.dht_key(me.peer_id), rec)
    details = validator.validate_with_details(ipns.dht_key(me.peer_id), rec)
    assert details.value == EMPTY_DIR.encode()
    assert details.sequence == 7 and details.ttl == 300_000_000_000
    assert details.public_key_inlined and details.has_v1_fields
    # its hex-multihash key form works too; a k51 name does not
    validator.validate("/ipns/" + me.peer_id.to_bytes().hex(), rec)
    with pytest.raises(InvalidRecordType):
        validator.validate("/ipns/" + ZERO_SEED_NAME, rec)


def test_libp2p_validator_refuses_what_we_refuse(me: Identity, other: Identity) -> None:
    validator = IPNSValidator()
    rec = ipns.make_record(me, EMPTY_DIR, sequence=7, lifetime=DAY, ttl=300.0)
    with pytest.raises(InvalidRecordType):
        validator.validate(ipns.dht_key(other.peer_id), rec)
    with pytest.raises(InvalidRecordType):
        validator.validate(ipns.dht_key(me.peer_id), tampered(rec, 5, 8))


def test_selection(me: Identity) -> None:
    old = ipns.verify_record(me.peer_id, record(me, sequence=7), now=NOW)
    later = ipns.verify_record(me.peer_id, record(me, sequence=7, now=NOW + 60), now=NOW)
    higher = ipns.verify_record(me.peer_id, record(me, sequence=8, now=NOW - 60), now=NOW)
    assert ipns.newer(later, old) and not ipns.newer(old, later)
    assert ipns.newer(higher, later)  # sequence first, even with an earlier validity
    assert not ipns.newer(old, old)
    assert ipns.select([old, higher, later]) == higher
    assert ipns.select([old, later]) == later
    with pytest.raises(ValueError):
        ipns.select([])
    # libp2p's selector agrees
    raws = [record(me, sequence=7), record(me, sequence=8, now=NOW - 60), record(me, sequence=7, now=NOW + 60)]
    assert IPNSValidator().select(ipns.dht_key(me.peer_id), raws) == 1


def test_peer_id_objects_pass_through(me: Identity) -> None:
    peer = me.peer_id
    assert ipns.peer_id_of_name(peer) is peer
    assert isinstance(ipns.peer_id_of_name(ZERO_SEED_NAME), ID)


def test_the_js_ipns_package_accepts_our_records_and_refuses_a_tampered_one(me: Identity, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An independent implementation (the `ipns` package that Helia's resolver uses)."""
    import time

    from tests.helia import run_helia, run_helia_failing, skip_unless_helia

    skip_unless_helia()
    data = ipns.make_record(me, EMPTY_DIR, sequence=42, lifetime=DAY, ttl=60.0, now=time.time())
    path = tmp_path / "record.bin"
    path.write_bytes(data)
    for name in (ZERO_SEED_NAME, ZERO_SEED_PEER):
        checked = run_helia("ipns-validate.mjs", "--name", name, "--record", str(path))
        assert checked["value"] == EMPTY_DIR and checked["sequence"] == 42 and checked["ttl_ns"] == 60 * 10**9
    damaged = bytearray(data)
    damaged[-20] ^= 1  # inside the signed DAG-CBOR data, the record's last field
    path.write_bytes(bytes(damaged))
    assert run_helia_failing("ipns-validate.mjs", "--name", ZERO_SEED_NAME, "--record", str(path))
