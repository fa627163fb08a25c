"""Proves tests/netbed.py with real sockets: public TCP, NAT out but not in, isolated home
LANs, mDNS-style multicast on a plain LAN, cut/heal, forward(), and cleanup on every exit."""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .netbed import Netbed, require_netns

pytestmark = pytest.mark.integration

TOPOLOGY = """
switch inet; switch far; link backbone inet far
host relay inet; host gw inet; host remote far
router home1 inet; host w1 home1
router home2 inet; host w2 home2
lan office; host a office; host b office; host c office
"""
# The topologies of netbed's documentation, each a one-liner.
EXAMPLES = {
    "worker behind a home router, public relay and gateway": "switch inet; host relay inet; host gw inet; router home inet; host worker home",
    "two hosts behind their own routers, public relay": "switch inet; host relay inet; router r1 inet; host w1 r1; router r2 inet; host w2 r2",
    "five hosts on two switches joined by a cuttable link": "switch s1; switch s2; link trunk s1 s2; host h1 s1; host h2 s1; host h3 s1; host h4 s2; host h5 s2",
    "three hosts on a plain LAN": "lan home; host a home; host b home; host c home",
}
MDNS = ("224.0.0.251", 5353)
CLIENT = "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3); s.sendall(b'hi'); print(s.getsockname()[0])"


@pytest.fixture(scope="module", autouse=True)
def _netns_ok() -> None:
    require_netns()


@pytest.fixture(scope="module")
def bed() -> Iterator[Netbed]:
    with Netbed(TOPOLOGY) as b:
        yield b


def listen(bed: Netbed, host: str, port: int, bind: str | None = None) -> socket.socket:
    """A TCP listener inside host (on its address unless bind says otherwise), accept timeout 3 s."""
    srv = bed.in_netns(host, lambda: socket.create_server((bind or bed.addr(host), port)))
    srv.settimeout(3)
    return srv


def connect(bed: Netbed, host: str, addr: str, port: int, timeout: float = 3.0) -> socket.socket | OSError:
    """Connect from inside host; the error instead of a socket when it fails."""
    try:
        return bed.in_netns(host, lambda: socket.create_connection((addr, port), timeout=timeout))
    except OSError as e:
        return e


def nothing_accepted(srv: socket.socket) -> bool:
    srv.settimeout(0.2)
    try:
        srv.accept()[0].close()
    except TimeoutError:
        return True
    return False


def wait_line(proc: subprocess.Popen[bytes], needle: bytes, timeout: float = 5.0) -> bytes:
    """Read proc's stdout until a line containing needle has arrived (no sleeping, bounded)."""
    assert proc.stdout is not None
    buf, deadline = b"", time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise TimeoutError(f"no {needle!r} from {proc.args} within {timeout} s; got {buf!r}")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise EOFError(f"{proc.args} exited ({proc.wait()}) before {needle!r}; got {buf!r}")
        buf += chunk
    return buf


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_addresses_and_links(bed: Netbed) -> None:
    assert bed.addr("relay") == "203.0.113.10" and bed.addr("home1").startswith("203.0.113.")
    assert bed.addr("w1") == bed.addr("w2") == "192.0.2.10"  # home LANs reuse one range
    assert bed.addr("a") == "198.51.100.10"
    assert set(bed.links()) == {"backbone", "relay", "gw", "remote", "home1", "w1", "home2", "w2", "a", "b", "c"}


@pytest.mark.parametrize("spec", EXAMPLES.values(), ids=EXAMPLES.keys())
def test_documented_examples_build(spec: str) -> None:
    with Netbed(spec) as bed:
        names = [stmt.split()[1] for stmt in spec.split(";") if stmt.split()[0] in ("host", "router")]
        assert all(bed.addr(n) for n in names)


def test_public_hosts_talk_tcp(bed: Netbed) -> None:
    with listen(bed, "relay", 7101) as srv:
        out = bed.run("gw", [sys.executable, "-c", CLIENT, bed.addr("relay"), "7101"], timeout=10)
        conn, peer = srv.accept()
        with conn:
            assert conn.recv(16) == b"hi"
    assert peer[0] == bed.addr("gw") == out.stdout.strip()


def test_host_behind_router_reaches_out_as_the_router(bed: Netbed) -> None:
    with listen(bed, "relay", 7102) as srv:
        cli = connect(bed, "w1", bed.addr("relay"), 7102)
        assert isinstance(cli, socket.socket), cli
        conn, peer = srv.accept()
        with cli, conn:
            cli.sendall(b"out")
            assert conn.recv(16) == b"out"
            assert cli.getsockname()[0] == "192.0.2.10"
    assert peer[0] == bed.addr("home1")


def forward_drops(bed: Netbed, router: str) -> int:
    """Packets the router's FORWARD policy has dropped so far."""
    out = bed.run(router, ["iptables", "-L", "FORWARD", "-v", "-n", "-x"]).stdout
    return int(re.search(r"policy DROP (\d+) packets", out)[1])


def test_no_unsolicited_inbound_through_router(bed: Netbed) -> None:
    with listen(bed, "w1", 7103, bind="0.0.0.0") as srv:
        assert isinstance(connect(bed, "relay", bed.addr("home1"), 7103, timeout=1), OSError)
        # Even a public host that routes the LAN range to the router gets nothing through.
        bed.run("relay", ["ip", "route", "add", "192.0.2.0/24", "via", bed.addr("home1")])
        dropped = forward_drops(bed, "home1")
        try:
            assert isinstance(connect(bed, "relay", bed.addr("w1"), 7103, timeout=1), OSError)
        finally:
            bed.run("relay", ["ip", "route", "del", "192.0.2.0/24"])
        assert nothing_accepted(srv)
        assert forward_drops(bed, "home1") > dropped  # the SYN did reach the router, which dropped it


def test_hosts_behind_different_routers_cannot_connect_directly(bed: Netbed) -> None:
    with listen(bed, "w1", 7104, bind="0.0.0.0") as srv:
        # 192.0.2.10 is w2's own address on its own LAN: refused there, never reaches w1.
        assert isinstance(connect(bed, "w2", bed.addr("w1"), 7104, timeout=1), OSError)
        assert isinstance(connect(bed, "w2", bed.addr("home1"), 7104, timeout=1), OSError)
        assert nothing_accepted(srv)


def mdns_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", MDNS[1]))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(MDNS[0]) + socket.inet_aton("0.0.0.0"))
    return s


def test_multicast_reaches_every_host_on_the_plain_lan_only(bed: Netbed) -> None:
    receivers = {h: bed.in_netns(h, mdns_socket) for h in ("b", "c", "relay")}
    sender = bed.in_netns("a", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        sender.sendto(b"mdns?", MDNS)
        for host in ("b", "c"):
            receivers[host].settimeout(3)
            assert receivers[host].recvfrom(64) == (b"mdns?", (bed.addr("a"), sender.getsockname()[1]))
        receivers["relay"].settimeout(0.3)
        with pytest.raises(TimeoutError):
            receivers["relay"].recvfrom(64)
    finally:
        for s in [sender, *receivers.values()]:
            s.close()


@pytest.mark.parametrize("link", ["backbone", "relay"])
def test_cut_breaks_the_path_and_heal_restores_it(bed: Netbed, link: str) -> None:
    with listen(bed, "remote", 7105) as srv:
        for step in ("before", "cut", "healed"):
            if step == "cut":
                bed.cut(link)
            elif step == "healed":
                bed.heal(link)
            got = connect(bed, "relay", bed.addr("remote"), 7105, timeout=1 if step == "cut" else 3)
            if step == "cut":
                assert isinstance(got, OSError), got
                continue
            assert isinstance(got, socket.socket), f"{step}: {got}"
            got.close()
            srv.accept()[0].close()
    assert "224.0.0.0/4" in bed.run("relay", ["ip", "route"]).stdout  # heal() restored the routes


def test_forward_reaches_http_server_in_a_namespace(bed: Netbed, tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello from w1")
    server = bed.popen("w1", [sys.executable, "-u", "-m", "http.server", "8080", "--directory", str(tmp_path)],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_line(server, b"Serving HTTP")
        for target in (None, "127.0.0.1"):  # host's address, and its loopback
            port = bed.forward("w1", 8080, target)
            response = httpx.get(f"http://127.0.0.1:{port}/hello.txt", timeout=3)
            assert response.status_code == 200 and response.text == "hello from w1"
    finally:
        server.kill()
        server.wait(timeout=3)
        server.stdout.close()


def test_close_removes_everything_even_when_the_block_raises() -> None:
    spec = "switch s; router r s; host x r; lan l; host y l"
    for exc in (None, KeyboardInterrupt):
        with pytest.raises(exc) if exc else contextlib.nullcontext():
            with Netbed(spec) as bed:
                names = bed.namespaces()
                tracked = bed.popen("x", [sys.executable, "-c", "import time; time.sleep(60)"])
                # A process started with prefix() by some other helper dies with the bed too.
                untracked = subprocess.Popen([*bed.prefix("x"), sys.executable, "-c", "import time; time.sleep(60)"])
                assert set(names) <= netns_names()
                if exc:
                    raise exc
        assert not set(names) & netns_names()
        assert tracked.poll() is not None and untracked.wait(timeout=3) is not None
        bed.close()  # idempotent


def test_bad_spec_raises_and_leaves_nothing() -> None:
    before = netns_names()
    with pytest.raises(ValueError, match="nowhere"):
        Netbed("switch s; host x s; host y nowhere")
    assert netns_names() == before


def test_stale_namespaces_of_dead_runs_are_removed() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"dllmt{dead.pid}-0-stale"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with Netbed("switch s"):
            assert stale not in netns_names()
    finally:
        if stale in netns_names():
            subprocess.run(["ip", "netns", "del", stale], check=True)


def test_atexit_removes_a_bed_that_was_never_closed() -> None:
    code = "from tests.netbed import Netbed; print(' '.join(Netbed('lan l; host x l').namespaces()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, check=True, capture_output=True, text=True, timeout=20)
    names = set(out.stdout.split())
    assert len(names) == 2 and not names & netns_names()
