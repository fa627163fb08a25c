"""A throw-away network of Linux network namespaces, so tests can put NAT, LANs and pulled
cables between real processes without touching the machine's own network.

Every host, router and switch is a namespace named ``dllmt<pid>-<bed>-<name>``; switches are
bridges in namespaces of their own, cabled with veth pairs created directly inside the
namespaces, so the root namespace's interfaces, routes and firewall are never touched.
Addresses come only from the documentation ranges, and no namespace has a way out.

A topology is text: statements separated by newlines or ``;``, ``#`` starts a comment.

    switch NAME            a bridge of the "internet"; public hosts get 203.0.113.x/24
    link NAME SW1 SW2      a cable joining two switches, cut()/heal() by NAME (no loops: no STP)
    router NAME SW [ADDR]  home router: WAN ADDR on switch SW; behind it a LAN bridge with
                           192.0.2.0/24 (router .1, reused by every router: LANs are isolated),
                           MASQUERADE out, only ESTABLISHED,RELATED in, nothing else in
    lan NAME               a plain LAN without router, 198.51.100.0/24, multicast (mDNS) works
    host NAME AT [ADDR]    a host on switch, lan or router (= on its LAN, default route via it)

ADDR defaults to the next free .10, .11, ... (public addresses are unique over all switches).
Names are ``[A-Za-z0-9_-]+``; a host's or router's uplink is the link named after it.
For example, a worker behind a home router, a public relay and a public gateway::

    with Netbed("switch inet; host relay inet; host gw inet; router home inet; host worker home") as bed:
        bed.run("worker", [sys.executable, "-c", "..."])
        bed.addr("worker"), bed.addr("home")  # '192.0.2.10', '203.0.113.12'
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_beds = itertools.count()
_NETS = {"switch": "203.0.113", "lan": "198.51.100", "router": "192.0.2"}
# A home router: NAT that keeps ports where it can and lets in only replies (port-restricted cone).
_ROUTER_RULES = """*nat
-A POSTROUTING -o wan -j MASQUERADE
COMMIT
*filter
:FORWARD DROP [0:0]
-A INPUT -i wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -i wan -j DROP
-A FORWARD -i lan -o wan -j ACCEPT
-A FORWARD -i wan -o lan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
COMMIT
"""


class NetbedError(RuntimeError):
    """A command building or tearing down the bed failed; the message carries its stderr."""


def sh(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, **kw: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run capturing text output, whose error shows stderr rather than just an exit code."""
    if "stdout" not in kw and "stderr" not in kw:
        kw["capture_output"] = True
    kw.setdefault("stdin", None if "input" in kw else subprocess.DEVNULL)
    kw.setdefault("text", True)
    try:
        return subprocess.run(list(argv), check=check, timeout=timeout, **kw)
    except subprocess.CalledProcessError as e:
        raise NetbedError(f"{shlex.join(argv)}: exit {e.returncode}: {e.stderr or ''}".strip()) from None


def in_netns(ns: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
    """Run fn in a fresh thread that has joined namespace ns, and return its result.

    Python 3.11 has no os.setns, and setns(CLONE_NEWNET) moves only the calling thread: a
    throw-away thread leaves the rest of the process where it was. A socket fn creates
    belongs to ns for its whole life, whichever thread uses it afterwards.
    """
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            with open(f"/run/netns/{ns}") as f:
                if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}: {os.strerror(ctypes.get_errno())}")
            box["result"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"in_netns({ns}) still running after {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def set_sysctl(ns: str, key: str, value: str) -> None:
    """Write /proc/sys/KEY of ns: /proc/sys/net shows the namespace of the thread that opens it."""

    def write() -> None:
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)

    in_netns(ns, write)


def remove_netns(ns: str) -> None:
    """Kill what still runs in ns (a deleted namespace lives on in its processes), then delete it."""
    for pid in sh(["ip", "netns", "pids", ns], check=False).stdout.split():
        if int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    sh(["ip", "netns", "del", ns])


def reap_stale() -> None:
    """Delete the namespaces of earlier runs whose creating process died without cleaning up."""
    for line in sh(["ip", "netns", "list"]).stdout.splitlines():
        m = re.match(r"(dllmt(\d+)-\S*)", line)
        if m and not os.path.exists(f"/proc/{m[2]}"):
            with contextlib.suppress(NetbedError):  # another run may be reaping it right now
                remove_netns(m[1])


def require_netns() -> None:
    """Skip the calling test, saying why, unless this machine can build a bed."""
    if os.geteuid() != 0:
        pytest.skip("netbed needs root (network namespaces, veth, iptables)")
    for tool in ("ip", "iptables", "iptables-restore"):
        if shutil.which(tool) is None:
            pytest.skip(f"netbed needs `{tool}` on PATH")
    ns = f"dllmt{os.getpid()}-probe"
    try:
        sh(["ip", "netns", "add", ns])
    except (NetbedError, OSError) as e:
        pytest.skip(f"`ip netns add` fails here: {e}")
    try:
        sh(["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "MASQUERADE"])
    except NetbedError as e:
        pytest.skip(f"no NAT inside network namespaces here: {e}")
    finally:
        remove_netns(ns)


@dataclass
class _Link:
    ends: list[tuple[str, str]]  # (namespace, interface)
    routes: list[tuple[str, list[str]]] = field(default_factory=list)  # Linux drops these on link down


class Netbed:
    """A topology (see the module docstring), built on creation and removed by close().

    Use it as a context manager; an atexit hook removes beds that were never closed.
    """

    def __init__(self, spec: str) -> None:
        self._prefix = f"dllmt{os.getpid()}-{next(_beds)}-"
        self._nss: list[str] = []
        self._kind: dict[str, str] = {}
        self._addr: dict[str, str] = {}
        self._links: dict[str, _Link] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._forwards: list[_Forward] = []
        self._ports = itertools.count()
        self._ends: list[tuple[str, str]] = []
        self._free = {"": itertools.count(10)}  # next host number per network ("" = public)
        self._closed = False
        atexit.register(self.close)
        try:
            reap_stale()
            for stmt in re.split(r"[;\n]", spec):
                if words := stmt.split("#")[0].split():
                    self._build(*words)
            self._wait_up(self._ends)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Netbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self, kind: str, name: str = "", *args: str) -> None:
        wanted = {"switch": (), "lan": (), "link": ("switch", "switch"), "router": ("switch",), "host": ("switch|lan|router",)}
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in self._kind:
            raise ValueError(f"bad or duplicate name {name!r} in: {kind} {name}")
        if kind not in wanted or not len(wanted[kind]) <= len(args) <= len(wanted[kind]) + (kind in ("router", "host")):
            raise ValueError(f"bad statement: {kind} {name} {' '.join(args)}")
        for want, at in zip(wanted[kind], args):
            if self._kind.get(at) not in want.split("|"):
                raise ValueError(f"{kind} {name}: {at!r} is no {want.replace('|', ' or ')}")
        if kind in ("switch", "lan"):
            self._bridge(name)
            self._free[name] = itertools.count(10)
        elif kind == "link":
            self._links[name] = self._cable(self._ns(args[0]), self._ns(args[1]), f"p{next(self._ports)}", bridged=True)
        else:
            self._host(name, args[0], "wan" if kind == "router" else "eth0", args[1] if args[1:] else None)
        if kind == "router":
            ns = self._ns(name)
            self._bridge(f"{name}.lan")  # its own namespace: FORWARD DROP must not see LAN-internal frames
            self._cable(self._ns(f"{name}.lan"), ns, "lan")
            sh(["ip", "-n", ns, "addr", "add", "192.0.2.1/24", "dev", "lan"])
            set_sysctl(ns, "net/ipv4/ip_forward", "1")
            sh(["ip", "netns", "exec", ns, "iptables-restore"], input=_ROUTER_RULES)
            self._free[name] = itertools.count(10)
        self._kind[name] = kind

    def _ns(self, name: str) -> str:
        return self._prefix + name

    def _new_ns(self, name: str) -> str:
        ns = self._ns(name)
        sh(["ip", "netns", "add", ns])
        self._nss.append(ns)
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def _bridge(self, name: str) -> None:
        """A switch: no STP delay, no IGMP snooping (no querier here, so multicast must just flood)."""
        ns = self._new_ns(name)
        sh(["ip", "-n", ns, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "mcast_snooping", "0"])
        sh(["ip", "-n", ns, "link", "set", "br0", "up"])
        if os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):  # br_netfilter is loaded
            set_sysctl(ns, "net/bridge/bridge-nf-call-iptables", "0")  # a switch has no firewall

    def _cable(self, switch_ns: str, other_ns: str, ifname: str, bridged: bool = False) -> _Link:
        """A veth from a new port of switch_ns's bridge to ifname in other_ns (a port of its bridge if bridged)."""
        port = f"p{next(self._ports)}"  # interface names: at most 15 characters
        sh(["ip", "-n", switch_ns, "link", "add", port, "type", "veth", "peer", "name", ifname, "netns", other_ns])
        sh(["ip", "-n", switch_ns, "link", "set", port, "master", "br0", "up"])
        if bridged:
            sh(["ip", "-n", other_ns, "link", "set", ifname, "master", "br0"])
        sh(["ip", "-n", other_ns, "link", "set", ifname, "up"])
        self._ends += [(switch_ns, port), (other_ns, ifname)]
        return _Link([(switch_ns, port), (other_ns, ifname)])

    def _wait_up(self, ends: list[tuple[str, str]], timeout: float = 5.0) -> None:
        """Wait until every end is operationally UP: until the kernel's linkwatch has run for a
        device (up to 1 s late, e.g. when a veth's ifindex equals its peer's), it drops packets."""
        deadline, pending = time.monotonic() + timeout, set(ends)
        while True:
            for ns in {ns for ns, _ in pending}:
                up = re.findall(r"^\d+: ([^:@]+)\S*: .* state UP ", sh(["ip", "-n", ns, "-o", "link"]).stdout, re.M)
                pending -= {(ns, ifname) for ifname in up}
            if not pending:
                return
            if time.monotonic() > deadline:
                raise NetbedError(f"links still down after {timeout} s: {sorted(pending)}")
            time.sleep(0.02)  # poll interval; the loop is bounded by the deadline

    def _host(self, name: str, at: str, ifname: str, addr: str | None) -> None:
        kind = self._kind[at]
        addr = addr or f"{_NETS[kind]}.{next(self._free['' if kind == 'switch' else at])}"
        if not addr.startswith(_NETS[kind] + "."):
            raise ValueError(f"{name}: {addr} is not in {_NETS[kind]}.0/24")
        ns = self._new_ns(name)
        link = self._cable(self._ns(f"{at}.lan" if kind == "router" else at), ns, ifname)
        sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifname])
        if ifname == "eth0":  # without a route, multicast send and join fail where there's no default route
            link.routes.append((ns, ["224.0.0.0/4", "dev", "eth0"]))
        if kind == "router":
            link.routes.append((ns, ["default", "via", "192.0.2.1", "dev", "eth0"]))
        for rns, route in link.routes:
            sh(["ip", "-n", rns, "route", "replace", *route])
        self._addr[name], self._links[name] = addr, link

    def addr(self, host: str) -> str:
        """The host's address (a router's: its WAN address)."""
        return self._addr[host]

    def netns(self, name: str) -> str:
        """The namespace of a host, router or switch."""
        if name not in self._kind:
            raise KeyError(name)
        return self._ns(name)

    def namespaces(self) -> list[str]:
        return list(self._nss)

    def links(self) -> list[str]:
        return sorted(self._links)

    def prefix(self, host: str) -> list[str]:
        """The argv prefix that runs a command inside host (for helpers that launch their own)."""
        return ["ip", "netns", "exec", self.netns(host)]

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv in host, in a process group of its own so close() kills it with its children."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen([*self.prefix(host), *argv], start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def run(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run argv in host to completion, like sh(): check=True, text output captured, 30 s timeout."""
        return sh([*self.prefix(host), *argv], **kw)

    def in_netns(self, host: str, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """in_netns() for a host of this bed, e.g. to make a socket inside it."""
        return in_netns(self.netns(host), fn, timeout)

    def forward(self, host: str, port: int, target: str | None = None) -> int:
        """A port on 127.0.0.1 of the root namespace that relays TCP to (target or host's address, port) in host."""
        fwd = _Forward(self.netns(host), (target or self.addr(host), port))
        self._forwards.append(fwd)
        return fwd.port

    def cut(self, link: str) -> None:
        for ns, ifname in self._links[link].ends:
            sh(["ip", "-n", ns, "link", "set", ifname, "down"])

    def heal(self, link: str) -> None:
        """Bring both ends up, and restore the routes Linux deleted when the link went down."""
        for ns, ifname in self._links[link].ends:
            sh(["ip", "-n", ns, "link", "set", ifname, "up"])
        self._wait_up(self._links[link].ends)
        for ns, route in self._links[link].routes:
            sh(["ip", "-n", ns, "route", "replace", *route])

    def close(self) -> None:
        """Stop forwards and processes, delete every namespace; safe to call again."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for fwd in self._forwards:
            fwd.close()
        for proc in self._procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=2)
            except ProcessLookupError:
                proc.poll()
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        errors = []
        for ns in reversed(self._nss):  # also kills whatever else runs there
            try:
                remove_netns(ns)
            except NetbedError as e:
                errors.append(str(e))
        if errors:
            raise NetbedError("; ".join(errors))


class _Forward:
    """Listens on 127.0.0.1 in the root namespace and connects each client through to target in ns."""

    def __init__(self, ns: str, target: tuple[str, int]) -> None:
        self._ns, self._target = ns, target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._serve, name=f"forward-{self.port}", daemon=True).start()

    def _serve(self) -> None:
        while True:  # until close() shuts the listener down
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = in_netns(self._ns, lambda: socket.create_connection(self._target, timeout=5))
            except OSError:
                client.close()  # the client sees a refused upstream as an immediate EOF
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            if self._closed:
                self.close()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        back = threading.Thread(target=_pump, args=(b, a), daemon=True)
        back.start()
        _pump(a, b)
        back.join()
        with self._lock:
            self._socks -= {a, b}
        a.close()
        b.close()

    def close(self) -> None:
        with self._lock:
            self._closed, socks = True, [self._listener, *self._socks]
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked in accept() and recv()
        self._listener.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src to dst until EOF (or a close), then pass the EOF on."""
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
