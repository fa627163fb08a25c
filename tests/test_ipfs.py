"""IPFS layer: Kubo's own CIDs, the embedded block store, the Kubo RPC client."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dllm_p2p.registry import ipfs
from dllm_p2p.registry.ipfs import (
    ContentCorrupt,
    ContentError,
    ContentNotFound,
    ContentTooLarge,
    EmbeddedStore,
    IpfsError,
    IpfsUnavailable,
    KuboClient,
    KuboError,
)
from tests.kubo_standin import KuboStandin, running_kubo_standin

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "ipfs-vectors"
needs_vectors = pytest.mark.skipif(
    not VECTORS.is_dir(), reason=f"Kubo reference vectors not found at {VECTORS} (the repo's sibling ../shared)"
)

REGISTRY = b'{"blocks": [], "version": 1}\n'


@pytest.fixture
def kubo() -> Iterator[KuboStandin]:
    """A stand-in Kubo RPC server on 127.0.0.1; ``kubo.url`` is its API base URL."""
    with running_kubo_standin() as node:
        yield node


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    folder = tmp_path / "reg"
    folder.mkdir()
    (folder / "blockchain.json").write_bytes(REGISTRY)
    return folder


def deterministic_bytes(size: int, seed: str) -> bytes:
    """Kubo's test data (test/cli/testutils/random_deterministic.go): the ChaCha20
    keystream under key sha256(seed), zero nonce, counter 0."""
    ciphers = pytest.importorskip("cryptography.hazmat.primitives.ciphers")
    key = hashlib.sha256(seed.encode()).digest()
    encryptor = ciphers.Cipher(ciphers.algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return encryptor.update(bytes(size))


# --- content addressing: Kubo's answers -------------------------------------------------


@needs_vectors
@pytest.mark.parametrize(
    ("name", "cid"),
    [
        ("a.json", "QmPmgMwMdNnt4ujECmfCvwY9K4heH1qLnMeaLW7XDqxtxH"),
        ("empty.json", "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"),
        ("big.json", "QmYTdrnRboX1BSHvGqAH1YsyubqNaJk11nGjGHQfZ9GEgJ"),  # two chunks
    ],
)
def test_file_cids_match_kubo(name: str, cid: str) -> None:
    path = VECTORS / name
    assert ipfs.cid_of_file(path) == cid
    assert ipfs.cid_of_bytes(path.read_bytes()) == cid


@needs_vectors
def test_folder_cid_matches_kubo() -> None:
    assert ipfs.cid_of_directory(VECTORS / "reg") == "QmR24PhDuDZWzxKT7ZkS1rZRSQrwsTo3cxEhchyMMJng64"
    # `ipfs add -w blockchain.json` builds the same folder.
    data = (VECTORS / "reg" / "blockchain.json").read_bytes()
    assert ipfs.cid_of_wrapped_file("blockchain.json", data) == "QmR24PhDuDZWzxKT7ZkS1rZRSQrwsTo3cxEhchyMMJng64"


# Vectors from Kubo's test/cli/cid_profiles_test.go (profile unixfs-v0-2015, the default).


def test_small_and_chunk_boundary_cids_match_kubo() -> None:
    assert ipfs.cid_of_bytes(b"hello world") == "Qmf412jQZiuVUtdgnB36FXFX7xg5V6KEbSJ4dpQuhkLyfD"
    data = deterministic_bytes(ipfs.CHUNK_SIZE + 1, "chunk-v0-seed")
    assert ipfs.cid_of_bytes(data[:-1]) == "QmWmRj3dFDZdb6ABvbmKhEL6TmPbAfBZ1t5BxsEyJrcZhE"  # one leaf
    assert ipfs.cid_of_bytes(data) == "QmYyLxtzZyW22zpoVAtKANLRHpDjZtNeDjQdJrcQNWoRkJ"  # root + 2 leaves


def test_balanced_layout_across_max_links_matches_kubo() -> None:
    # 174 chunks fill one level; one more byte forces a second level (~45 MB, ~1 s).
    data = deterministic_bytes(ipfs.MAX_LINKS * ipfs.CHUNK_SIZE + 1, "v0-seed")
    assert ipfs.cid_of_bytes(data[:-1]) == "QmUbBALi174SnogsUzLpYbD4xPiBSFANF4iztWCsHbMKh2"
    assert ipfs.cid_of_bytes(data) == "QmV81WL765sC8DXsRhE5fJv2rwhS4icHRaf3J9Zk5FdRnW"


def _hamt_test_names(count: int, length: int) -> list[str]:
    """File names of Kubo's HAMT threshold test (createDeterministicFiles in add_test.go)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz01234567890-_"
    stream = deterministic_bytes(1 << 20, "hamt-unixfs-v0-2015")
    return ["".join(alphabet[b % len(alphabet)] for b in stream[i * length : (i + 1) * length]) for i in range(count)]


def test_folder_at_sharding_threshold_matches_kubo_and_beyond_is_refused() -> None:
    # 4096 names of 30 chars: exactly 256 KiB by Kubo's estimate, still a basic folder.
    at_threshold = {name: b"x" for name in _hamt_test_names(4096, 30)}
    assert ipfs.build_dag(at_threshold).cid == "QmX5GtRk3TSSEHtdrykgqm4eqMEn3n2XhfkFAis5fjyZmN"
    # One byte over, Kubo builds a HAMT shard; we refuse rather than give another CID.
    with pytest.raises(ContentError, match="HAMT"):
        ipfs.build_dag({name: b"x" for name in _hamt_test_names(4033, 31)})


def test_empty_folder_and_hidden_files(tmp_path: Path) -> None:
    assert ipfs.cid_of_directory(tmp_path) == "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
    (tmp_path / "blockchain.json").write_bytes(REGISTRY)
    plain = ipfs.cid_of_directory(tmp_path)
    # A leftover temp file from an atomic write is skipped, as `ipfs add -r` skips it.
    (tmp_path / ".blockchain.json.x1y2.tmp").write_bytes(b"partial")
    assert ipfs.cid_of_directory(tmp_path) == plain
    assert ipfs.cid_of_directory(tmp_path, hidden=True) != plain


def test_folder_links_are_sorted_by_name_and_nest(tmp_path: Path) -> None:
    tree = {"b.json": b"2", "a.json": b"1", "sub": {"z": b"", "y": {"deep.txt": b"deep"}}}
    (tmp_path / "sub" / "y").mkdir(parents=True)
    for rel, data in [("b.json", b"2"), ("a.json", b"1"), ("sub/z", b""), ("sub/y/deep.txt", b"deep")]:
        (tmp_path / rel).write_bytes(data)
    assert ipfs.build_dag(tree).cid == ipfs.cid_of_directory(tmp_path)
    blocks: dict[str, bytes] = {}
    root = ipfs.build_dag(tree, sink=blocks.__setitem__)
    assert ipfs.cat_dag(f"{root.cid}/sub/y/deep.txt", blocks.__getitem__) == b"deep"
    # dag_size (Kubo's `add` "Size", a parent link's Tsize) counts every block below;
    # no block repeats in this tree, so that is all of them once.
    assert root.dag_size == sum(len(block) for block in blocks.values())


def test_deep_balanced_tree_with_small_parameters() -> None:
    """With 1-byte chunks and 3 links per node, 10 bytes need depth 3: the layout must
    be full subtrees, left to right, exactly as boxo's balanced builder makes them."""
    data = bytes(range(10))
    blocks: dict[str, bytes] = {}
    root = ipfs.build_dag(data, sink=blocks.__setitem__, chunk_size=1, max_links=3)
    assert root.file_size == 10
    assert ipfs.cat_dag(root.cid, blocks.__getitem__) == data

    def shape(cid: str) -> object:
        node = ipfs._decode_node(cid, blocks[cid])
        return [shape(link.cid) for link in node.links] if node.links else len(node.data)

    assert shape(root.cid) == [[[1, 1, 1], [1, 1, 1], [1, 1, 1]], [[1]]]
    assert ipfs.cid_of_bytes(data[:9], chunk_size=1, max_links=3) != ipfs.cid_of_bytes(data[:9])


def test_cids_are_validated() -> None:
    assert ipfs.is_cid("QmR24PhDuDZWzxKT7ZkS1rZRSQrwsTo3cxEhchyMMJng64")
    assert not ipfs.is_cid("QmR24PhDuDZWzxKT7ZkS1rZRSQrwsTo3cxEhchyMMJng6")  # short
    assert not ipfs.is_cid("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi")  # v1
    with pytest.raises(ContentError):
        ipfs.parse_ipfs_path("/ipfs/not-a-cid/blockchain.json")
    assert ipfs.parse_ipfs_path("/ipfs/QmR24PhDuDZWzxKT7ZkS1rZRSQrwsTo3cxEhchyMMJng64/blockchain.json") == (
        "QmR24PhDuDZWzxKT7ZkS1rZRSQrwsTo3cxEhchyMMJng64",
        ["blockchain.json"],
    )


# --- embedded store ---------------------------------------------------------------------


def test_store_round_trip(tmp_path: Path, reg: Path) -> None:
    store = EmbeddedStore(tmp_path / "ipfs")
    cid = store.add_directory(reg)
    assert cid == ipfs.cid_of_directory(reg)
    assert store.has(cid)
    assert store.get_file(f"{cid}/blockchain.json") == REGISTRY
    assert store.get_file(f"/ipfs/{cid}/blockchain.json") == REGISTRY
    with pytest.raises(ContentError, match="not a file"):
        store.get_file(cid)  # the folder itself
    with pytest.raises(ContentNotFound, match="no link named"):
        store.get_file(f"{cid}/missing.json")
    # Every block is a complete file named by its CID; no temp files are left behind.
    assert sorted(p.name for p in store.blocks.iterdir()) == sorted(
        [cid, ipfs.cid_of_bytes(REGISTRY)]
    )


def test_store_multi_chunk_file(tmp_path: Path) -> None:
    data = deterministic_bytes(2 * ipfs.CHUNK_SIZE + 100, "store")
    store = EmbeddedStore(tmp_path)
    cid = store.add_bytes(data)
    assert cid == ipfs.cid_of_bytes(data)
    assert len(list(store.blocks.iterdir())) == 4  # root + 3 leaves
    assert store.get_file(cid) == data


def test_store_detects_tampering_and_missing_blocks(tmp_path: Path, reg: Path) -> None:
    store = EmbeddedStore(tmp_path / "ipfs")
    cid = store.add_directory(reg)
    leaf = store.blocks / ipfs.cid_of_bytes(REGISTRY)
    block = leaf.read_bytes()
    leaf.write_bytes(block.replace(b"blocks", b"blockz"))
    with pytest.raises(ContentCorrupt, match="does not hash"):
        store.get_file(f"{cid}/blockchain.json")
    leaf.unlink()
    with pytest.raises(ContentNotFound):
        store.get_file(f"{cid}/blockchain.json")
    with pytest.raises(ContentCorrupt):
        store.put_block(cid, block)  # right bytes, wrong name


def test_store_refuses_large_files(tmp_path: Path) -> None:
    big = tmp_path / "reg"
    big.mkdir()
    (big / "blockchain.json").write_bytes(b"x" * 2048)
    small = EmbeddedStore(tmp_path / "small", max_bytes=1024)
    with pytest.raises(ContentTooLarge):
        small.add_directory(big)
    cid = EmbeddedStore(tmp_path / "small", max_bytes=4096).add_directory(big)
    with pytest.raises(ContentTooLarge, match="2048 bytes"):
        small.get_file(f"{cid}/blockchain.json")  # refused from the declared size, before reading


# --- Kubo client against the stand-in ---------------------------------------------------


async def test_version_and_availability(kubo: KuboStandin) -> None:
    async with KuboClient(kubo.url) as client:
        assert await client.version() == "0.39.0"
        assert await client.is_available()
    assert ("POST", "/api/v0/version") in kubo.requests


async def test_add_folder_gives_the_embedded_cid_and_cat_reads_it(kubo: KuboStandin, reg: Path) -> None:
    (reg / "with space.txt").write_bytes(b"escaped as with+space.txt")  # Go's QueryEscape
    (reg / "sub").mkdir()
    (reg / "sub" / "notes.md").write_bytes(b"# notes\n")
    async with KuboClient(kubo.url) as client:
        cid = await client.add_directory(reg)
        assert cid == ipfs.cid_of_directory(reg)
        assert cid in kubo.pins
        assert await client.cat(f"{cid}/blockchain.json") == REGISTRY
        assert await client.cat(f"/ipfs/{cid}/sub/notes.md") == b"# notes\n"
        assert await client.cat(f"{cid}/with space.txt") == b"escaped as with+space.txt"
        wrapped = await client.add_bytes(REGISTRY, wrap=True, pin=False)
        assert wrapped == ipfs.cid_of_wrapped_file("blockchain.json", REGISTRY)
        assert wrapped not in kubo.pins
        assert await client.add_bytes(REGISTRY) == ipfs.cid_of_bytes(REGISTRY)
        assert await client.pin_add(wrapped) == [wrapped]


async def test_add_response_lines_follow_kubo(kubo: KuboStandin, reg: Path) -> None:
    """The raw answer: one JSON object per line, files first, then the folder."""
    files = [
        ("file", ("reg", b"", "application/x-directory")),
        ("file", ("reg%2Fblockchain.json", REGISTRY, "application/octet-stream")),
    ]
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{kubo.url}/api/v0/add", params={"cid-version": 0}, files=files)
    assert response.status_code == 200
    lines = [httpx.Response(200, content=line).json() for line in response.text.splitlines()]
    assert [line["Name"] for line in lines] == ["reg/blockchain.json", "reg"]
    assert lines[1]["Hash"] == ipfs.cid_of_directory(reg)
    assert lines[0]["Size"] == str(ipfs.build_dag(REGISTRY).dag_size)


async def test_publish_and_resolve(kubo: KuboStandin, reg: Path) -> None:
    async with KuboClient(kubo.url) as client:
        cid = await client.add_directory(reg)
        key = await client.key_gen("dllm-registry")
        assert key.name == "dllm-registry" and key.id.startswith("k51")
        assert key in await client.key_list()
        name = await client.name_publish(cid, key="dllm-registry")
        assert name == key.id
        assert await client.name_resolve(name) == f"/ipfs/{cid}"
        assert await client.name_resolve(f"/ipns/{name}") == f"/ipfs/{cid}"
        with pytest.raises(KuboError, match="already exists"):
            await client.key_gen("dllm-registry")


async def test_kubo_errors_carry_the_message(kubo: KuboStandin) -> None:
    unknown = ipfs.cid_of_bytes(b"never added")
    async with KuboClient(kubo.url) as client:
        with pytest.raises(KuboError, match=f"could not find {unknown}") as info:
            await client.cat(f"{unknown}/blockchain.json")
        assert info.value.status == 500 and info.value.code == 0
        with pytest.raises(KuboError, match="could not resolve name"):
            await client.name_resolve("/ipns/k51qzi5uqu5dunknown")
        with pytest.raises(KuboError, match="no key by the given name"):
            await client.name_publish(unknown, key="nobody")


async def test_standin_speaks_post_only(kubo: KuboStandin) -> None:
    async with httpx.AsyncClient() as http:
        get = await http.get(f"{kubo.url}/api/v0/version")
        missing = await http.post(f"{kubo.url}/api/v0/no/such/command")
        bad = await http.post(f"{kubo.url}/api/v0/cat")
    assert get.status_code == 405
    assert missing.status_code == 404
    assert bad.status_code == 400
    assert bad.json() == {"Message": 'argument "ipfs-path" is required', "Code": 1, "Type": "error"}


async def test_unreachable_daemon_raises_ipfs_unavailable() -> None:
    # A bound but non-listening socket: connections to it are refused, and the port
    # cannot be taken by anything else while the test runs.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with KuboClient(url) as client:
            assert not await client.is_available()
            with pytest.raises(IpfsUnavailable):
                await client.version()
            with pytest.raises(IpfsUnavailable):
                await client.cat("QmR24PhDuDZWzxKT7ZkS1rZRSQrwsTo3cxEhchyMMJng64/blockchain.json")
    assert issubclass(IpfsUnavailable, IpfsError) and issubclass(KuboError, IpfsError)


async def test_cat_refuses_oversized_content(kubo: KuboStandin) -> None:
    async with KuboClient(kubo.url) as client:
        cid = await client.add_bytes(b"0123456789")
    async with KuboClient(kubo.url, max_bytes=8) as client:
        with pytest.raises(ContentTooLarge):
            await client.add_bytes(b"0123456789")
        with pytest.raises(ContentTooLarge):
            await client.cat(cid)
        assert await client.cat(cid, max_bytes=10) == b"0123456789"


# --- resolve_source ---------------------------------------------------------------------


async def test_resolve_source_local_and_embedded(tmp_path: Path, reg: Path) -> None:
    assert await ipfs.resolve_source(str(reg / "blockchain.json")) == REGISTRY
    assert await ipfs.resolve_source(str(reg)) == REGISTRY
    store = EmbeddedStore(tmp_path / "ipfs")
    cid = store.add_directory(reg)
    assert await ipfs.resolve_source(cid, store=store) == REGISTRY
    assert await ipfs.resolve_source(f"/ipfs/{cid}", store=store) == REGISTRY
    assert await ipfs.resolve_source(f"/ipfs/{cid}/blockchain.json", store=store) == REGISTRY
    with pytest.raises(ContentNotFound):
        await ipfs.resolve_source(ipfs.cid_of_bytes(b"elsewhere"), store=store)
    with pytest.raises(IpfsUnavailable, match="needs a Kubo"):
        await ipfs.resolve_source("/ipns/k51qzi5uqu5dexample", store=store)
    with pytest.raises(ContentNotFound):
        await ipfs.resolve_source(str(tmp_path / "nowhere.json"))


async def test_resolve_source_through_kubo(kubo: KuboStandin, tmp_path: Path, reg: Path) -> None:
    store = EmbeddedStore(tmp_path / "ipfs")  # empty: everything must come from Kubo
    async with KuboClient(kubo.url) as client:
        cid = await client.add_directory(reg)
        name = await client.name_publish(cid)
        assert await ipfs.resolve_source(cid, kubo=client, store=store) == REGISTRY
        assert await ipfs.resolve_source(f"/ipns/{name}", kubo=client, store=store) == REGISTRY
