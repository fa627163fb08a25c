"""CARv1: writing a registry DAG out of the embedded store, reading it back verified."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cid as py_cid
import pytest

from dllm_p2p.registry import car
from dllm_p2p.registry.car import CarInvalid, InvalidCid
from dllm_p2p.registry.ipfs import (
    CHUNK_SIZE,
    ContentCorrupt,
    ContentNotFound,
    ContentTooLarge,
    EmbeddedStore,
    IpfsError,
    _cid_of_block,
    _decode_node,
    _varint,
    cid_of_directory,
)

EMPTY_DIR = "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
EMPTY_DIR_MH = "122059948439065f29619ef41280cbb932be52c56d99c5966b65e0111239f098bbef"
LIMITS = {"max_blocks": 1000, "max_bytes": 64 * 1024 * 1024}


def registry(tmp_path: Path, size: int) -> tuple[EmbeddedStore, str]:
    """A registry-like folder holding ``blockchain.json`` of ``size`` bytes, added to a
    fresh embedded store; returns the store and the folder's CID."""
    folder = tmp_path / f"reg-{size}"
    folder.mkdir()
    pattern = b'{"index": 1, "kind": "join"}, '
    (folder / "blockchain.json").write_bytes((pattern * (size // len(pattern) + 1))[:size])
    store = EmbeddedStore(tmp_path / f"store-{size}")
    root = store.add_directory(folder)
    assert root == cid_of_directory(folder)
    return store, root


def preorder(store: EmbeddedStore, cid: str) -> list[str]:
    """Depth-first order, computed recursively and independently of car.dag_blocks."""
    out = [cid]
    for link in _decode_node(cid, store.get_block(cid)).links:
        out += [c for c in preorder(store, link.cid) if c not in out]
    return out


@pytest.mark.parametrize("size", [200, 3 * CHUNK_SIZE + 1000])
def test_registry_dag_round_trip(tmp_path: Path, size: int) -> None:
    store, root = registry(tmp_path, size)
    blocks = list(car.dag_blocks(store, root))
    stored = {path.name for path in store.blocks.iterdir()}
    assert {cid for cid, _ in blocks} == stored  # the store holds just this DAG
    assert len(blocks) == len(stored) == (2 if size < CHUNK_SIZE else 6)  # dir, file (+ 4 leaves)
    assert [cid for cid, _ in blocks] == preorder(store, root)

    data = car.write_car([root], blocks)
    roots, read = car.read_car(data, **LIMITS)
    assert roots == [root]
    assert read == blocks
    assert read[0][0] == root
    for cid, block in read:
        assert _cid_of_block(block) == cid

    frames = list(car.iter_car([root], iter(blocks)))
    assert len(frames) == 1 + len(blocks)
    assert b"".join(frames) == data


def test_large_file_leaves_come_in_order(tmp_path: Path) -> None:
    store, root = registry(tmp_path, 3 * CHUNK_SIZE + 1000)
    cids = [cid for cid, _ in car.dag_blocks(store, root)]
    directory = _decode_node(root, store.get_block(root))
    file_cid = directory.links[0].cid
    leaves = [link.cid for link in _decode_node(file_cid, store.get_block(file_cid)).links]
    assert len(leaves) == 4
    assert cids == [root, file_cid, *leaves]


def test_empty_directory_car_is_hand_checked(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "store")
    assert store.add({}) == EMPTY_DIR
    data = car.write_car([EMPTY_DIR], car.dag_blocks(store, EMPTY_DIR))
    header = (
        "a2"  # map, 2 pairs
        + "65" + b"roots".hex()  # "roots" (5 bytes) before "version" (7)
        + "81"  # array of 1
        + "d82a" + "5823" + "00" + EMPTY_DIR_MH  # tag 42, 35-byte string: 0x00 + CIDv0
        + "67" + b"version".hex() + "01"
    )
    assert len(bytes.fromhex(header)) == 0x38
    block = "0a020801"  # dag-pb Data = UnixFS {Type: Directory}
    assert data.hex() == "38" + header + "26" + EMPTY_DIR_MH + block
    assert car.read_car(data, **LIMITS) == ([EMPTY_DIR], [(EMPTY_DIR, bytes.fromhex(block))])


def test_flipped_byte_is_refused_naming_the_cid(tmp_path: Path) -> None:
    store, root = registry(tmp_path, 3 * CHUNK_SIZE + 1000)
    blocks = list(car.dag_blocks(store, root))
    data = bytearray(car.write_car([root], blocks))
    data[-10] ^= 0x01  # inside the last leaf
    last = blocks[-1][0]
    with pytest.raises(CarInvalid, match=f"block {last} does not hash to its CID"):
        car.read_car(bytes(data), **LIMITS)
    with pytest.raises(CarInvalid, match=f"block {last} does not hash"):
        car.write_car([root], [*blocks[:-1], (last, blocks[-1][1][:-1] + b"\0")])


def test_truncated_car_is_refused(tmp_path: Path) -> None:
    store, root = registry(tmp_path, 200)
    data = car.write_car([root], car.dag_blocks(store, root))
    with pytest.raises(CarInvalid, match="truncated CAR: the block at byte"):
        car.read_car(data[:-1], **LIMITS)
    with pytest.raises(CarInvalid, match="truncated CAR: the header needs"):
        car.read_car(data[:20], **LIMITS)
    with pytest.raises(CarInvalid, match="truncated"):
        car.read_car(b"", **LIMITS)
    header_len = data[0] + 1
    with pytest.raises(CarInvalid, match="truncated CAR: block length"):
        car.read_car(data[:header_len] + b"\x80", **LIMITS)
    # a cut between two blocks is still a CAR: nothing in the format counts blocks
    roots, blocks = car.read_car(data[: header_len + 1 + data[header_len]], **LIMITS)
    assert roots == [root] and [cid for cid, _ in blocks] == [root]


def test_malformed_cars_are_refused() -> None:
    good = car.write_car([EMPTY_DIR], [(EMPTY_DIR, bytes.fromhex("0a020801"))])
    header = good[1 : 1 + good[0]]
    cases = [
        (bytes.fromhex("0aa16776657273696f6e02"), "CARv2"),  # the CARv2 pragma
        (_varint(2) + b"\xa0\x00", "bytes after its CBOR map"),
        (_varint(1) + b"\xa0", "version None"),
        (_varint(1) + b"\x80", "not a CBOR map"),
        (_varint(1) + b"\xff", "not CBOR"),
        (b"\x00", "header is empty"),
        (good + b"\x00", "zero-length block section"),
        (good[: 1 + len(header)] + _varint(3) + b"\x01\x70\x12", "block at byte"),
        (_varint(0x20000) + b"\0" * 10, "above 65536"),
    ]
    for data, message in cases:
        with pytest.raises(CarInvalid, match=message):
            car.read_car(data, **LIMITS)


def test_non_sha256_blocks_are_refused() -> None:
    block = b"hello"
    sha512 = b"\x01\x55\x13\x40" + hashlib.sha512(block).digest()  # CIDv1 raw sha2-512
    header = car._header([EMPTY_DIR])
    data = _varint(len(header)) + header + _varint(len(sha512) + len(block)) + sha512 + block
    with pytest.raises(CarInvalid, match="multihash 0x13 is not supported"):
        car.read_car(data, **LIMITS)
    identity = b"\x01\x72\x00\x05" + block  # identity CIDs are for names, not blocks
    data = _varint(len(header)) + header + _varint(len(identity) + len(block)) + identity + block
    with pytest.raises(CarInvalid, match="only sha2-256 blocks are accepted"):
        car.read_car(data, **LIMITS)


def test_limits(tmp_path: Path) -> None:
    store, root = registry(tmp_path, 3 * CHUNK_SIZE + 1000)
    data = car.write_car([root], car.dag_blocks(store, root))
    with pytest.raises(ContentTooLarge, match="more than 5 blocks"):
        car.read_car(data, max_blocks=5, max_bytes=len(data))
    with pytest.raises(ContentTooLarge, match="above the limit"):
        car.read_car(data, max_blocks=6, max_bytes=len(data) - 1)
    assert len(car.read_car(data, max_blocks=6, max_bytes=len(data))[1]) == 6
    with pytest.raises(ContentTooLarge, match="more than 2 blocks"):
        list(car.dag_blocks(store, root, max_blocks=2))


def test_cidv1_roots_and_blocks(tmp_path: Path) -> None:
    store, root = registry(tmp_path, 200)
    v1 = py_cid.make_cid(root).to_v1().encode("base32").decode()
    assert v1.startswith("bafybei")
    blocks = [
        (py_cid.make_cid(cid).to_v1().encode("base32").decode(), block) for cid, block in car.dag_blocks(store, root)
    ]
    roots, read = car.read_car(car.write_car([v1], blocks), **LIMITS)
    assert roots == [v1] and read == blocks


def test_dag_blocks_visits_shared_blocks_once(tmp_path: Path) -> None:
    folder = tmp_path / "reg"
    (folder / "sub").mkdir(parents=True)
    for path in (folder / "a.json", folder / "b.json", folder / "sub" / "c.json"):
        path.write_bytes(b'{"same": true}\n')
    store = EmbeddedStore(tmp_path / "store")
    root = store.add_directory(folder)
    cids = [cid for cid, _ in car.dag_blocks(store, root)]
    assert len(cids) == len(set(cids)) == 3  # folder, the one file, sub
    assert cids == preorder(store, root)


def test_dag_blocks_missing_or_damaged(tmp_path: Path) -> None:
    store, root = registry(tmp_path, 3 * CHUNK_SIZE + 1000)
    cids = [cid for cid, _ in car.dag_blocks(store, root)]
    (store.blocks / cids[-1]).write_bytes(b"damaged")
    with pytest.raises(ContentCorrupt, match=cids[-1]):
        list(car.dag_blocks(store, root))
    (store.blocks / cids[-1]).unlink()
    with pytest.raises(ContentNotFound, match=cids[-1]):
        list(car.dag_blocks(store, root))


# --- CIDs -------------------------------------------------------------------------------


def test_cid_bytes_agree_with_py_cid() -> None:
    v0 = py_cid.make_cid(EMPTY_DIR)
    assert car.cid_to_bytes(EMPTY_DIR) == v0.buffer == bytes.fromhex(EMPTY_DIR_MH)
    assert car.cid_from_bytes(v0.buffer) == EMPTY_DIR
    mh = bytes.fromhex(EMPTY_DIR_MH)
    for codec, code, prefix in (("dag-pb", 0x70, "bafy"), ("raw", 0x55, "bafk"), ("libp2p-key", 0x72, "bafz")):
        v1 = py_cid.make_cid(1, codec, mh)
        text = v1.encode("base32").decode()
        assert text.startswith(prefix)
        assert car.cid_to_bytes(text) == v1.buffer == bytes([1, code]) + mh
        assert car.cid_from_bytes(v1.buffer) == text
        assert car.cid_to_bytes(v1.encode("base36").decode()) == v1.buffer


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Qm", "is not a CID"),
        ("zdj7WbTaiJT1fgatdet9Ei9iDB5hdCxkbVyhyh8YTUnXMiwYi", "is not a CID"),  # base58btc CIDv1
        ("BAFYBEICZSSCDSBS7FFQZ55ASQDF3SMV6KLCW3GOFSZVWLYARCI47BGF354", "is not a CID"),  # uppercase
        ("bafyreihdb57fdysx5h35urvxz64ros7zvywshber7id6t6c6fek37jgyfe", "codec 0x71 is not supported"),
        ("bciqftfeehedf6klbt32bfaglxezl4uwfnwm4lftlmxqbcerz6cmlx3y", "is not a CIDv1"),  # base32 CIDv0 bytes
    ],
)
def test_bad_cids_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidCid, match=message):
        car.cid_to_bytes(text)


def test_cid_from_bytes_refuses_trailing_or_truncated() -> None:
    raw = bytes.fromhex(EMPTY_DIR_MH)
    with pytest.raises(InvalidCid, match="follow the CID"):
        car.cid_from_bytes(raw + b"\0")
    with pytest.raises(InvalidCid, match="truncated"):
        car.cid_from_bytes(b"\x01\x70\x12\x20" + raw[2:10])


def test_errors_are_ipfs_errors() -> None:
    assert issubclass(CarInvalid, ContentCorrupt) and issubclass(InvalidCid, IpfsError)


def test_write_car_needs_a_root() -> None:
    with pytest.raises(ValueError, match="at least one root"):
        car.write_car([], [])
