"""Publishing the registry on IPFS: through a Kubo daemon when there is one, else embedded.

The folder that is added holds ``blockchain.json`` alone (``<data-dir>/publish/``), never
the data dir itself, which also holds the node's private key. Either way the folder's CID
is written to ``<data-dir>/current_cid.txt``; the embedded store computes the same CID
Kubo would, so a later ``ipfs add -r`` of that folder gives the same address.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import trio

from ..fsutil import write_atomic
from .chain import Chain, verify_chain
from .ipfs import DEFAULT_API_URL, BlockNetwork, EmbeddedStore, IpfsError, KuboClient, resolve_source
from .store import FILENAME

log = logging.getLogger("dllm_p2p.registry.publish")

IPNS_KEY = "dllm-registry"
CID_FILE = "current_cid.txt"
#: What the last publication was and where the IPNS name points, for `registry show`.
STATE_FILE = "publication.json"
#: Publications whose blocks the embedded store keeps (the current one and a few before
#: it, for readers that resolved a slightly older CID); the rest are removed.
KEEP_PUBLICATIONS = 4


class Publisher:
    """Adds the chain's folder to IPFS and keeps ``current_cid.txt`` and IPNS up to date."""

    def __init__(self, data_dir: str | Path, kubo: KuboClient | None, *, ipns_key: str = IPNS_KEY) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.kubo = kubo
        self.ipns_key = ipns_key
        self.store = EmbeddedStore(self.data_dir / "ipfs")
        self.cid: str | None = None
        #: When the last publication finished (unix seconds).
        self.published_at: float | None = None
        self._kubo_name: str | None = None
        self._kubo_named: tuple[str, float] | None = None  # (cid, when) of Kubo's name
        #: The latest publications' CIDs, newest last.
        self.recent: list[str] = []
        self._key_ready = False
        #: A running node's bitswap and DHT (set by the membership once its host is up):
        #: how CIDs and names are fetched and resolved without a daemon.
        self.network: BlockNetwork | None = None
        #: A CID or name given at start that only peers can supply: loaded once connected.
        self.pending: str | None = None

    @property
    def ipns_name(self) -> str | None:
        """Our IPNS name once a record for it is out: Kubo's key's, else our own (signed by
        the node's key and put in the DHT, dllm_p2p.registry.exchange)."""
        if self.kubo is not None:
            return self._kubo_name
        named = getattr(self.network, "named", None)
        return getattr(self.network, "name", None) if named else None

    @property
    def mode(self) -> str:
        return "kubo" if self.kubo is not None else "embedded"

    @classmethod
    async def open(cls, data_dir: str | Path, ipfs_api: str | None) -> "Publisher":
        """Use Kubo at ``ipfs_api`` (must answer), or at the default URL when it answers,
        else the embedded store."""
        url = ipfs_api or DEFAULT_API_URL
        kubo = KuboClient(url, timeout=30.0)
        if await kubo.is_available(timeout=1.0 if ipfs_api is None else 5.0):
            return cls(data_dir, kubo)
        await kubo.aclose()
        if ipfs_api is not None:
            raise IpfsError(f"no Kubo RPC API answers at {ipfs_api}")
        return cls(data_dir, None)

    def describe(self) -> str:
        if self.kubo is not None:
            return f"IPFS: Kubo at {self.kubo.api_url} (pinned, IPNS key {self.ipns_key!r})"
        return (
            "IPFS: no daemon; embedded store (same CIDs as Kubo), blocks served over bitswap, "
            "provider records and IPNS on the network's DHT"
        )

    async def load(self, source: str) -> Chain:
        """The verified chain ``source`` names (see :func:`load_source`)."""
        return await load_source(source, self)

    async def publish(self, chain: Chain) -> str:
        """Add the chain's folder; write and return its CID. File and block writes (with
        fsync) run in a thread, off the event loop."""
        folder = self.data_dir / "publish"
        cid = await trio.to_thread.run_sync(self._add_embedded, folder, chain)
        if self.kubo is not None:
            kubo_cid = await self.kubo.add_directory(folder, pin=True)
            if kubo_cid != cid:
                log.warning("Kubo computed %s for the registry, the embedded store %s", kubo_cid, cid)
            cid = kubo_cid
        self.cid, self.published_at = cid, time.time()
        await trio.to_thread.run_sync(write_atomic, self.data_dir / CID_FILE, (cid + "\n").encode())
        await trio.to_thread.run_sync(self.save_state)
        return cid

    def save_state(self) -> None:
        """Write ``publication.json`` (what ``state`` says); a failure is logged, not raised."""
        try:
            write_atomic(self.data_dir / STATE_FILE, (json.dumps(self.state(), indent=1, sort_keys=True) + "\n").encode())
        except OSError as exc:
            log.warning("could not write %s: %s", self.data_dir / STATE_FILE, exc)

    def state(self) -> dict[str, Any]:
        """The last publication and the IPNS name: which CID, since when, and through
        what (``ipns_via``: ``kubo``, ``dht`` (our own records on the network's DHT,
        which dllm nodes resolve but public IPFS gateways do not), or ``off``)."""
        named = self._kubo_named if self.kubo is not None else getattr(self.network, "named", None)
        via = "kubo" if self.kubo is not None else "dht" if self.network is not None else "off"
        return {
            "cid": self.cid, "published_at": self.published_at, "mode": self.mode,
            "ipns": self.ipns_name, "ipns_cid": named[0] if named else None, "ipns_at": named[1] if named else None,
            "ipns_via": via,
        }

    def _add_embedded(self, folder: Path, chain: Chain) -> str:
        """Always add to the embedded store (it lets us serve and check the CID locally),
        then drop the blocks of all but the last ``KEEP_PUBLICATIONS`` publications and
        those the DHT points to (``network.pinned``)."""
        write_atomic(folder / FILENAME, chain.to_json().encode())
        cid = self.store.add_directory(folder)
        self.recent = [c for c in self.recent if c != cid][-(KEEP_PUBLICATIONS - 1):] + [cid]
        # Also keep what the DHT was told we hold: our provider record's and our name's CID.
        self.store.collect_garbage([*self.recent, *getattr(self.network, "pinned", ())])
        return cid

    async def publish_name(self) -> str | None:
        """Point our IPNS name at the current CID (Kubo only). Returns the name."""
        if self.kubo is None or self.cid is None:
            return None
        if not self._key_ready:
            if self.ipns_key not in {k.name for k in await self.kubo.key_list()}:
                await self.kubo.key_gen(self.ipns_key)
            self._key_ready = True
        self._kubo_name = await self.kubo.name_publish(self.cid, key=self.ipns_key)
        self._kubo_named = (self.cid, time.time())
        await trio.to_thread.run_sync(self.save_state)
        return self._kubo_name

    async def aclose(self) -> None:
        if self.kubo is not None:
            await self.kubo.aclose()


async def load_source(source: str, publisher: Publisher | None = None) -> Chain:
    """The verified chain that ``source`` names: a file or folder, a CID or ``/ipfs/``
    path, or an ``/ipns/`` name (through Kubo, else the running node's DHT). Raises
    ``InvalidChain`` or ``IpfsError``."""
    data = await resolve_source(
        source,
        kubo=publisher.kubo if publisher else None,
        store=publisher.store if publisher else None,
        network=publisher.network if publisher else None,
    )
    return verify_chain(data)
