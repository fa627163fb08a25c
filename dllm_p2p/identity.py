"""A node's identity: an Ed25519 libp2p key kept on disk, its peer id, sign and verify;
and the lock that gives one process at a time the use of a data dir.

The key file is created once with mode 0600 and reused, so a node keeps the same peer id
across restarts; that peer id is what the registry and heartbeats are signed under. Two
processes on one data dir would be two nodes under one peer id, fighting over its
registry records and heartbeat numbers, so a node first takes ``<data-dir>/repo.lock``
(as Kubo does with its repo).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.identity_utils import load_identity
from libp2p.peer.id import ID

from .fsutil import write_atomic

KEY_FILE = "node.key"
LOCK_FILE = "repo.lock"


@dataclass(frozen=True)
class Identity:
    key_pair: KeyPair

    @property
    def peer_id(self) -> ID:
        return ID.from_pubkey(self.key_pair.public_key)

    @property
    def public_key_bytes(self) -> bytes:
        """The libp2p protobuf encoding of the public key (what peer ids are derived from)."""
        return self.key_pair.public_key.serialize()

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key_bytes).decode()

    def sign(self, data: bytes) -> bytes:
        return self.key_pair.private_key.sign(data)


def generate() -> Identity:
    return Identity(create_new_key_pair())


def load_or_create(data_dir: str | Path) -> Identity:
    """Load ``<data_dir>/node.key``, creating it (mode 0600) on first use."""
    path = Path(data_dir).expanduser() / KEY_FILE
    if path.exists():
        return Identity(load_identity(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = generate()
    # Atomically: a crash while writing must not leave a truncated key behind.
    write_atomic(path, identity.key_pair.private_key.serialize(), mode=0o600)
    return identity


class DataDirLocked(Exception):
    """Another live process holds the data dir."""


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/repo.lock``, holding the owner's pid.

    The kernel drops the lock when its process dies, however it dies (``kill -9``
    included), so a stale lock never needs cleaning up: the next process simply takes it.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.path = self.data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> DataDirLock:
        """Take the lock, waiting up to ``timeout`` seconds; raise ``DataDirLocked`` naming
        the dir and the pid that holds it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                holder = holder_pid(self.data_dir)
                os.close(fd)
                who = f"process {holder}" if holder else "another process"
                raise DataDirLocked(
                    f"data dir {self.data_dir} is in use by {who}; stop it, or give this node "
                    "another --data-dir (each node needs its own)"
                )
            time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_pid(data_dir: str | Path) -> int | None:
    """The pid written in ``data_dir``'s lock file, if any (it may no longer hold it)."""
    try:
        text = (Path(data_dir).expanduser() / LOCK_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def peer_id_for(public_key_bytes: bytes) -> str:
    """The base58 peer id that belongs to a protobuf-encoded public key."""
    return ID.from_pubkey(deserialize_public_key(public_key_bytes)).to_base58()


def inlined_public_key(peer_id: ID) -> bytes | None:
    """The protobuf public key a peer id inlines (an identity multihash: Ed25519 keys and
    other small ones), or None for a peer id that is a hash of its key."""
    raw = peer_id.to_bytes()
    if len(raw) < 3 or raw[0] != 0x00 or raw[1] != len(raw) - 2:
        return None
    return raw[2:]


def verify(public_key_bytes: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` over ``data`` was made by the key; False for any bad input."""
    try:
        return bool(deserialize_public_key(public_key_bytes).verify(data, signature))
    except Exception:
        return False
