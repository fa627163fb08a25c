"""``<data-dir>/blockchain.json`` on disk: atomic saves, verified loads.

A chain file is replaced, never rewritten in place (temp file in the same folder, fsync,
rename), so a crash leaves the old chain or the new one, never half of one. A file is
only believed once it verifies: a tampered or damaged file raises, and ``ChainStore``
keeps serving the last chain that did verify.

All of this is blocking file I/O; trio code calls it through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

from pathlib import Path

from dllm_p2p.fsutil import write_atomic
from dllm_p2p.registry.chain import MAX_FILE_BYTES, Chain, InvalidChain, merge, verify_chain

FILENAME = "blockchain.json"


def load_chain(path: str | Path, *, now: float | None = None, clamp: bool = False) -> Chain:
    """Read and verify a chain file (``clamp``: see ``verify_chain``).

    Raises ``OSError`` (``FileNotFoundError`` when absent) or ``InvalidChain``.
    """
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)  # one byte over the limit is enough to refuse
    return verify_chain(data, now=now, clamp=clamp)


def save_chain(path: str | Path, chain: Chain) -> None:
    """Replace ``path`` with ``chain`` atomically (durable once this returns)."""
    write_atomic(path, chain.to_json().encode("ascii"))


def verify_file(path: str | Path, *, now: float | None = None) -> tuple[bool, str]:
    """Verify a chain file for ``registry verify``: ``(ok, one-line message)``.

    An invalid file gives ``"block N: reason"`` (or just the reason when the file as a
    whole is bad).
    """
    try:
        chain = load_chain(path, now=now)
    except InvalidChain as exc:
        return False, str(exc)
    except OSError as exc:
        return False, f"cannot read {path}: {exc.strerror or exc}"
    return True, (
        f"valid: {len(chain.records) + 1} blocks, {len(chain.nodes(now))} live nodes, "
        f"head {chain.head}"
    )


class ChainStore:
    """The chain file in a data folder, and the last chain from it that verified.

    ``chain`` starts as the empty chain and only ever changes to a chain that verified
    (or that this process built), so a bad file on disk can never become the node's view
    of the registry.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir).expanduser() / FILENAME
        self._chain = Chain()

    @property
    def chain(self) -> Chain:
        return self._chain

    def load(self, *, now: float | None = None) -> Chain:
        """Re-read the file. A missing file keeps the current chain; a file that fails
        verification raises ``InvalidChain`` and the current chain is kept."""
        try:
            chain = load_chain(self.path, now=now, clamp=True)  # our own file: a clock set back must not lose it
        except FileNotFoundError:
            return self._chain
        self._chain = chain
        return chain

    def save(self, chain: Chain) -> None:
        save_chain(self.path, chain)
        self._chain = chain

    def merge(self, other: Chain) -> Chain:
        """Merge ``other`` into the held chain, saving only when the head changes."""
        merged = merge(self._chain, other)
        if merged != self._chain:
            self.save(merged)
        return merged
