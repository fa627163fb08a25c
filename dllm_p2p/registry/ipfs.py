"""IPFS for the registry: Kubo's content addresses in pure Python, a block store, a Kubo client.

The registry folder (``blockchain.json``) is published on IPFS. Three pieces make that work
whether or not the machine runs a Kubo daemon:

* **Content addressing** (:func:`build_dag`, :func:`cid_of_bytes`, :func:`cid_of_directory`)
  computes exactly the CIDs ``ipfs add`` computes with Kubo's defaults: CIDv0, dag-pb
  nodes, UnixFS leaves (no raw leaves), 256 KiB fixed-size chunks, balanced layout with
  at most 174 links per node, basic (unsharded) directories. The same CID from every
  peer is what lets a node without a daemon vouch for, or fetch, what Kubo serves.
* :class:`EmbeddedStore` keeps those blocks on disk, one file per block, so a node with
  no daemon can still serve and verify a registry by CID.
* :class:`KuboClient` talks to a daemon over its RPC API (``POST /api/v0/<command>``).

:func:`resolve_source` ties them together: it turns whatever names a registry (a path,
``/ipfs/<cid>``, a bare CID, ``/ipns/<name>``) into the bytes of ``blockchain.json``.

The protobuf encoding is written by hand: dag-pb and UnixFS need four message types and
two wire types, and canonical dag-pb (links before data, fixed field order) is easier to
guarantee by writing the bytes than by coaxing a generic encoder.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol, Union
from urllib.parse import quote_plus

import httpx
import trio

from dllm_p2p.fsutil import write_atomic

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_API_URL",
    "DEFAULT_MAX_BYTES",
    "MAX_LINKS",
    "REGISTRY_FILENAME",
    "BlockNetwork",
    "BlockSink",
    "BlockSource",
    "ContentCorrupt",
    "ContentError",
    "ContentNotFound",
    "ContentTooLarge",
    "DagNode",
    "EmbeddedStore",
    "IpfsError",
    "IpfsUnavailable",
    "KuboClient",
    "KuboError",
    "KuboKey",
    "build_dag",
    "build_directory",
    "cat_dag",
    "cid_of_bytes",
    "cid_of_directory",
    "cid_of_file",
    "cid_of_wrapped_file",
    "is_cid",
    "parse_ipfs_path",
    "resolve_source",
    "scan_directory",
]

#: Kubo's default chunker, ``size-262144``.
CHUNK_SIZE = 262_144
#: Kubo's default ``Import.UnixFSFileMaxLinks`` (boxo's ``DefaultLinksPerBlock``).
MAX_LINKS = 174
#: Above this estimate Kubo turns a directory into a HAMT shard, which we do not build.
HAMT_THRESHOLD = 262_144
#: Largest file we store, read or fetch: a registry is kilobytes, so this only stops abuse.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: Largest block we read back from disk; Kubo refuses to transfer blocks above 2 MiB.
MAX_BLOCK_BYTES = 2 * 1024 * 1024
DEFAULT_API_URL = "http://127.0.0.1:5001"
REGISTRY_FILENAME = "blockchain.json"


# --- errors -----------------------------------------------------------------------------


class IpfsError(Exception):
    """Base class of everything this module raises on purpose."""


class IpfsUnavailable(IpfsError):
    """No IPFS daemon answered (refused, timed out, or the connection broke)."""


class KuboError(IpfsError):
    """Kubo answered, with an error: ``status`` is the HTTP status, ``code`` Kubo's own."""

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ContentError(IpfsError):
    """Content cannot be served as asked: bad path, missing, too large or corrupt."""


class ContentNotFound(ContentError):
    """A block, a name inside a folder, or a local file is not there."""


class ContentTooLarge(ContentError):
    """A file (or block) exceeds the configured limit; nothing was read past the limit."""


class ContentCorrupt(ContentError):
    """A block does not hash to its CID, or does not decode as dag-pb/UnixFS."""


# --- CIDv0 ------------------------------------------------------------------------------

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_CIDV0_RE = re.compile(r"Qm[1-9A-HJ-NP-Za-km-z]{44}")
_SHA2_256_PREFIX = b"\x12\x20"  # multihash: code 0x12 (sha2-256), length 32


@cache
def _digit_values(alphabet: str) -> dict[str, int]:
    return {c: i for i, c in enumerate(alphabet)}


def _base_encode(raw: bytes, alphabet: str) -> str:
    """Big-endian base-``len(alphabet)`` digits, each leading zero byte as the zero digit
    (base58btc, multibase base36)."""
    number = int.from_bytes(raw, "big")
    digits = []
    while number:
        number, rem = divmod(number, len(alphabet))
        digits.append(alphabet[rem])
    zeros = len(raw) - len(raw.lstrip(b"\0"))
    return alphabet[0] * zeros + "".join(reversed(digits))


def _base_decode(text: str, alphabet: str) -> bytes:
    """The inverse of :func:`_base_encode`; ValueError for a character not in ``alphabet``."""
    values = _digit_values(alphabet)
    number = 0
    for char in text:
        if char not in values:
            raise ValueError(f"not base{len(alphabet)}")
        number = number * len(alphabet) + values[char]
    zeros = len(text) - len(text.lstrip(alphabet[0]))
    return b"\0" * zeros + number.to_bytes((number.bit_length() + 7) // 8, "big")


def _b58encode(raw: bytes) -> str:
    return _base_encode(raw, _B58_ALPHABET)


def _b58decode(text: str) -> bytes:
    return _base_decode(text, _B58_ALPHABET)


def _cid_of_block(block: bytes) -> str:
    return _b58encode(_SHA2_256_PREFIX + hashlib.sha256(block).digest())


def is_cid(text: str) -> bool:
    """True for a CIDv0 (``Qm...``, base58btc sha2-256 multihash), the only kind we make."""
    if not _CIDV0_RE.fullmatch(text):
        return False
    raw = _b58decode(text)
    return len(raw) == 34 and raw.startswith(_SHA2_256_PREFIX)


def parse_ipfs_path(ref: str) -> tuple[str, list[str]]:
    """Split ``/ipfs/<cid>/a/b``, ``<cid>/a/b`` or ``<cid>`` into the CID and the names below it."""
    text = ref.strip()
    if text.startswith("/ipfs/"):
        text = text[len("/ipfs/") :]
    elif text.startswith("ipfs/"):
        text = text[len("ipfs/") :]
    cid, *names = text.split("/")
    names = [name for name in names if name]  # tolerate "<cid>/" and doubled slashes
    if not is_cid(cid):
        raise ContentError(f"{ref!r} does not start with a CIDv0 (Qm...)")
    if any(name in (".", "..") for name in names):
        raise ContentError(f"{ref!r}: '.' and '..' are not allowed in IPFS paths")
    return cid, names


# --- protobuf, by hand -------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) for varint and length-delimited fields; refuse the rest."""
    pos, end = 0, len(buf)

    def read_varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ContentCorrupt("truncated or overlong protobuf varint")
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < end:
        key = read_varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            yield number, read_varint()
        elif wire_type == 2:
            length = read_varint()
            if pos + length > end:
                raise ContentCorrupt("protobuf field runs past the end of the block")
            yield number, buf[pos : pos + length]
            pos += length
        else:
            raise ContentCorrupt(f"unexpected protobuf wire type {wire_type}")


# UnixFS Data.DataType values (unixfs.proto).
_RAW, _DIRECTORY, _FILE, _METADATA, _SYMLINK, _HAMT_SHARD = range(6)


@dataclass(frozen=True)
class _Link:
    cid: str
    name: str
    tsize: int


@dataclass
class _Node:
    """A decoded dag-pb node with its UnixFS payload."""

    links: list[_Link] = field(default_factory=list)
    kind: int = -1
    data: bytes = b""
    filesize: int | None = None
    blocksizes: list[int] = field(default_factory=list)


def _encode_unixfs(
    kind: int, *, data: bytes | None = None, filesize: int | None = None, blocksizes: list[int] | None = None
) -> bytes:
    """UnixFS ``Data`` message; fields in number order, absent ones omitted like Go's proto2."""
    out = _int_field(1, kind)
    if data:  # Kubo leaves it out for an empty file, rather than writing zero bytes
        out += _len_field(2, data)
    if filesize is not None:
        out += _int_field(3, filesize)
    for size in blocksizes or ():  # repeated uint64, not packed (proto2)
        out += _int_field(4, size)
    return out


def _encode_node(links: list[_Link], data: bytes) -> bytes:
    """Canonical dag-pb: every link (Hash, Name, Tsize, all present) first, then Data."""
    out = b""
    for link in links:
        body = (
            _len_field(1, _b58decode(link.cid))
            + _len_field(2, link.name.encode())
            + _int_field(3, link.tsize)
        )
        out += _len_field(2, body)
    return out + _len_field(1, data)


def _decode_node(cid: str, block: bytes) -> _Node:
    if _cid_of_block(block) != cid:
        raise ContentCorrupt(f"block {cid} does not hash to its CID")
    node = _Node()
    unixfs = None
    for number, value in _fields(block):
        if number == 2 and isinstance(value, bytes):
            link = {1: b"", 2: b"", 3: 0}
            for n, v in _fields(value):
                link[n] = v
            hash_, name, tsize = link[1], link[2], link[3]
            if not (isinstance(hash_, bytes) and isinstance(name, bytes) and isinstance(tsize, int)):
                raise ContentCorrupt(f"block {cid} has a malformed link")
            if len(hash_) != 34 or not hash_.startswith(_SHA2_256_PREFIX):
                raise ContentCorrupt(f"block {cid} links to something other than a CIDv0")
            node.links.append(_Link(_b58encode(hash_), name.decode("utf-8", "replace"), tsize))
        elif number == 1 and isinstance(value, bytes):
            unixfs = value
    if unixfs is None:
        raise ContentCorrupt(f"block {cid} carries no UnixFS data")
    for number, value in _fields(unixfs):
        if number == 1 and isinstance(value, int):
            node.kind = value
        elif number == 2 and isinstance(value, bytes):
            node.data = value
        elif number == 3 and isinstance(value, int):
            node.filesize = value
        elif number == 4 and isinstance(value, int):
            node.blocksizes.append(value)
    return node


# --- building DAGs (what `ipfs add` does) -----------------------------------------------

#: Called with (cid, block) for every block built, children before parents.
BlockSink = Callable[[str, bytes], None]
#: Returns the block stored under a CID, or raises ContentNotFound.
BlockSource = Callable[[str], bytes]
#: What can be added: file content (bytes), a file on disk (Path), or a folder (a mapping
#: of entry names to more of the same).
Entry = Union[bytes, Path, Mapping[str, "Entry"]]


@dataclass(frozen=True)
class DagNode:
    """The root of something just added."""

    cid: str
    #: The block itself plus everything it links to: the ``Tsize`` a parent link records,
    #: and the ``Size`` Kubo's ``add`` reports.
    dag_size: int
    #: Bytes of file content below this node (0 for a folder).
    file_size: int


class _Chunks:
    """Fixed-size chunks of a stream with one chunk of look-ahead, i.e. Kubo's ``Done()``."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self._size = size
        self._next = stream.read(size)

    @property
    def done(self) -> bool:
        return not self._next

    def take(self) -> bytes:
        chunk, self._next = self._next, self._stream.read(self._size)
        return chunk


class _Builder:
    def __init__(self, sink: BlockSink | None, chunk_size: int, max_links: int) -> None:
        if chunk_size < 1 or max_links < 2:
            raise ValueError("chunk_size must be >= 1 and max_links >= 2")
        self.sink = sink
        self.chunk_size = chunk_size
        self.max_links = max_links

    def emit(self, links: list[_Link], unixfs: bytes, file_size: int) -> DagNode:
        block = _encode_node(links, unixfs)
        cid = _cid_of_block(block)
        if self.sink is not None:
            self.sink(cid, block)
        return DagNode(cid, len(block) + sum(link.tsize for link in links), file_size)

    def entry(self, entry: Entry) -> DagNode:
        if isinstance(entry, bytes):
            return self.file(io.BytesIO(entry))
        if isinstance(entry, Path):
            with entry.open("rb") as stream:
                return self.file(stream)
        return self.directory({name: self.entry(child) for name, child in entry.items()})

    def file(self, stream: BinaryIO) -> DagNode:
        """boxo's balanced layout: grow a complete tree one level at a time, left to right.

        A one-chunk file is its leaf. Each time the tree is full, the old root becomes the
        first child of a new root one level higher, and the new root is filled with
        complete subtrees of the old root's depth until the data runs out.
        """
        chunks = _Chunks(stream, self.chunk_size)
        if chunks.done:
            return self.leaf(b"")
        root = self.leaf(chunks.take())
        depth = 1
        while not chunks.done:
            root = self.fill(chunks, [root], depth)
            depth += 1
        return root

    def fill(self, chunks: _Chunks, children: list[DagNode], depth: int) -> DagNode:
        while len(children) < self.max_links and not chunks.done:
            if depth == 1:
                children.append(self.leaf(chunks.take()))
            else:
                children.append(self.fill(chunks, [], depth - 1))
        sizes = [child.file_size for child in children]
        unixfs = _encode_unixfs(_FILE, filesize=sum(sizes), blocksizes=sizes)
        return self.emit([_Link(child.cid, "", child.dag_size) for child in children], unixfs, sum(sizes))

    def leaf(self, chunk: bytes) -> DagNode:
        return self.emit([], _encode_unixfs(_FILE, data=chunk, filesize=len(chunk)), len(chunk))

    def directory(self, entries: Mapping[str, DagNode]) -> DagNode:
        for name in entries:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"{name!r} is not a valid name inside a folder")
        # boxo's "links" estimate: name bytes + CID bytes per entry, sharded when above.
        if sum(len(name.encode()) + 34 for name in entries) > HAMT_THRESHOLD:
            raise ContentError(
                "folder too large: Kubo would store it as a HAMT shard, which is not implemented here"
            )
        ordered = sorted(entries.items(), key=lambda item: item[0].encode())
        links = [_Link(node.cid, name, node.dag_size) for name, node in ordered]
        return self.emit(links, _encode_unixfs(_DIRECTORY), 0)


def build_dag(
    entry: Entry,
    *,
    sink: BlockSink | None = None,
    chunk_size: int = CHUNK_SIZE,
    max_links: int = MAX_LINKS,
) -> DagNode:
    """Build the UnixFS DAG of ``entry`` the way ``ipfs add`` would, feeding blocks to ``sink``.

    ``chunk_size`` and ``max_links`` exist so tests can exercise deep trees cheaply; any
    other value than the default gives CIDs Kubo only reproduces with matching settings.
    """
    return _Builder(sink, chunk_size, max_links).entry(entry)


def build_directory(entries: Mapping[str, DagNode], *, sink: BlockSink | None = None) -> DagNode:
    """A UnixFS folder linking nodes already built (links sorted by name, as Kubo does)."""
    return _Builder(sink, CHUNK_SIZE, MAX_LINKS).directory(entries)


def scan_directory(path: str | Path, *, hidden: bool = False) -> dict[str, Entry]:
    """A folder as ``ipfs add -r`` sees it: names starting with "." are skipped unless
    ``hidden``, like Kubo's ``--hidden``. Symlinks are refused rather than followed,
    because Kubo would store them as UnixFS symlinks (a different CID)."""
    tree: dict[str, Entry] = {}
    for child in sorted(Path(path).iterdir()):
        if child.name.startswith(".") and not hidden:
            continue
        if child.is_symlink():
            raise ContentError(f"{child} is a symlink; symlinks are not supported")
        if child.is_dir():
            tree[child.name] = scan_directory(child, hidden=hidden)
        elif child.is_file():
            tree[child.name] = child
        else:
            raise ContentError(f"{child} is neither a regular file nor a folder")
    return tree


def cid_of_bytes(data: bytes, *, chunk_size: int = CHUNK_SIZE, max_links: int = MAX_LINKS) -> str:
    """CID of ``data`` as one file (``ipfs add --only-hash``)."""
    return build_dag(data, chunk_size=chunk_size, max_links=max_links).cid


def cid_of_file(path: str | Path) -> str:
    """CID of a file on disk, read in chunks (``ipfs add --only-hash FILE``)."""
    return build_dag(Path(path)).cid


def cid_of_directory(path: str | Path, *, hidden: bool = False) -> str:
    """CID of the folder itself, as the last line of ``ipfs add -r --only-hash DIR``."""
    return build_dag(scan_directory(path, hidden=hidden)).cid


def cid_of_wrapped_file(name: str, data: bytes) -> str:
    """CID of a folder holding just ``name`` (``ipfs add -w``), i.e. of ``DIR`` when ``DIR``
    holds only that file: a registry published as ``/ipfs/<cid>/blockchain.json``."""
    return build_dag({name: data}).cid


# --- reading DAGs back ------------------------------------------------------------------


def cat_dag(ref: str, load: BlockSource, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file at ``ref`` (``/ipfs/<cid>/name`` or ``<cid>[/name]``), from blocks ``load`` gives.

    Every block is checked against its CID, and every file node's sizes against its
    children's, so neither a corrupt store nor a hostile peer can feed us wrong bytes or
    make us walk an endless DAG. The declared size is checked against ``max_bytes`` before
    any content is assembled.
    """
    cid, names = parse_ipfs_path(ref)
    node = _decode_node(cid, load(cid))
    for name in names:
        if node.kind != _DIRECTORY:
            kind = "a HAMT-sharded folder (not supported)" if node.kind == _HAMT_SHARD else "not a folder"
            raise ContentNotFound(f"cannot look up {name!r}: {cid} is {kind}")
        link = next((link for link in node.links if link.name == name), None)
        if link is None:
            raise ContentNotFound(f"no link named {name!r} under {cid}")
        cid = link.cid
        node = _decode_node(cid, load(cid))
    if node.kind not in (_FILE, _RAW):
        raise ContentError(f"{cid} is not a file (UnixFS type {node.kind}); name a file inside it")
    size = node.filesize if node.filesize is not None else len(node.data)
    if size > max_bytes:
        raise ContentTooLarge(f"{ref} is {size} bytes, above the limit of {max_bytes}")
    out = bytearray()
    _append_file(cid, node, size, load, out)
    return bytes(out)


def _append_file(cid: str, node: _Node, size: int, load: BlockSource, out: bytearray) -> None:
    """Depth-first concatenation of a file node's data and its children's, checking sizes."""
    stack = [(cid, node, size)]
    while stack:
        cid, node, size = stack.pop()
        if node.kind not in (_FILE, _RAW):
            raise ContentCorrupt(f"block {cid} inside a file is UnixFS type {node.kind}")
        if len(node.blocksizes) != len(node.links) or len(node.data) + sum(node.blocksizes) != size:
            raise ContentCorrupt(f"block {cid} declares sizes that do not add up")
        if node.filesize is not None and node.filesize != size:
            raise ContentCorrupt(f"block {cid} is {node.filesize} bytes, its parent says {size}")
        out += node.data
        # Children go on the stack in reverse so the leftmost is read first.
        for link, child_size in reversed(list(zip(node.links, node.blocksizes))):
            stack.append((link.cid, _decode_node(link.cid, load(link.cid)), child_size))


# --- embedded store ---------------------------------------------------------------------


class EmbeddedStore:
    """Blocks on disk, one file per block under ``root/blocks/<cid>``, for daemon-less nodes.

    Blocks are immutable and named by their hash, so writing one is idempotent and a
    crash can only ever leave a stray temp file, never a wrong block: each is written to
    a temp file and renamed into place. Reads verify every hash.
    """

    def __init__(self, root: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.blocks = self.root / "blocks"
        self.max_bytes = max_bytes

    def has(self, cid: str) -> bool:
        """True when the block ``cid`` is stored (its children may still be missing)."""
        return is_cid(cid) and (self.blocks / cid).is_file()

    def put_block(self, cid: str, block: bytes) -> None:
        if _cid_of_block(block) != cid:
            raise ContentCorrupt(f"refusing to store a block under the wrong CID {cid}")
        if not (self.blocks / cid).is_file():
            write_atomic(self.blocks / cid, block)

    def get_block(self, cid: str) -> bytes:
        if not is_cid(cid):
            raise ContentError(f"{cid!r} is not a CIDv0")
        path = self.blocks / cid
        try:
            with path.open("rb") as f:
                block = f.read(MAX_BLOCK_BYTES + 1)
        except FileNotFoundError:
            raise ContentNotFound(f"block {cid} is not in the store at {self.root}") from None
        if len(block) > MAX_BLOCK_BYTES:
            raise ContentTooLarge(f"block {cid} is above {MAX_BLOCK_BYTES} bytes")
        return block

    def add(self, entry: Entry) -> str:
        """Store bytes, a file (Path) or a tree of them; returns the root CID."""
        _check_sizes(entry, self.max_bytes)
        return build_dag(entry, sink=self.put_block).cid

    def add_bytes(self, data: bytes) -> str:
        return self.add(data)

    def add_directory(self, path: str | Path, *, hidden: bool = False) -> str:
        """Like ``ipfs add -r DIR``: stores every block, returns the folder's CID."""
        if not Path(path).is_dir():
            raise ContentNotFound(f"{path} is not a folder")
        return self.add(scan_directory(path, hidden=hidden))

    def get_file(self, ref: str, *, max_bytes: int | None = None) -> bytes:
        """``<cid>``, ``<cid>/blockchain.json`` or ``/ipfs/<cid>/blockchain.json``, verified."""
        return cat_dag(ref, self.get_block, max_bytes=self.max_bytes if max_bytes is None else max_bytes)

    def collect_garbage(self, keep: Iterable[str]) -> int:
        """Remove every block not reachable from the ``keep`` roots (and stray temp files
        older than a minute); returns how many files went. Blocking: call it in a thread."""
        reachable: set[str] = set()
        todo = [cid for cid in keep if is_cid(cid)]
        while todo:
            cid = todo.pop()
            if cid in reachable:
                continue
            reachable.add(cid)
            try:
                node = _decode_node(cid, self.get_block(cid))
            except ContentError:
                continue  # missing or damaged: nothing below it to keep
            todo.extend(link.cid for link in node.links)
        removed = 0
        stale = time.time() - 60
        for path in self.blocks.iterdir() if self.blocks.is_dir() else ():
            temp = path.name.startswith(".")
            if (temp and path.stat().st_mtime < stale) or (not temp and path.name not in reachable):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _check_sizes(entry: Entry, max_bytes: int) -> None:
    if isinstance(entry, (bytes, Path)):
        size = len(entry) if isinstance(entry, bytes) else entry.stat().st_size
        if size > max_bytes:
            raise ContentTooLarge(f"{'data' if isinstance(entry, bytes) else entry} is {size} bytes, above {max_bytes}")
        return
    for child in entry.values():
        _check_sizes(child, max_bytes)


def _read_bounded(path: Path, max_bytes: int) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise ContentNotFound(f"{path} does not exist") from None
    if len(data) > max_bytes:
        raise ContentTooLarge(f"{path} is above the limit of {max_bytes} bytes")
    return data


# --- Kubo RPC client --------------------------------------------------------------------


class KuboKey(NamedTuple):
    """A keypair in Kubo's keystore; ``id`` is the IPNS name it publishes under."""

    name: str
    id: str


class KuboClient:
    """Async client of Kubo's RPC API (``POST /api/v0/<command>?arg=...``), over httpx.

    Works under trio (httpx runs on anyio). Use as ``async with KuboClient() as kubo:``
    or call :meth:`aclose`. Connection trouble of any kind raises
    :class:`IpfsUnavailable`; an error answer from Kubo raises :class:`KuboError` with
    Kubo's message. ``add`` always asks for CIDv0, UnixFS leaves and 256 KiB chunks, so
    the CIDs match :func:`build_dag` whatever the daemon's ``Import`` settings are.
    """

    def __init__(
        self,
        api_url: str = DEFAULT_API_URL,
        *,
        timeout: float = 60.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.max_bytes = max_bytes
        self._http = httpx.AsyncClient(base_url=f"{self.api_url}/api/v0/", timeout=timeout, transport=transport)

    async def __aenter__(self) -> KuboClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- plumbing --

    async def _post(self, command: str, params: dict | None = None, **kwargs: object) -> httpx.Response:
        try:
            response = await self._http.post(command, params=params, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise IpfsUnavailable(f"Kubo RPC at {self.api_url} did not answer: {exc!r}") from exc
        if response.status_code != 200:
            raise _kubo_error(response)
        return response

    async def _post_json(self, command: str, params: dict | None = None, **kwargs: object) -> dict:
        response = await self._post(command, params, **kwargs)
        try:
            body = response.json()
        except ValueError:
            raise KuboError(f"{command}: answer is not JSON", status=response.status_code) from None
        if not isinstance(body, dict):
            raise KuboError(f"{command}: answer is not a JSON object", status=response.status_code)
        return body

    # -- commands --

    async def version(self) -> str:
        """The daemon's version string, e.g. ``"0.39.0"``."""
        return str((await self._post_json("version"))["Version"])

    async def is_available(self, timeout: float = 2.0) -> bool:
        """True when a daemon answers ``version`` within ``timeout`` seconds."""
        try:
            await self._post("version", timeout=timeout)
        except IpfsError:
            return False
        return True

    async def add_directory(self, path: str | Path, *, pin: bool = True, hidden: bool = False) -> str:
        """Add a folder like ``ipfs add -r DIR``; returns the folder's CID."""
        path = Path(path).resolve()
        parts = await trio.to_thread.run_sync(_multipart_parts, path, hidden, self.max_bytes)
        return await self._add(parts, pin=pin, wrap=False, root=path.name)

    async def add_bytes(
        self, data: bytes, *, name: str = REGISTRY_FILENAME, wrap: bool = False, pin: bool = True
    ) -> str:
        """Add one file; with ``wrap`` (``ipfs add -w``) returns the CID of a folder holding it."""
        if len(data) > self.max_bytes:
            raise ContentTooLarge(f"{name} is {len(data)} bytes, above {self.max_bytes}")
        parts = [("file", (quote_plus(name), data, "application/octet-stream"))]
        return await self._add(parts, pin=pin, wrap=wrap, root="" if wrap else name)

    async def _add(self, parts: list, *, pin: bool, wrap: bool, root: str) -> str:
        params = {
            "pin": pin,
            "wrap-with-directory": wrap,
            "cid-version": 0,
            "raw-leaves": False,
            "chunker": f"size-{CHUNK_SIZE}",
        }
        response = await self._post("add", params, files=parts)
        # One JSON object per line: each file, then each folder, innermost first.
        root_cid = None
        for line in response.text.splitlines():
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("Type") == "error":
                raise KuboError(event.get("Message", "add failed"), status=200, code=event.get("Code"))
            if event.get("Name") == root and event.get("Hash"):
                root_cid = event["Hash"]
        if root_cid is None:
            raise KuboError(f"add: the answer has no entry named {root!r}", status=response.status_code)
        return str(root_cid)

    async def cat(self, path: str, *, max_bytes: int | None = None) -> bytes:
        """File bytes at an IPFS path (``<cid>/blockchain.json``, ``/ipfs/...``, ``/ipns/...``)."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        try:
            async with self._http.stream("POST", "cat", params={"arg": path}) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _kubo_error(response)
                declared = response.headers.get("X-Content-Length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise ContentTooLarge(f"{path} is {declared} bytes, above the limit of {limit}")
                out = bytearray()
                async for chunk in response.aiter_bytes():
                    out += chunk
                    if len(out) > limit:
                        raise ContentTooLarge(f"{path} is above the limit of {limit} bytes")
                return bytes(out)
        except httpx.TransportError as exc:
            raise IpfsUnavailable(f"Kubo RPC at {self.api_url} did not answer: {exc!r}") from exc

    async def pin_add(self, cid: str) -> list[str]:
        """Pin recursively; returns the pinned CIDs."""
        return list((await self._post_json("pin/add", {"arg": cid})).get("Pins") or [])

    async def name_publish(
        self, cid: str, *, key: str = "self", lifetime: str = "24h", allow_offline: bool = False
    ) -> str:
        """Point the IPNS name of ``key`` at ``/ipfs/<cid>``; returns the name."""
        target = cid if cid.startswith(("/ipfs/", "/ipns/")) else f"/ipfs/{cid}"
        params: dict = {"arg": target, "key": key, "lifetime": lifetime}
        if allow_offline:  # sent only when asked: older daemons predate the flag
            params["allow-offline"] = True
        return str((await self._post_json("name/publish", params))["Name"])

    async def name_resolve(self, name: str) -> str:
        """``/ipns/<name>`` or ``<name>`` to the path it points at, e.g. ``/ipfs/Qm...``."""
        return str((await self._post_json("name/resolve", {"arg": name}))["Path"])

    async def key_gen(self, name: str, *, key_type: str = "ed25519") -> KuboKey:
        body = await self._post_json("key/gen", {"arg": name, "type": key_type})
        return KuboKey(body["Name"], body["Id"])

    async def key_list(self) -> list[KuboKey]:
        # `key/list` rather than `key/ls`: the latter only exists from Kubo 0.40 on.
        body = await self._post_json("key/list")
        return [KuboKey(key["Name"], key["Id"]) for key in body.get("Keys") or []]


def _kubo_error(response: httpx.Response) -> KuboError:
    """Kubo's errors are ``{"Message", "Code", "Type": "error"}``; 404/405 are plain text."""
    try:
        body = response.json()
        return KuboError(str(body["Message"]), status=response.status_code, code=body.get("Code"))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip() or response.reason_phrase
        return KuboError(f"HTTP {response.status_code}: {text}", status=response.status_code)


def _multipart_parts(path: Path, hidden: bool, max_bytes: int) -> list:
    """Parts of an ``add`` request, depth first, as Kubo's own CLI sends them.

    A folder is a part with type ``application/x-directory`` and no body; a file's part
    is named by its path from the added folder's parent ("reg/blockchain.json"),
    query-escaped as Go's client does ("reg%2Fblockchain.json").
    """
    parts: list = []
    total = 0

    def walk(tree: Mapping[str, Entry], prefix: str) -> None:
        nonlocal total
        for name, child in tree.items():
            rel = f"{prefix}/{name}"
            if isinstance(child, Path):
                data = _read_bounded(child, max_bytes)
                total += len(data)
                if total > max_bytes:
                    raise ContentTooLarge(f"{path} holds more than {max_bytes} bytes")
                parts.append(("file", (quote_plus(rel), data, "application/octet-stream")))
            elif isinstance(child, Mapping):
                parts.append(("file", (quote_plus(rel), b"", "application/x-directory")))
                walk(child, rel)

    parts.append(("file", (quote_plus(path.name), b"", "application/x-directory")))
    walk(scan_directory(path, hidden=hidden), path.name)
    return parts


# --- one entry point for registry sources -----------------------------------------------


class BlockNetwork(Protocol):
    """Peers that can bring blocks and names without a daemon (a running node's bitswap
    and DHT: :class:`dllm_p2p.registry.exchange.IpfsPeer`)."""

    async def fetch(self, cid: str) -> None:
        """Bring every block under ``cid`` into the node's embedded store."""

    async def resolve(self, name: str) -> str:
        """``/ipns/<name>`` -> ``/ipfs/<cid>``."""
        raise NotImplementedError


async def resolve_source(
    source: str,
    *,
    kubo: KuboClient | None = None,
    store: EmbeddedStore | None = None,
    network: BlockNetwork | None = None,
    filename: str = REGISTRY_FILENAME,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """The bytes of the registry that ``source`` names.

    ``source`` is a local file, a local folder (``filename`` inside it), ``/ipfs/<cid>``,
    a bare ``<cid>`` (both meaning the registry folder; ``filename`` is appended when no
    path follows the CID), ``/ipfs/<cid>/<file>``, or ``/ipns/<name>`` (resolved by
    ``kubo``, else through ``network``).

    CIDs are read from the embedded ``store`` when it has them, which costs no network
    and is verified block by block; otherwise from ``kubo``, else fetched from peers by
    ``network`` into ``store``. All give the same bytes, since the CID pins them down.
    """
    if source.startswith("/ipns/"):
        if kubo is not None:
            source = await kubo.name_resolve(source)
        elif network is not None:
            source = await network.resolve(source)
        else:
            raise IpfsUnavailable(f"resolving {source} needs a Kubo daemon or a running node's DHT")
    if source.startswith("/ipfs/") or is_cid(source.split("/", 1)[0]):
        cid, names = parse_ipfs_path(source)
        ref = "/ipfs/" + "/".join([cid, *(names or [filename])])
        read = partial(store.get_file, ref, max_bytes=max_bytes) if store is not None else None
        if read is not None and store is not None and store.has(cid):
            try:
                return await trio.to_thread.run_sync(read)
            except ContentNotFound:
                if kubo is None and network is None:
                    raise
        if kubo is not None:
            return await kubo.cat(ref, max_bytes=max_bytes)
        if network is None or read is None:
            raise ContentNotFound(f"{cid} is not in the embedded store, and there is no Kubo daemon or peer to ask")
        await network.fetch(cid)
        return await trio.to_thread.run_sync(read)
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / filename
    return await trio.to_thread.run_sync(_read_bounded, path, max_bytes)
