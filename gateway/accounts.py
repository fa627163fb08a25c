"""What each API key spent: the gateway pays workers from its own ledger and charges
the key (or ``public`` when the gateway takes no keys) that asked. Kept in
``<data-dir>/accounts.json``, written atomically by ``run`` whenever charges came in (not
on the answer's path), and once more when the gateway stops."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import trio

from dllm_p2p.fsutil import write_atomic

log = logging.getLogger("gateway.accounts")

MAX_ACCOUNTS = 10_000


class Accounts:
    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir).expanduser() / "accounts.json"
        self.spent: dict[str, dict[str, int]] = {}
        self._changed = trio.Event()
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self.spent = {
                    str(k): {"spent_mc": int(v["spent_mc"]), "requests": int(v["requests"])}
                    for k, v in data.items() if isinstance(v, dict)
                }
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: %s", self.path, exc)

    def charge(self, account: str, amount_mc: int) -> None:
        entry = self.spent.get(account)
        if entry is None:
            if len(self.spent) >= MAX_ACCOUNTS:
                entry = self.spent.setdefault("other", {"spent_mc": 0, "requests": 0})
            else:
                entry = self.spent[account] = {"spent_mc": 0, "requests": 0}
        entry["spent_mc"] += int(amount_mc)
        entry["requests"] += 1
        self._changed.set()

    def _save(self) -> None:
        write_atomic(self.path, (json.dumps(self.spent, indent=1, sort_keys=True) + "\n").encode())

    async def run(self) -> None:
        """Write the accounts whenever they changed, one write for all charges since the last."""
        try:
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                try:
                    await trio.to_thread.run_sync(self._save)
                except OSError as exc:
                    log.warning("could not write %s: %s", self.path, exc)
        finally:
            if self._changed.is_set():
                try:
                    self._save()
                except OSError as exc:
                    log.warning("could not write %s at exit: %s", self.path, exc)

    def describe(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.spent.items()}
