"""Check what our nodes serve with an independent IPFS implementation: Helia, in Node.js.

The scripts live in ``tests/helia/`` (pinned in its package.json and package-lock.json);
``make test`` installs them with ``npm ci`` when npm is on PATH. Each prints one JSON line
``{"ok": true, ...}`` and exits 0, or prints one line on stderr and exits non-zero.

    from tests.helia import run_helia, run_helia_failing, skip_unless_helia

    def test_served_file(tmp_path, node):
        skip_unless_helia()
        out = tmp_path / "blockchain.json"
        result = run_helia("fetch.mjs", "--peer", node.multiaddr, "--cid", root, "--path",
                           "blockchain.json", "--out", str(out), "--timeout", "20", timeout=30)
        assert out.read_bytes() == expected and result["bytes"] == len(expected)
        car = run_helia("car-verify.mjs", str(car_path), "--root", root, "--path", "blockchain.json")
        assert car["file_sha256"] == hashlib.sha256(expected).hexdigest()
        err = run_helia_failing("ipns-validate.mjs", "--name", name, "--record", str(bad_record))
        assert "not valid" in err

``fetch.mjs`` writes the fetched bytes to stdout when it has no ``--out``, so always pass
``--out`` through ``run_helia``. Give ``--timeout`` (the script's own bound, in seconds) below
``timeout`` (this module's kill bound), so a slow fetch fails with the script's message.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

HELIA_DIR = Path(__file__).resolve().parent / "helia"
_INSTALLED = HELIA_DIR / "node_modules" / ".installed"

SKIP_REASON = "Helia harness not installed: run `make test` (needs node and npm)"


def node_path() -> str | None:
    return shutil.which("node")


def helia_ready() -> bool:
    """True when node is on PATH and ``make test`` has installed tests/helia/node_modules."""
    return node_path() is not None and _INSTALLED.exists()


def skip_unless_helia() -> None:
    """``pytest.skip`` with a clear reason when the harness can't run here."""
    import pytest

    if not helia_ready():
        pytest.skip(SKIP_REASON)


def helia_command(script: str, *args: str) -> list[str]:
    """The command line that runs ``tests/helia/<script> args...`` (for Popen, e.g. serve.mjs)."""
    node = node_path()
    if node is None:
        raise RuntimeError(SKIP_REASON)
    return [node, str(HELIA_DIR / script), *map(str, args)]


def _run(script: str, args: tuple[str, ...], timeout: float) -> subprocess.CompletedProcess[str]:
    command = helia_command(script, *args)
    try:
        return subprocess.run(
            command, cwd=HELIA_DIR, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise AssertionError(f"{script} did not finish within {timeout}s: {' '.join(command)}\n{stderr}") from None


def run_helia(script: str, *args: str, timeout: float = 60) -> dict:
    """Run a harness script; its parsed JSON result, or AssertionError with its stderr."""
    proc = _run(script, args, timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise AssertionError(f"{script} printed no JSON result: {proc.stdout!r} {proc.stderr!r}") from None
    assert result.get("ok") is True, result
    return result


def run_helia_failing(script: str, *args: str, timeout: float = 60) -> str:
    """Run a harness script that must fail; its stderr (the one-line reason)."""
    proc = _run(script, args, timeout)
    if proc.returncode == 0:
        raise AssertionError(f"{script} {' '.join(args)} succeeded but should have failed: {proc.stdout.strip()}")
    return proc.stderr.strip()
