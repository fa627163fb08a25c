"""The CID relay (dllm_p2p/registry/sinks.py): ``--publish-to`` parsing, the git sink
against a local bare repository, the webhook against a local HTTP server, the DNSLink
zone file, failures that are counted and never raised, and one real worker pushing its
CID to a bare repository."""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from dllm_p2p.identity import generate, peer_id_for, verify
from dllm_p2p.registry.chain import canonical
from dllm_p2p.registry.sinks import (
    CID_DOMAIN,
    SinkSpecError,
    Sinks,
    parse_sink,
    parse_sinks,
    signed_document,
    verify_document,
)

CID_A = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"
CID_B = "QmRf22bZar3WKmojipms22PkXH1MZGmvsqzQtuSvQE3uhm"
CID_C = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"

IDENTITY = generate()


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True, timeout=30).stdout


def bare_repo(path: Path, branch: str = "main") -> Path:
    git("init", "--quiet", "--bare", f"--initial-branch={branch}", str(path))
    return path


async def until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    """Poll in-process state (a sink's status) until ``predicate()``, bounded by ``timeout``."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, target, name",
    [
        ("git+file:///srv/registry.git", "git", "file:///srv/registry.git", None),
        ("git+ssh://git@example.org/dllm/registry.git", "git", "ssh://git@example.org/dllm/registry.git", None),
        ("git+https://example.org/dllm/registry.git", "git", "https://example.org/dllm/registry.git", None),
        ("https://hooks.example.org/cid?token=x", "webhook", "https://hooks.example.org/cid?token=x", None),
        ("http://127.0.0.1:8000/hook", "webhook", "http://127.0.0.1:8000/hook", None),
        ("dnslink:/etc/bind/dllm.zone", "dnslink", "/etc/bind/dllm.zone", None),
        ("dnslink:/etc/bind/dllm.zone?name=Example.org.", "dnslink", "/etc/bind/dllm.zone", "example.org"),
        ("  dnslink:///var/zone  ", "dnslink", "/var/zone", None),
    ],
)
def test_good_specs_parse(text: str, kind: str, target: str, name: str | None) -> None:
    spec = parse_sink(text)
    assert (spec.kind, spec.target, spec.name) == (kind, target, name)
    assert spec.spec == text.strip()


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "no sink given"),
        ("ftp://example.org/x", "unknown sink"),
        ("/srv/registry.git", "git+file:///PATH"),
        ("file:///srv/registry.git", "git+file:///PATH"),
        ("git+file://srv/registry.git", "absolute path"),
        ("git+file:///", "no repository path"),
        ("git+ftp://example.org/x.git", "a git sink is"),
        ("git+https:///x.git", "no host"),
        ("https://", "needs a URL with a host"),
        ("http://example.org:99999/hook", "valid port"),
        ("dnslink:zone.txt", "absolute"),
        ("dnslink:/var/zones/", "absolute"),
        ("dnslink:/var/zone?ttl=5", "only option"),
        ("dnslink:/var/zone?name=a&name=b", "only option"),
        ("dnslink:/var/zone?name=bad..name", "not a domain name"),
        ("dnslink:/var/zone?name=sp ace.org", "not a domain name"),
    ],
)
def test_bad_specs_are_refused_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(SinkSpecError, match=says.replace("+", r"\+").replace("?", r"\?")):
        parse_sink(text)


def test_repeated_specs_count_once() -> None:
    specs = parse_sinks(["dnslink:/a", "https://h/x", "dnslink:/a"])
    assert [s.spec for s in specs] == ["dnslink:/a", "https://h/x"]


@pytest.mark.parametrize("module", ["dllm_p2p.cli", "gateway.server"])
def test_a_bad_publish_to_exits_2_with_the_message(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    parser = importlib.import_module(module).build_parser()
    argv = ["relay"] if module == "dllm_p2p.cli" else []
    with pytest.raises(SystemExit) as exited:
        parser.parse_args([*argv, "--publish-to", "ftp://example.org/x"])
    assert exited.value.code == 2
    assert "--publish-to: 'ftp://example.org/x': unknown sink" in capsys.readouterr().err
    args = parser.parse_args([*argv, "--publish-to", "dnslink:/z", "--publish-to", "git+file:///r.git"])
    assert [s.kind for s in args.publish_to] == ["dnslink", "git"]


# --- git ----------------------------------------------------------------------------------


def test_git_is_here() -> None:
    assert git("--version").startswith("git version")


async def test_git_sink_commits_each_new_cid_once(tmp_path: Path) -> None:
    bare = bare_repo(tmp_path / "registry.git")
    spec = f"git+file://{bare}"
    sinks = Sinks([spec], IDENTITY, tmp_path / "node")
    status = sinks.status[spec]
    async with trio.open_nursery() as nursery:
        await nursery.start(sinks.run)
        sinks.published(CID_A, "head-a")
        await until(lambda: status["pushed"] == 1, "the first push")
        sinks.published(CID_B, "head-b")
        await until(lambda: status["pushed"] == 2, "the second push")
        sinks.published(CID_B, "head-b")  # the same CID again: nothing to push
        await trio.testing.wait_all_tasks_blocked()
        sinks.published(CID_C, "head-c")
        await until(lambda: status["pushed"] == 3, "the third push")
        nursery.cancel_scope.cancel()
    assert status["failed"] == 0 and status["last_cid"] == CID_C and status["last_ok"]
    log = git("-C", str(bare), "log", "--format=%an <%ae>|%s", "main").splitlines()
    peer = IDENTITY.peer_id.to_base58()
    assert log == [f"dllm-p2p <{peer}>|registry {cid}" for cid in (CID_C, CID_B, CID_A)]
    assert git("-C", str(bare), "show", "main:current_cid.txt") == CID_C + "\n"
    # The clone is the node's own, outside the folder published on IPFS.
    assert list((tmp_path / "node" / "sinks").glob("git-*/HEAD"))
    assert not (tmp_path / "node" / "publish").exists()

    # The CID the branch already holds makes no commit, even from a fresh clone (a
    # restarted node or another node); the other files of the branch are kept.
    again = Sinks([spec], IDENTITY, tmp_path / "other-node")
    assert await trio.to_thread.run_sync(again.sinks[0].push_sync, CID_C) is False
    assert len(git("-C", str(bare), "log", "--format=%H", "main").splitlines()) == 3


async def test_git_sink_follows_the_remote_default_branch_and_keeps_its_files(tmp_path: Path) -> None:
    bare = bare_repo(tmp_path / "registry.git", branch="trunk")
    work = tmp_path / "work"
    git("clone", "--quiet", str(bare), str(work))
    (work / "README").write_text("registry CIDs\n")
    git("-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t", "add", "README")
    git("-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "--quiet", "-m", "readme")
    git("-C", str(work), "push", "--quiet", "origin", "HEAD:trunk")
    sinks = Sinks([f"git+file://{bare}"], IDENTITY, tmp_path / "node")
    assert await trio.to_thread.run_sync(sinks.sinks[0].push_sync, CID_A) is True
    assert git("-C", str(bare), "show", "trunk:current_cid.txt") == CID_A + "\n"
    assert git("-C", str(bare), "show", "trunk:README") == "registry CIDs\n"
    assert git("-C", str(bare), "log", "--format=%s", "trunk").splitlines() == [f"registry {CID_A}", "readme"]


async def test_missing_git_is_logged_once_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = f"git+file://{bare_repo(tmp_path / 'r.git')}"
    sinks = Sinks([spec], IDENTITY, tmp_path / "node", git=str(tmp_path / "no-git-here"))
    status = sinks.status[spec]
    with caplog.at_level(logging.ERROR, logger="dllm_p2p.registry.sinks"):
        async with trio.open_nursery() as nursery:
            await nursery.start(sinks.run)
            sinks.published(CID_A)
            await until(lambda: status["failed"] == 1, "the first failure")
            sinks.published(CID_B)
            await until(lambda: status["failed"] == 2, "the second failure")
            nursery.cancel_scope.cancel()
    assert "git is not installed" in status["last_error"] and status["pushed"] == 0
    assert sum("git is not installed" in r.getMessage() for r in caplog.records) == 1


# --- webhook ------------------------------------------------------------------------------


class Hook:
    """An HTTP server on 127.0.0.1 in a thread: answers 500 to the first ``fail`` POSTs
    (or while ``failing`` is set), then 204; keeps every document it got."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.failing = threading.Event()
        self.received: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.received.append(doc)
                refuse = hook.failing.is_set() or len(hook.received) <= hook.fail
                if not refuse:
                    hook.accepted.append(doc)
                self.send_response(500 if refuse else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cid"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Hook":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_webhook_retries_and_delivers_a_signed_document() -> None:
    with Hook(fail=1) as hook:
        sinks = Sinks([hook.url], IDENTITY, "/nonexistent", first_delay=0.05)
        status = sinks.status[hook.url]
        async with trio.open_nursery() as nursery:
            await nursery.start(sinks.run)
            sinks.published(CID_A, "ab" * 32)
            await until(lambda: status["pushed"] == 1, "the delivery")
            nursery.cancel_scope.cancel()
    assert len(hook.received) == 2 and status["failed"] == 1 and "500" in status["last_error"]
    doc = hook.accepted[0]
    assert doc == hook.received[0]  # the retry sends the same document
    assert set(doc) == {"cid", "peer_id", "time", "head", "public_key", "signature"}
    assert doc["cid"] == CID_A and doc["head"] == "ab" * 32 and isinstance(doc["time"], int)
    # What a receiver does: the key gives the peer id, and the signature verifies.
    key = base64.b64decode(doc["public_key"])
    assert key == IDENTITY.public_key_bytes and peer_id_for(key) == doc["peer_id"] == IDENTITY.peer_id.to_base58()
    body = {k: v for k, v in doc.items() if k != "signature"}
    assert verify(key, CID_DOMAIN + canonical(body), base64.b64decode(doc["signature"]))
    assert verify_document(doc)
    assert not verify_document({**doc, "cid": CID_B})
    assert not verify_document({**signed_document(generate(), CID_A), "public_key": doc["public_key"]})


async def test_a_newer_cid_supersedes_one_being_retried() -> None:
    with Hook() as hook:
        hook.failing.set()
        sinks = Sinks([hook.url], IDENTITY, "/nonexistent", first_delay=30)
        status = sinks.status[hook.url]
        async with trio.open_nursery() as nursery:
            await nursery.start(sinks.run)
            sinks.published(CID_A)
            await until(lambda: status["failed"] == 1, "the first failure")  # now waiting 30 s to retry
            hook.failing.clear()
            sinks.published(CID_B)
            await until(lambda: status["pushed"] == 1, "the newer CID")
            nursery.cancel_scope.cancel()
    assert [d["cid"] for d in hook.accepted] == [CID_B] and status["last_cid"] == CID_B


# --- DNSLink ------------------------------------------------------------------------------


async def test_dnslink_writes_the_record_and_keeps_the_other_lines(tmp_path: Path) -> None:
    zone = tmp_path / "dllm.zone"
    zone.write_text("$ORIGIN example.org.\n@ 3600 IN A 192.0.2.1\n_dnslink 60 IN TXT \"dnslink=/ipfs/old\"\nwww 3600 IN CNAME @\n")
    named = tmp_path / "named.zone"
    sinks = Sinks([f"dnslink:{zone}", f"dnslink:{named}?name=registry.example.org"], IDENTITY, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(sinks.run)
        sinks.published(CID_A)
        await until(lambda: all(s["last_cid"] == CID_A for s in sinks.status.values()), "the zone files")
        sinks.published(CID_B)
        await until(lambda: all(s["last_cid"] == CID_B for s in sinks.status.values()), "the zone files")
        nursery.cancel_scope.cancel()
    assert zone.read_text() == (
        f'$ORIGIN example.org.\n@ 3600 IN A 192.0.2.1\n_dnslink 60 IN TXT "dnslink=/ipfs/{CID_B}"\nwww 3600 IN CNAME @\n'
    )
    assert named.read_text() == f'_dnslink.registry.example.org. 60 IN TXT "dnslink=/ipfs/{CID_B}"\n'
    assert [s["pushed"] for s in sinks.status.values()] == [2, 2]


# --- failures -----------------------------------------------------------------------------


async def test_sinks_that_cannot_deliver_are_counted_and_never_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    specs = [f"dnslink:{blocker}/zone", dead, f"git+file://{tmp_path}/no-such-repo.git"]
    sinks = Sinks(specs, IDENTITY, tmp_path / "node", tries=2, first_delay=0.01, timeout=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(sinks.run)
        sinks.published(CID_A)
        await until(lambda: all(s["failed"] == 2 for s in sinks.status.values()), "two failed tries each", timeout=20)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # still running: nothing escaped
    for spec in specs:
        status = sinks.status[spec]
        assert status["pushed"] == 0 and status["last_cid"] is None and status["last_error"], (spec, status)
    assert "cannot write" in sinks.status[specs[0]]["last_error"]
    assert "git clone failed" in sinks.status[specs[2]]["last_error"]


# --- a real worker ------------------------------------------------------------------------


@pytest.mark.integration
def test_a_worker_pushes_its_cid_to_a_git_repository(tmp_path: Path) -> None:
    from tests.procs import start_worker, wait_for

    bare = bare_repo(tmp_path / "registry.git")
    data_dir = tmp_path / "worker"
    worker, _ = start_worker(data_dir, "--publish-to", f"git+file://{bare}", "--pow-bits", "8", "--no-mdns", timeout=120)
    try:
        peer = worker.wait_for_line(r"^peer id (\w+)", stream="err").group(1)

        def pushed() -> bool:
            if not worker.alive():
                raise AssertionError(f"the worker exited\n{worker.output()}")
            try:
                local = (data_dir / "current_cid.txt").read_text()
            except FileNotFoundError:
                return False
            remote = subprocess.run(
                ["git", "-C", str(bare), "show", "main:current_cid.txt"], capture_output=True, text=True, timeout=30
            ).stdout
            return bool(local.strip()) and remote == local

        wait_for(pushed, 60, "the worker's CID in the bare repository")
        log = git("-C", str(bare), "log", "--format=%an <%ae>|%s", "main").splitlines()
        cid = (data_dir / "current_cid.txt").read_text().strip()
        assert log[0] == f"dllm-p2p <{peer}>|registry {cid}"
    finally:
        worker.stop()
