"""What each API key spent: the gateway pays workers from its own ledger and charges
the key (or ``public`` when the gateway takes no keys) that asked. Kept in
``<data-dir>/accounts.json``, written atomically after every charge."""

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
        self._lock = trio.Lock()
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

    async def charge(self, account: str, amount_mc: int) -> None:
        async with self._lock:  # writes land in order
            entry = self.spent.get(account)
            if entry is None:
                if len(self.spent) >= MAX_ACCOUNTS:
                    account, entry = "other", self.spent.setdefault("other", {"spent_mc": 0, "requests": 0})
                else:
                    entry = self.spent[account] = {"spent_mc": 0, "requests": 0}
            entry["spent_mc"] += int(amount_mc)
            entry["requests"] += 1
            data = (json.dumps(self.spent, indent=1, sort_keys=True) + "\n").encode()
            try:
                await trio.to_thread.run_sync(write_atomic, self.path, data)
            except OSError as exc:
                log.warning("could not write %s: %s", self.path, exc)

    def describe(self) -> dict[str, dict[str, int]]:
        return {k: dict(v) for k, v in self.spent.items()}
