"""CARv1 archives: a DAG's blocks in one byte stream, as trustless gateways serve them.

A CAR (https://ipld.io/specs/transport/car/carv1/) is a header followed by blocks, each
prefixed with its length as an unsigned LEB128 varint::

    varint(len(header)) header
    varint(len(cid) + len(block)) cid block     (once per block)

The header is DAG-CBOR ``{"roots": [<CID>, ...], "version": 1}``; a CID inside DAG-CBOR is
tag 42 around a byte string holding 0x00 (the "identity" multibase prefix) and then the
binary CID. DAG-CBOR orders map keys length first, then bytewise, so ``roots`` (5 bytes)
comes before ``version`` (7 bytes). The ``cid`` in front of each block is binary too:

* CIDv0 is just the 34-byte sha2-256 multihash (``0x12 0x20`` + digest); its text form is
  base58btc (``Qm...``).
* CIDv1 is ``varint(1) varint(codec) multihash``; its text form here is multibase base32,
  lowercase, prefix ``b`` (``bafy...`` for dag-pb, ``bafk...`` for raw,
  ``bafz...`` for libp2p-key). Base36 (``k...``), IPNS's usual form, is read too.

Nothing in a CAR says how many blocks follow, so a CAR cut exactly between two blocks is
still a valid CAR: :func:`read_car` refuses a cut inside a block, but a reader that needs
the whole DAG must still check that every link it follows is there.

Every block is checked against its CID, on the way out and on the way in; only sha2-256
CIDs are accepted for blocks (that is all ``ipfs add`` makes, and all a reader can check
without more hash functions).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cbor2

from dllm_p2p.registry.ipfs import (
    MAX_BLOCK_BYTES,
    ContentCorrupt,
    ContentError,
    ContentTooLarge,
    EmbeddedStore,
    _b58decode,
    _b58encode,
    _base_decode,
    _base_encode,
    _decode_node,
    _varint,
    is_cid,
)

__all__ = [
    "DAG_PB",
    "LIBP2P_KEY",
    "MAX_DAG_BLOCKS",
    "MAX_HEADER_BYTES",
    "RAW",
    "CarInvalid",
    "InvalidCid",
    "cid_from_bytes",
    "cid_to_bytes",
    "dag_blocks",
    "iter_car",
    "read_car",
    "write_car",
]

#: Multicodec codes of the CIDv1 content types we read and write.
DAG_PB = 0x70
RAW = 0x55
LIBP2P_KEY = 0x72
CODEC_NAMES = {DAG_PB: "dag-pb", RAW: "raw", LIBP2P_KEY: "libp2p-key"}
#: Multihash codes.
SHA2_256 = 0x12
IDENTITY = 0x00
#: An identity multihash inlines its "digest"; peer ids inline keys of at most 42 bytes.
MAX_IDENTITY_DIGEST = 128
#: Largest CAR header we parse; a header is a handful of root CIDs, i.e. tens of bytes.
MAX_HEADER_BYTES = 64 * 1024
#: Default bound of :func:`dag_blocks`: a registry folder is a few blocks.
MAX_DAG_BLOCKS = 10_000
#: DAG-CBOR tag of a CID (a link).
CID_TAG = 42


# --- errors -----------------------------------------------------------------------------


class InvalidCid(ContentError):
    """A CID (text or binary) we cannot parse, or of a codec or hash we do not handle."""


class CarInvalid(ContentCorrupt):
    """A CAR that is malformed, truncated, not CARv1, or holds a block that does not
    hash to its CID."""


# --- varints and multibase ----------------------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The unsigned LEB128 varint at ``buf[pos:]`` and the position after it.

    ValueError when it runs off the end, is longer than 9 bytes (the multiformats limit)
    or is not minimally encoded (a trailing 0x00 byte)."""
    value = shift = 0
    start = pos
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        if pos - start >= 9:
            raise ValueError("varint longer than 9 bytes")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if byte == 0 and pos - start > 1:
                raise ValueError("varint is not minimally encoded")
            return value, pos


_B32_RE = re.compile(r"[a-z2-7]+")
_B36_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _b32encode(raw: bytes) -> str:
    """RFC 4648 base32, lowercase, no padding (multibase ``base32``, without its ``b``)."""
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def _b32decode(text: str) -> bytes:
    if not _B32_RE.fullmatch(text):
        raise ValueError("not lowercase base32")
    try:
        return base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except ValueError:
        raise ValueError("not valid base32") from None


def _b36encode(raw: bytes) -> str:
    """Multibase ``base36`` (lowercase, without its ``k``): leading zero bytes become "0"."""
    return _base_encode(raw, _B36_ALPHABET)


def _b36decode(text: str) -> bytes:
    try:
        return _base_decode(text, _B36_ALPHABET)
    except ValueError:
        raise ValueError("not lowercase base36") from None


# --- CIDs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cid:
    version: int
    codec: int
    hash_code: int
    digest: bytes
    #: The binary CID.
    raw: bytes

    def text(self) -> str:
        return _b58encode(self.raw) if self.version == 0 else "b" + _b32encode(self.raw)


def _read_cid(buf: bytes, pos: int = 0) -> tuple[_Cid, int]:
    """The binary CID at ``buf[pos:]`` and the position after it; raises InvalidCid."""
    start = pos
    if buf[pos : pos + 2] == b"\x12\x20":  # CIDv0: a bare sha2-256 multihash
        if len(buf) - pos < 34:
            raise InvalidCid("truncated CIDv0")
        return _Cid(0, DAG_PB, SHA2_256, buf[pos + 2 : pos + 34], buf[pos : pos + 34]), pos + 34
    try:
        version, pos = _read_varint(buf, pos)
        if version != 1:
            raise InvalidCid(f"CID version {version} is not supported (only 0 and 1)")
        codec, pos = _read_varint(buf, pos)
        if codec not in CODEC_NAMES:
            raise InvalidCid(f"CID codec 0x{codec:x} is not supported (only dag-pb, raw, libp2p-key)")
        hash_code, pos = _read_varint(buf, pos)
        length, pos = _read_varint(buf, pos)
    except ValueError as exc:
        raise InvalidCid(f"malformed CID: {exc}") from None
    if hash_code == SHA2_256:
        if length != 32:
            raise InvalidCid(f"sha2-256 multihash with a {length}-byte digest")
    elif hash_code == IDENTITY and codec == LIBP2P_KEY:
        if length > MAX_IDENTITY_DIGEST:
            raise InvalidCid(f"identity multihash of {length} bytes, above {MAX_IDENTITY_DIGEST}")
    else:
        raise InvalidCid(
            f"multihash 0x{hash_code:x} is not supported (only sha2-256, and identity for libp2p-key)"
        )
    if len(buf) - pos < length:
        raise InvalidCid("truncated CID: the multihash digest runs past the end")
    return _Cid(1, codec, hash_code, buf[pos : pos + length], buf[start : pos + length]), pos + length


def _parse_cid_bytes(raw: bytes) -> _Cid:
    cid, end = _read_cid(raw)
    if end != len(raw):
        raise InvalidCid(f"{len(raw) - end} bytes follow the CID")
    return cid


def _parse_cid_text(text: str) -> _Cid:
    if is_cid(text):
        return _parse_cid_bytes(_b58decode(text))
    prefix, body = text[:1], text[1:]
    try:
        if prefix == "b":
            raw = _b32decode(body)
        elif prefix == "k":
            raw = _b36decode(body)
        else:
            raise ValueError("unknown form")
    except ValueError as exc:
        raise InvalidCid(
            f"{text!r} is not a CID ({exc}): expected Qm... (CIDv0), b... (base32 CIDv1) or k... (base36 CIDv1)"
        ) from None
    if raw[:1] != b"\x01":
        raise InvalidCid(f"{text!r} is not a CIDv1")
    return _parse_cid_bytes(raw)


def cid_to_bytes(cid: str) -> bytes:
    """The binary form of a CID: the 34-byte multihash of a CIDv0 (``Qm...``), or
    ``varint(1) varint(codec) multihash`` of a CIDv1 (``b...`` base32 or ``k...`` base36).
    Codecs dag-pb, raw and libp2p-key; raises :class:`InvalidCid` for anything else."""
    return _parse_cid_text(cid).raw


def cid_from_bytes(raw: bytes) -> str:
    """The text form of a binary CID: base58btc ``Qm...`` for CIDv0, base32 ``b...`` for
    CIDv1. Raises :class:`InvalidCid` when ``raw`` is not exactly one CID we handle."""
    return _parse_cid_bytes(bytes(raw)).text()


def _check_block(cid: _Cid, block: bytes) -> None:
    name = cid.text()
    if cid.hash_code != SHA2_256:
        raise CarInvalid(f"block {name} uses multihash 0x{cid.hash_code:x}; only sha2-256 blocks are accepted")
    if hashlib.sha256(block).digest() != cid.digest:
        raise CarInvalid(f"block {name} does not hash to its CID")


# --- writing ----------------------------------------------------------------------------


def _header(roots: list[str]) -> bytes:
    links = [cbor2.CBORTag(CID_TAG, b"\0" + cid_to_bytes(root)) for root in roots]
    # canonical=True sorts keys length first, then bytewise: DAG-CBOR's order.
    return cbor2.dumps({"roots": links, "version": 1}, canonical=True)


def iter_car(roots: list[str], blocks: Iterable[tuple[str, bytes]]) -> Iterator[bytes]:
    """A CARv1 in pieces: the header frame, then one frame per ``(cid, block)``.

    ``blocks`` is consumed lazily, so a DAG can be streamed without holding it all.
    Each block is checked against its CID first (:class:`CarInvalid` otherwise): a CAR
    we write always verifies. At least one root is required, since go-car's reader
    refuses CARs without one.
    """
    if not roots:
        raise ValueError("a CAR needs at least one root CID")
    header = _header(list(roots))
    yield _varint(len(header)) + header
    for cid_text, block in blocks:
        cid = _parse_cid_text(cid_text)
        _check_block(cid, block)
        yield _varint(len(cid.raw) + len(block)) + cid.raw + block


def write_car(roots: list[str], blocks: Iterable[tuple[str, bytes]]) -> bytes:
    """The whole CARv1 of :func:`iter_car` as one byte string."""
    return b"".join(iter_car(roots, blocks))


# --- reading ----------------------------------------------------------------------------


def _decode_header(header: bytes) -> list[str]:
    stream = io.BytesIO(header)
    try:
        decoded = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises several types on malformed input
        raise CarInvalid(f"CAR header is not CBOR: {exc}") from None
    if stream.tell() != len(header):
        raise CarInvalid("CAR header has bytes after its CBOR map")
    if not isinstance(decoded, dict):
        raise CarInvalid("CAR header is not a CBOR map")
    version = decoded.get("version")
    if version == 2:
        raise CarInvalid("this is a CARv2; only CARv1 is supported")
    if version != 1 or isinstance(version, bool):
        raise CarInvalid(f"CAR header has version {version!r}; only CARv1 is supported")
    links = decoded.get("roots")
    if not isinstance(links, list):
        raise CarInvalid("CAR header has no 'roots' list")
    roots = []
    for link in links:
        if not (isinstance(link, cbor2.CBORTag) and link.tag == CID_TAG and isinstance(link.value, bytes)):
            raise CarInvalid("a CAR root is not a DAG-CBOR link (tag 42 around bytes)")
        if link.value[:1] != b"\0":
            raise CarInvalid("a CAR root link lacks the 0x00 multibase prefix")
        try:
            roots.append(cid_from_bytes(link.value[1:]))
        except InvalidCid as exc:
            raise CarInvalid(f"a CAR root is not a CID we handle: {exc}") from None
    return roots


def read_car(data: bytes, *, max_blocks: int, max_bytes: int) -> tuple[list[str], list[tuple[str, bytes]]]:
    """The roots and ``(cid, block)`` pairs of a CARv1, in order, every block verified.

    Raises :class:`CarInvalid` for a malformed or truncated CAR (naming the offset),
    a CARv2, a CID we do not handle, a block that is not sha2-256 or does not hash to
    its CID (naming the CID). Raises :class:`~dllm_p2p.registry.ipfs.ContentTooLarge`
    when ``data`` is above ``max_bytes``, a block above 2 MiB, or there are more than
    ``max_blocks`` blocks. Zero roots are accepted, as the spec now recommends; the
    blocks are returned as they come, duplicates included.
    """
    if len(data) > max_bytes:
        raise ContentTooLarge(f"CAR is {len(data)} bytes, above the limit of {max_bytes}")
    try:
        header_len, pos = _read_varint(data, 0)
    except ValueError as exc:
        raise CarInvalid(f"CAR header length: {exc} (truncated or not a CAR)") from None
    if header_len == 0:
        raise CarInvalid("CAR header is empty")
    if header_len > MAX_HEADER_BYTES:
        raise CarInvalid(f"CAR header claims {header_len} bytes, above {MAX_HEADER_BYTES}")
    if pos + header_len > len(data):
        raise CarInvalid(f"truncated CAR: the header needs {header_len} bytes, {len(data) - pos} follow")
    roots = _decode_header(data[pos : pos + header_len])
    pos += header_len

    blocks: list[tuple[str, bytes]] = []
    while pos < len(data):
        start = pos
        try:
            section_len, pos = _read_varint(data, pos)
        except ValueError as exc:
            raise CarInvalid(f"truncated CAR: block length at byte {start}: {exc}") from None
        if section_len == 0:
            raise CarInvalid(f"zero-length block section at byte {start}")
        if pos + section_len > len(data):
            raise CarInvalid(
                f"truncated CAR: the block at byte {start} needs {section_len} bytes, {len(data) - pos} follow"
            )
        section = data[pos : pos + section_len]
        pos += section_len
        try:
            cid, end = _read_cid(section)
        except InvalidCid as exc:
            raise CarInvalid(f"block at byte {start}: {exc}") from None
        block = section[end:]
        if len(block) > MAX_BLOCK_BYTES:
            raise ContentTooLarge(f"block {cid.text()} is {len(block)} bytes, above {MAX_BLOCK_BYTES}")
        _check_block(cid, block)
        if len(blocks) >= max_blocks:
            raise ContentTooLarge(f"CAR holds more than {max_blocks} blocks")
        blocks.append((cid.text(), block))
    return roots, blocks


# --- DAGs from the embedded store ---------------------------------------------------------


def dag_blocks(store: EmbeddedStore, root: str, *, max_blocks: int = MAX_DAG_BLOCKS) -> Iterator[tuple[str, bytes]]:
    """Every block of the DAG under ``root``, as ``(cid, block)``, depth first in link
    order (a node, then its first child's whole subtree, then the next child's): the
    order of the trustless gateway's ``dag-scope=all`` with ``dups=n``, ``order=dfs``.

    Each block comes once, even when several links lead to it (two files with the same
    content). Blocks are read and verified lazily; a missing block raises
    ``ContentNotFound`` when the walk reaches it, a damaged one ``ContentCorrupt``, and
    more than ``max_blocks`` blocks ``ContentTooLarge``.
    """
    seen: set[str] = set()
    stack = [root]
    while stack:
        cid = stack.pop()
        if cid in seen:
            continue
        if len(seen) >= max_blocks:
            raise ContentTooLarge(f"the DAG under {root} has more than {max_blocks} blocks")
        seen.add(cid)
        block = store.get_block(cid)
        node = _decode_node(cid, block)
        yield cid, block
        # Reversed onto the stack, so the first link is walked first.
        stack.extend(link.cid for link in reversed(node.links))
