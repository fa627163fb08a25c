"""A node's identity: an Ed25519 libp2p key kept on disk, its peer id, sign and verify.

The key file is created once with mode 0600 and reused, so a node keeps the same peer id
across restarts; that peer id is what the registry and heartbeats are signed under.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.identity_utils import load_identity, save_identity
from libp2p.peer.id import ID

KEY_FILE = "node.key"


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
    save_identity(identity.key_pair, path)
    return identity


def peer_id_for(public_key_bytes: bytes) -> str:
    """The base58 peer id that belongs to a protobuf-encoded public key."""
    return ID.from_pubkey(deserialize_public_key(public_key_bytes)).to_base58()


def verify(public_key_bytes: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` over ``data`` was made by the key; False for any bad input."""
    try:
        return bool(deserialize_public_key(public_key_bytes).verify(data, signature))
    except Exception:
        return False
