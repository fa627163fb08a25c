"""The Helia harness itself (tests/helia/*.mjs), against JS-built fixtures and a second Helia node.

No Python IPFS code is involved: these prove that each script accepts good input and rejects
tampered input, so a later test that calls them against our nodes can trust a pass.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helia import helia_command, run_helia, run_helia_failing, skip_unless_helia

NAME = "blockchain.json"
# Above Helia's 1 MiB chunk size: a dag-pb file node over three raw leaves, inside a directory.
SIZE = 2_500_000


@pytest.fixture(scope="module", autouse=True)
def _need_helia() -> None:  # module scope: runs before the module fixtures that call node
    skip_unless_helia()


@pytest.fixture(scope="module")
def payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("helia") / "payload.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def cid_string(cid: bytes) -> str:
    """A binary CIDv1 in its default text form (multibase base32, lower case)."""
    return "b" + base64.b32encode(cid).decode().lower().rstrip("=")


def raw_cid(data: bytes) -> str:
    """CIDv1, raw codec, sha2-256 of ``data``."""
    return cid_string(b"\x01\x55\x12\x20" + hashlib.sha256(data).digest())


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def car_blocks(car: bytes) -> list[tuple[str, int, int]]:
    """(CID, offset of its bytes, length) of each block of a CARv1 whose CIDs are v1 sha2-256."""
    header_len, pos = _varint(car, 0)
    pos += header_len
    blocks = []
    while pos < len(car):
        section_len, pos = _varint(car, pos)
        end = pos + section_len
        cid_start = pos
        for _ in range(3):  # version, codec, multihash code
            _, pos = _varint(car, pos)
        digest_len, pos = _varint(car, pos)
        pos += digest_len
        blocks.append((cid_string(car[cid_start:pos]), pos, end - pos))
        pos = end
    return blocks


# -- car-verify.mjs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def car(payload: Path) -> tuple[Path, dict]:
    path = payload.with_suffix(".car")
    fixture = run_helia("make-fixture.mjs", "car", "--in", str(payload), "--out", str(path), "--name", NAME)
    return path, fixture


def test_car_verify_accepts_a_good_car_and_extracts_the_file(car: tuple[Path, dict], payload: Path) -> None:
    path, fixture = car
    result = run_helia("car-verify.mjs", str(path), "--root", fixture["root"], "--path", NAME)
    assert result["roots"] == [fixture["root"]]
    assert result["blocks"] == fixture["blocks"] == len(car_blocks(path.read_bytes())) >= 5
    assert result["file_cid"] == fixture["file_cid"]
    assert result["file_sha256"] == hashlib.sha256(payload.read_bytes()).hexdigest()
    assert result["file_bytes"] == SIZE


@pytest.mark.parametrize("which", [0, -1], ids=["root-block", "leaf-block"])
def test_car_verify_rejects_one_flipped_byte_naming_the_block(
    car: tuple[Path, dict], tmp_path: Path, which: int
) -> None:
    path, fixture = car
    data = bytearray(path.read_bytes())
    cid, offset, length = car_blocks(bytes(data))[which]
    data[offset + length // 2] ^= 0x01
    bad = tmp_path / "tampered.car"
    bad.write_bytes(data)
    err = run_helia_failing("car-verify.mjs", str(bad), "--root", fixture["root"])
    assert cid in err and "do not hash" in err, err


def test_car_verify_rejects_the_wrong_root(car: tuple[Path, dict]) -> None:
    path, fixture = car
    err = run_helia_failing("car-verify.mjs", str(path), "--root", fixture["file_cid"])
    assert "header roots" in err, err


# -- ipns-validate.mjs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def record(car: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("ipns") / "record.bin"
    value = f"/ipfs/{car[1]['root']}"
    fixture = run_helia("make-fixture.mjs", "ipns", "--value", value, "--seq", "7", "--out", str(path))
    assert fixture["name"].startswith("k51") and fixture["peer_id"].startswith("12D3KooW")
    return path, fixture


@pytest.mark.parametrize("form", ["name", "peer_id"])
def test_ipns_validate_accepts_the_record_under_either_name(record: tuple[Path, dict], form: str) -> None:
    path, fixture = record
    result = run_helia("ipns-validate.mjs", "--name", fixture[form], "--record", str(path))
    assert result["value"] == fixture["value"]
    assert result["sequence"] == 7
    assert result["validity"].endswith("Z") and result["ttl_ns"] > 0


# A V2-only record is signatureV2 (field 8, 64 bytes, from offset 2) then its DAG-CBOR data.
@pytest.mark.parametrize("offset", [10, -1], ids=["signature", "data"])
def test_ipns_validate_rejects_one_flipped_byte(record: tuple[Path, dict], tmp_path: Path, offset: int) -> None:
    path, fixture = record
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    bad = tmp_path / "tampered.bin"
    bad.write_bytes(data)
    err = run_helia_failing("ipns-validate.mjs", "--name", fixture["name"], "--record", str(bad))
    assert "not valid" in err, err


def test_ipns_validate_rejects_a_record_signed_by_another_key(record: tuple[Path, dict], tmp_path: Path) -> None:
    path, fixture = record
    other = tmp_path / "other.bin"
    run_helia("make-fixture.mjs", "ipns", "--value", fixture["value"], "--out", str(other), "--v1-compatible")
    err = run_helia_failing("ipns-validate.mjs", "--name", fixture["name"], "--record", str(other))
    assert "not valid" in err, err


# -- fetch.mjs against serve.mjs ------------------------------------------------------------


def read_json_line(proc: subprocess.Popen[bytes], timeout: float) -> dict:
    """The first line ``proc`` writes on stdout, parsed; AssertionError after ``timeout`` s."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line from {proc.args} within {timeout}s (got {buf!r})")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"{proc.args} exited (code {proc.wait()}) before its line: {buf!r}")
        buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


@pytest.fixture(scope="module")
def served(payload: Path) -> Iterator[dict]:
    """serve.mjs holding ``payload`` as ROOT/blockchain.json; its JSON line."""
    proc = subprocess.Popen(
        helia_command("serve.mjs", "--in", str(payload), "--name", NAME, "--port", "0"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        info = read_json_line(proc, timeout=30)
        assert info["ok"] and info["bytes"] == SIZE, info
        yield info
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # serve.mjs exits when its stdin closes
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_fetch_gets_identical_bytes_from_another_helia_node(served: dict, payload: Path, tmp_path: Path) -> None:
    out = tmp_path / NAME
    result = run_helia(
        "fetch.mjs", "--peer", served["multiaddr"], "--cid", served["root"], "--path", NAME,
        "--out", str(out), "--timeout", "20", timeout=30,
    )
    assert out.read_bytes() == payload.read_bytes()
    assert result["bytes"] == SIZE


def test_fetch_raw_block_gets_the_block_whose_hash_is_its_cid(served: dict, tmp_path: Path) -> None:
    out = tmp_path / "block"
    result = run_helia(
        "fetch.mjs", "--peer", served["multiaddr"], "--cid", served["cid"], "--raw-block",
        "--out", str(out), "--timeout", "20", timeout=30,
    )
    block = out.read_bytes()
    assert result["bytes"] == len(block) > 0
    cid = base64.b32decode(served["cid"][1:].upper() + "=" * (-(len(served["cid"]) - 1) % 8))
    assert cid[:2] == b"\x01\x70" and cid[4:] == hashlib.sha256(block).digest()  # dag-pb file node


def test_fetch_times_out_cleanly_when_the_peer_lacks_the_cid(served: dict, tmp_path: Path) -> None:
    missing = raw_cid(b"served by nobody")
    started = time.monotonic()
    err = run_helia_failing(
        "fetch.mjs", "--peer", served["multiaddr"], "--cid", missing, "--out", str(tmp_path / "x"),
        "--timeout", "3", timeout=20,
    )
    elapsed = time.monotonic() - started
    assert "timed out after 3s" in err and missing in err, err
    assert 3 <= elapsed < 10, elapsed
