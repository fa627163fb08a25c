"""``python -m benchmarks.converge``: how a network of relays and workers on one machine
converges on one registry head, and what it costs in steady state.

One run, everything on 127.0.0.1, every process started here and stopped at the end (also
on Ctrl-C, SIGTERM or an error):

1. a seed relay, then ``--relays - 1`` relays bootstrapping to it, started in parallel
   batches of ``--batch`` (each batch waits for its "listening on" lines, bounded);
2. the relays' convergence: every relay data dir holding the same head with every relay's
   record live (bounded by ``--timeout``);
3. ``--workers`` workers (``--model tiny``, one thread each) bootstrapping to the seed;
   **(a)** the time from the last node's start until every data dir holds the same head
   with every node's record live;
4. steady state: two observer processes (this file, run as ``observe``: a py-libp2p host
   with ``Membership(role="observer")``, no record, no heartbeats) join through two
   different relays, wait until they have heard every node's heartbeat (bounded by
   ``--timeout``), then for ``--window`` seconds count **(b)** the gossip they receive and
   send and the heartbeats' delay, while this process measures **(d)** the CPU time and
   memory of every node;
5. **(c)** the registry's size (file bytes, wire bytes, blocks) and a scan of every node's
   log for warnings and errors.

Nothing in 2-4 is fatal: a convergence that times out is reported as such (with a
timeline every 10 s), a wait ends early when the nodes that joined agree and every node
that did not has given up its bootstrap, and a node that exits is recorded (``deaths``)
and left out from then on. Only a node that cannot start, or an observer that exits,
stops the run.

The summary is printed as JSON and written to ``test-artifacts/converge.json``.

The observers are started as ``python benchmarks/converge.py observe ...`` (a script, not
``-m benchmarks.converge``): importing the ``benchmarks`` package loads torch, which an
observer does not need. For the same reason this module imports nothing from the package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (the observers): import dllm_p2p from the repository
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "test-artifacts" / "converge.json"
LISTENING = r"^listening on (/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)"
#: Seconds between two looks at the data dirs, the observers' counters and the processes.
POLL = 1.0


def _log(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the nodes


@dataclass
class Node:
    name: str
    role: str  # "relay" | "worker" | "observer"
    data_dir: Path
    child: Any = None  # dllm_p2p.localnet.Child
    addr: str = ""
    peer_id: str = ""
    spawned_at: float = 0.0  # time.monotonic()
    listening_at: float = 0.0
    proc: Any = None  # psutil.Process

    @property
    def start_seconds(self) -> float:
        return self.listening_at - self.spawned_at


class Network:
    """Every process of one run. ``close()`` stops them all (SIGTERM to all, then wait,
    SIGKILL after ``stop_timeout``)."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self._tmp = tempfile.TemporaryDirectory(prefix="dllm-converge-") if not opts.keep else None
        self.root = Path(self._tmp.name) if self._tmp else Path(tempfile.mkdtemp(prefix="dllm-converge-"))
        self.nodes: list[Node] = []
        self.observers: list[Node] = []
        #: name -> how a node that exited before the end exited (see note_deaths)
        self.deaths: dict[str, dict[str, Any]] = {}

    def env(self) -> dict[str, str]:
        from dllm_p2p.localnet import child_env

        env = child_env()
        env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        return env

    def spawn(self, node: Node, args: list[str]) -> None:
        import psutil

        from dllm_p2p.localnet import Child

        node.spawned_at = time.monotonic()
        node.child = Child(args, name=node.name, env=self.env(), echo=self.opts.verbose)
        try:
            node.proc = psutil.Process(node.child.popen.pid)
        except psutil.Error:
            node.proc = None

    def node_args(self, role: str, data_dir: Path, bootstrap: str | None) -> list[str]:
        o = self.opts
        args = [sys.executable, "-m", "dllm_p2p", role]
        if role == "worker":
            args += ["--model", o.model, "--threads", "1"]
        args += [
            "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(data_dir),
            "--heartbeat-interval", f"{o.heartbeat_interval:g}", "--no-mdns", "--pow-bits", str(o.pow_bits),
        ]
        if o.record_ttl is not None:
            args += ["--record-ttl", f"{o.record_ttl:g}"]
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        return args

    def start_batch(self, role: str, names: list[str], bootstrap: str | None, timeout: float) -> list[Node]:
        """Start ``names`` at once; return them once each printed its address."""
        batch = []
        for name in names:
            node = Node(name, role, self.root / name)
            self.nodes.append(node)  # registered first: close() stops a half-started batch too
            self.spawn(node, self.node_args(role, node.data_dir, bootstrap))
            batch.append(node)
        for node in batch:
            remaining = max(1.0, timeout - (time.monotonic() - node.spawned_at))
            node.addr = node.child.wait_for_line(LISTENING, timeout=remaining).group(1)
            node.listening_at = time.monotonic()
            node.peer_id = node.addr.rsplit("/p2p/", 1)[1]
        return batch

    def start_observer(self, name: str, bootstrap: str, timeout: float) -> Node:
        node = Node(name, "observer", self.root / name)
        self.observers.append(node)
        args = [
            sys.executable, str(Path(__file__).resolve()), "observe", "--bootstrap", bootstrap,
            "--pow-bits", str(self.opts.pow_bits), "--heartbeat-interval", f"{self.opts.heartbeat_interval:g}",
            "--lifetime", str(int(self.opts.timeout + self.opts.window + 600)),
        ]
        self.spawn(node, args)
        node.addr = node.child.wait_for_line(LISTENING, timeout=timeout).group(1)
        node.listening_at = time.monotonic()
        node.peer_id = node.addr.rsplit("/p2p/", 1)[1]
        return node

    def dead(self) -> list[Node]:
        return [n for n in self.nodes + self.observers if n.child is not None and not n.child.alive()]

    def note_deaths(self, since: float) -> None:
        """Record each node that exited (once): when, its exit code and its last error line."""
        for node in self.dead():
            if node.name not in self.deaths:
                errors = [line.strip(" |+-") for line in node.child.stderr if _EXCEPTION.search(line)]
                self.deaths[node.name] = {
                    "role": node.role, "exit_code": node.child.popen.returncode,
                    "seconds_after_last_spawn": round(time.monotonic() - since, 1),
                    "error": (errors or node.child.stderr[-1:] or [""])[-1][:300],
                }
                _log(f"{node.name} exited with {node.child.popen.returncode}: {self.deaths[node.name]['error']}")

    def alive(self, nodes: list[Node]) -> list[Node]:
        return [n for n in nodes if n.child is not None and n.child.alive()]

    def close(self) -> dict[str, Any]:
        """Stop every process; return how they stopped."""
        everyone = [n for n in self.observers + self.nodes if n.child is not None]
        started = time.monotonic()
        for node in everyone:
            node.child.terminate()
        codes: Counter[str] = Counter()
        for node in everyone:
            # Not Child.stop(): it sends SIGTERM again, and a node that already handles one
            # re-raises a second after its goodbye and dies by it (exit -15).
            remaining = max(1.0, self.opts.stop_timeout - (time.monotonic() - started))
            try:
                codes[str(node.child.popen.wait(timeout=remaining))] += 1
            except subprocess.TimeoutExpired:
                node.child.kill()
                codes["killed"] += 1
        if self._tmp is not None:
            self._tmp.cleanup()
        else:
            _log(f"data dirs kept in {self.root}")
        return {"exit_codes": dict(codes), "seconds": round(time.monotonic() - started, 1)}


# --------------------------------------------------------------------------- registry heads


class Heads:
    """The registry every data dir holds, re-read (and verified) only when its file changed."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}

    def read(self, data_dir: Path) -> dict[str, Any] | None:
        from dllm_p2p.registry.chain import InvalidChain
        from dllm_p2p.registry.store import load_chain

        path = data_dir / "blockchain.json"
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        held = self._seen.get(path)
        if held is not None and held[0] == key:
            state = held[1]
        else:
            try:
                chain = load_chain(path, clamp=True)
            except (OSError, InvalidChain):
                return held[1] if held else None
            state = {"head": chain.head, "blocks": len(chain.blocks), "bytes": st.st_size, "chain": chain}
            self._seen[path] = (key, state)
        # Liveness depends on the clock, not only on the file: recomputed on every look.
        state = dict(state)
        state["live"] = set(state["chain"].nodes())
        return state


def look(nodes: list[Node], heads: Heads) -> dict[str, Any]:
    """One look at every node's registry: converged when one head and every record live."""
    expected = {n.peer_id for n in nodes}
    states = {n.name: heads.read(n.data_dir) for n in nodes}
    held = [s for s in states.values() if s is not None]
    distinct = Counter(s["head"] for s in held)
    informed = [name for name, s in states.items() if s is not None and expected <= s["live"]]
    converged = len(held) == len(nodes) and len(distinct) == 1 and len(informed) == len(nodes)
    live = sorted(len(s["live"] & expected) for s in held) or [0]
    # Joined: nodes some *other* node lists. The rest never reached anyone (no record out).
    joined = [n for n in nodes if any(n.peer_id in s["live"] for m, s in states.items() if m != n.name and s)]
    joined_ids = {n.peer_id for n in joined}
    joined_states = [states[n.name] for n in joined]
    joined_converged = bool(joined) and all(s is not None for s in joined_states) and len(
        {s["head"] for s in joined_states}) == 1 and all(joined_ids <= s["live"] for s in joined_states)
    return {"converged": converged, "heads": len(distinct), "informed": informed, "states": states,
            "min_live": live[0], "median_live": live[len(live) // 2],
            "isolated": sum(1 for s in held if len(s["live"] & expected) <= 1) + len(nodes) - len(held),
            "not_joined": [n.name for n in nodes if n.peer_id not in joined_ids], "joined_converged": joined_converged}


def gave_up_bootstrap(node: Node) -> bool:
    """Whether the node logged its last failed bootstrap try (Membership._join gives up
    after 5; with mDNS off nothing else ever introduces it to the network)."""
    return any("bootstrap" in line and "(try 5 of 5)" in line for line in list(node.child.stderr))


def wait_converged(net: Network, nodes: list[Node], since: float, timeout: float, label: str, machine: "Machine") -> dict[str, Any]:
    """Poll until every node of ``nodes`` still running holds one head with all their
    records live, or ``timeout``. Never raises: the answer says whether it converged, and
    a node that exits is recorded (``net.deaths``) and left out from then on."""
    heads = Heads()
    deadline = time.monotonic() + timeout
    informed_at: dict[str, float] = {}
    joined_converged_at: float | None = None
    timeline: list[dict[str, Any]] = []
    last_report = -1e9
    looks = 0
    me = _own_cpu()
    while True:
        now = time.monotonic()
        net.note_deaths(since)
        alive = net.alive(nodes)
        state = look(alive, heads)
        looks += 1
        machine.sample()
        for name in state["informed"]:
            informed_at.setdefault(name, now - since)
        done = state["converged"] and bool(alive)
        if state["joined_converged"] and joined_converged_at is None:
            joined_converged_at = now - since
        elif not state["joined_converged"]:
            joined_converged_at = None
        # Partitioned for good: the nodes that joined agree, and every node that did not
        # has given up its bootstrap. Waiting longer cannot change anything.
        by_name = {n.name: n for n in alive}
        partitioned = (not done and state["joined_converged"] and bool(state["not_joined"])
                       and all(gave_up_bootstrap(by_name[name]) for name in state["not_joined"]))
        if done or now - last_report >= 10 or now >= deadline:
            last_report = now
            timeline.append({"s": round(now - since, 1), "alive": len(alive), "informed": len(state["informed"]),
                             "heads": state["heads"], "min_live": state["min_live"], "median_live": state["median_live"],
                             "isolated": state["isolated"], "not_joined": len(state["not_joined"]),
                             "joined_converged": state["joined_converged"]})
            if not done:
                _log(f"{label}: {len(state['informed'])} of {len(alive)} nodes hold every record, {state['heads']} distinct "
                     f"heads, live records per node min {state['min_live']} median {state['median_live']}, "
                     f"{len(state['not_joined'])} not joined{', the joined ones agree' if state['joined_converged'] else ''} "
                     f"({now - since:.0f} s)")
        if done or partitioned or now >= deadline:
            head = next(iter(state["states"].values())) if done else None
            return {
                "converged": done,
                "seconds": round(now - since, 2) if done else None,
                "gave_up_after_s": None if done else round(now - since, 1),
                "nodes": len(nodes),
                "alive": len(alive),
                "head": head["head"] if head else None,
                "blocks": head["blocks"] if head else None,
                "distinct_heads": state["heads"],
                "fully_informed_s": _spread(list(informed_at.values())),
                "fully_informed_nodes": len(informed_at),
                "never_fully_informed": sorted(n.name for n in alive if n.name not in informed_at)[:20],
                "partitioned": partitioned,
                "not_joined": state["not_joined"],
                "joined_converged_since_s": None if joined_converged_at is None else round(joined_converged_at, 2),
                "timeline": timeline,
                "looks": looks,
                "cpu_cores_this_process": round((_own_cpu() - me) / max(1e-9, time.monotonic() - since), 3),
            }
        time.sleep(max(0.0, min(POLL - (time.monotonic() - now), deadline - time.monotonic())))


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    values = sorted(values)
    return {"min": round(values[0], 2), "median": round(statistics.median(values), 2),
            "p90": round(values[min(len(values) - 1, int(0.9 * len(values)))], 2), "max": round(values[-1], 2)}


# --------------------------------------------------------------------------- CPU and memory


class Machine:
    """Machine-wide CPU use (psutil.cpu_times) and the load average, sampled while we poll."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.busy: list[float] = []
        psutil.cpu_percent(interval=None)
        self.max_load = 0.0

    def sample(self) -> None:
        self.busy.append(self.psutil.cpu_percent(interval=None))
        self.max_load = max(self.max_load, os.getloadavg()[0])

    def phase(self) -> dict[str, Any]:
        out = {"machine_cpu_percent_mean": round(statistics.mean(self.busy), 1) if self.busy else None,
               "machine_cpu_percent_max": round(max(self.busy), 1) if self.busy else None,
               "load_average_1m_max": round(self.max_load, 2)}
        self.busy = []
        self.max_load = 0.0
        return out


def cpu_seconds(node: Node) -> float | None:
    import psutil

    if node.proc is None:
        return None
    try:
        t = node.proc.cpu_times()
        total = t.user + t.system
        for kid in node.proc.children(recursive=True):
            try:
                k = kid.cpu_times()
                total += k.user + k.system
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return None


def memory(node: Node) -> dict[str, int] | None:
    import psutil

    if node.proc is None:
        return None
    try:
        info = node.proc.memory_full_info()
        return {"rss": info.rss, "pss": getattr(info, "pss", info.rss)}
    except psutil.Error:
        return None


def machine_busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def by_role(nodes: list[Node], values: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role in sorted({n.role for n in nodes}):
        vals = [values[n.name] for n in nodes if n.role == role and values.get(n.name) is not None]
        if vals:
            out[role] = {"count": len(vals), "total": round(sum(vals), 3), "mean": round(statistics.mean(vals), 3), "max": round(max(vals), 3)}
    return out


# --------------------------------------------------------------------------- observers


def ticks(node: Node) -> list[dict[str, Any]]:
    out = []
    for line in list(node.child.stdout):
        if line.startswith("tick "):
            try:
                out.append(json.loads(line[5:]))
            except ValueError:
                pass
    return out


def observer_rates(node: Node, start: float, end: float) -> dict[str, Any]:
    """Counter differences between the observer's last tick at or before ``start`` and its
    first at or after ``end`` (wall clock), per second."""
    all_ticks = ticks(node)
    before = [t for t in all_ticks if t["t"] <= start]
    after = [t for t in all_ticks if t["t"] >= end]
    if not before or not after:
        raise RuntimeError(f"{node.name}: no counters around the window ({len(all_ticks)} ticks)\n{node.child.output(20)}")
    a, b = before[-1], after[0]
    dt = b["t"] - a["t"]

    def rate(path: str) -> float:
        def get(tick: dict[str, Any]) -> float:
            value: Any = tick
            for part in path.split("."):
                value = value.get(part, 0) if isinstance(value, dict) else 0
            return float(value or 0)

        return round((get(b) - get(a)) / dt, 2)

    hb, reg = "rx_pub.heartbeat", "rx_pub.registry"
    window = [t for t in all_ticks if a["t"] < t["t"] <= b["t"]]
    delays = sorted(d for t in window for d in t.get("delays", []))
    online = [t.get("online", 0) for t in window]
    return {
        "seconds": round(dt, 2),
        "received": {
            "heartbeat_messages_per_s": rate(hb),
            "heartbeat_unique_per_s": round(rate(hb) - rate("rx_dup.heartbeat"), 2),
            "heartbeat_duplicates_per_s": rate("rx_dup.heartbeat"),
            "announcement_messages_per_s": rate(reg),
            "announcement_unique_per_s": round(rate(reg) - rate("rx_dup.registry"), 2),
            "publish_bytes_per_s": rate("rx_pub_bytes"),
            "rpc_frames_per_s": rate("rx_rpc"),
            "rpc_bytes_per_s": rate("rx_bytes"),
            "not_forwarded_rate_limit_per_s": {"heartbeat": rate("rate_limited.heartbeat"), "registry": rate("rate_limited.registry")},
            "control_per_s": {k: rate(f"rx_ctrl.{k}") for k in ("ihave", "ihave_ids", "iwant", "iwant_ids", "graft", "prune", "idontwant", "idontwant_ids")},
        },
        "sent": {
            "publish_messages_per_s": rate("tx_pub"),
            "rpc_frames_per_s": rate("tx_rpc"),
            "rpc_bytes_per_s": rate("tx_bytes"),
            "control_per_s": {k: rate(f"tx_ctrl.{k}") for k in ("ihave", "iwant", "graft", "prune", "idontwant")},
        },
        "heartbeat_delay_s": None if not delays else {
            "count": len(delays), "median": delays[len(delays) // 2], "p90": delays[int(0.9 * len(delays))], "max": delays[-1]},
        "nodes_online_min_median": [min(online), sorted(online)[len(online) // 2]] if online else None,
        "heartbeat_senders_heard": b.get("heard"),
        "mesh_peers": b.get("mesh"),
        "connected_peers": b.get("connected"),
        "registry_live_records": b.get("chain_nodes"),
    }


def wait_heard(net: Network, observers: list[Node], expected: int, timeout: float) -> dict[str, Any]:
    """Poll the observers' ticks until each hears heartbeats from ``expected`` nodes (or
    ``timeout``: then the window is counted anyway, and the answer says so)."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        for o in observers:
            if not o.child.alive():
                raise RuntimeError(f"{o.name} exited with {o.child.popen.returncode}\n{o.child.output(30)}")
        heard = [(ticks(o) or [{}])[-1].get("heard", 0) for o in observers]
        if all(h >= expected for h in heard) or time.monotonic() >= deadline:
            return {"heard": heard, "expected": expected, "seconds": round(time.monotonic() - started, 1),
                    "all_heard": all(h >= expected for h in heard)}
        time.sleep(POLL)


# --------------------------------------------------------------------------- logs


_NOISE = [
    (re.compile(r"^\d{4}-\d\d-\d\d \S+ "), ""),  # the timestamp
    (re.compile(r"/ip4/[\d.]+/tcp/\d+(/p2p/\w+)?"), "<addr>"),
    (re.compile(r"\b(12D3Koo|Qm)\w{20,}"), "<peer>"),
    (re.compile(r"\b[0-9a-f]{16,}\b"), "<hex>"),
    (re.compile(r"\b\d+(\.\d+)?\b"), "<n>"),
]


#: A logged warning or error, or the line of a traceback that names the exception.
_LOGGED = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b")
_EXCEPTION = re.compile(r"^[\s|+-]*(?!ExceptionGroup)([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt))(: |$)")


def log_summary(nodes: list[Node]) -> dict[str, Any]:
    """Warnings, errors and exceptions in every node's stderr, grouped by message shape."""
    shapes: Counter[str] = Counter()
    nodes_with: dict[str, set[str]] = {}
    per_node: dict[str, int] = {}
    for node in nodes:
        if node.child is None:
            continue
        count = 0
        for line in list(node.child.stderr):
            if not (_LOGGED.search(line) or _EXCEPTION.search(line)):
                continue
            count += 1
            shape = line.strip(" |+-")
            for pattern, repl in _NOISE:
                shape = pattern.sub(repl, shape)
            shape = shape[:200]
            shapes[shape] += 1
            nodes_with.setdefault(shape, set()).add(node.name)
        per_node[node.name] = count
    return {
        "lines": sum(per_node.values()),
        "nodes_with_any": sum(1 for c in per_node.values() if c),
        "gave_up_bootstrap": sorted(n.name for n in nodes if n.child is not None and gave_up_bootstrap(n)),
        "top": [{"message": s, "lines": c, "nodes": len(nodes_with[s])} for s, c in shapes.most_common(12)],
    }


# --------------------------------------------------------------------------- the run


def registry_size(node: Node) -> dict[str, Any]:
    from dllm_p2p.registry.chain import canonical
    from dllm_p2p.registry.store import load_chain

    path = node.data_dir / "blockchain.json"
    chain = load_chain(path, clamp=True)
    records = chain.records
    sizes = [len(canonical(r)) for r in records]
    roles = Counter(r.get("role", "worker") for r in chain.nodes().values())
    return {
        "file_bytes": path.stat().st_size,
        "wire_bytes": len(chain.to_compact_json()),
        "blocks": len(chain.blocks),
        "records": len(records),
        "live_records": len(chain.nodes()),
        "live_by_role": dict(roles),
        "record_bytes_mean": round(statistics.mean(sizes), 1) if sizes else 0,
        "record_bytes_max": max(sizes, default=0),
        "file_bytes_per_block": round(path.stat().st_size / len(chain.blocks), 1),
        "wire_bytes_per_block": round(len(chain.to_compact_json()) / len(chain.blocks), 1),
    }


def run(opts: argparse.Namespace, result: dict[str, Any]) -> None:
    """The whole measurement; fills ``result`` as it goes (so a failure keeps what was measured)."""
    net = Network(opts)
    machine = Machine()
    result["meta"] = {
        "relays": opts.relays, "workers": opts.workers, "model": opts.model, "pow_bits": opts.pow_bits,
        "heartbeat_interval_s": opts.heartbeat_interval, "batch": opts.batch, "window_s": opts.window,
        "cpus": os.cpu_count(), "memory_gib": round(_total_memory() / 2**30, 1), "python": platform.python_version(),
        "platform": platform.platform(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    t0 = time.monotonic()
    try:
        # 1. relays: the seed, then the rest in parallel batches, each through the seed.
        _log("starting the seed relay")
        seed = net.start_batch("relay", ["relay-01"], None, opts.start_timeout)[0]
        names = [f"relay-{i:02d}" for i in range(2, opts.relays + 1)]
        for i in range(0, len(names), opts.batch):
            chunk = names[i : i + opts.batch]
            _log(f"starting {chunk[0]}..{chunk[-1]} ({i + 1 + len(chunk)} of {opts.relays} relays)")
            net.start_batch("relay", chunk, seed.addr, opts.start_timeout)
            machine.sample()
        relays = list(net.nodes)
        last_relay = max(n.spawned_at for n in relays)
        result["start"] = {
            "relays_seconds": round(time.monotonic() - t0, 1),
            "relay_spawn_to_listening_s": _spread([n.start_seconds for n in relays]),
            **machine.phase(),
        }

        # 2. the relays converge among themselves.
        _log(f"waiting for {len(relays)} relays to converge")
        result["relays_converged"] = wait_converged(net, relays, last_relay, opts.timeout, "relays", machine)
        result["relays_converged"].update(machine.phase())
        result["relays_converged"]["note"] = "seconds from the last relay's spawn"
        result["relays_converged"]["cpu_seconds_from_start"] = by_role(relays, _cpu_of(relays))

        # 3. the workers, then (a): every node on one head.
        _log(f"starting {opts.workers} worker(s) ({opts.model})")
        boot = (net.alive([seed]) or net.alive(relays))[0]
        workers = net.start_batch("worker", [f"worker-{i}" for i in range(1, opts.workers + 1)], boot.addr, opts.start_timeout) if opts.workers else []
        everyone = list(net.nodes)
        last_spawn = max(n.spawned_at for n in everyone)
        last_listen = max(n.listening_at for n in everyone)
        _log(f"waiting for all {len(everyone)} nodes to converge")
        conv = wait_converged(net, everyone, last_spawn, opts.timeout, "all nodes", machine)
        if conv["seconds"] is not None:
            conv["seconds_from_last_listening"] = round(conv["seconds"] - (last_listen - last_spawn), 2)
        conv["worker_spawn_to_listening_s"] = _spread([n.start_seconds for n in workers])
        conv["seconds_from_first_spawn"] = round(time.monotonic() - t0, 1)
        conv.update(machine.phase())
        conv["note"] = "seconds from the last node's spawn (a worker's); seconds_from_last_listening from its 'listening on' line"
        conv["cpu_seconds_from_start"] = by_role(everyone, _cpu_of(everyone))
        result["converged"] = conv

        # 4. steady state: observers join through two different relays and count.
        everyone = net.alive(everyone)
        live_relays = [n for n in everyone if n.role == "relay" and n.name not in conv["not_joined"]] or [
            n for n in everyone if n.role == "relay"]
        boots = [live_relays[0].addr, live_relays[len(live_relays) // 2].addr]
        _log("starting 2 observers")
        observers = [net.start_observer(f"observer-{i + 1}", b, opts.start_timeout) for i, b in enumerate(boots)]
        heard = wait_heard(net, observers, len(everyone), opts.timeout)
        _log(f"observers hear {heard['heard']} of {len(everyone)} nodes after {heard['seconds']:g} s; "
             f"settling {opts.settle:g} s, then counting for {opts.window:g} s")
        settle_end = time.monotonic() + opts.settle
        while time.monotonic() < settle_end:
            machine.sample()
            time.sleep(min(POLL, max(0.0, settle_end - time.monotonic())))
        machine.phase()
        heads = Heads()
        cpu_a = {n.name: cpu_seconds(n) for n in everyone + observers}
        busy_a, mono_a, wall_a = machine_busy_seconds(), time.monotonic(), time.time()
        me_a = _own_cpu()
        window_end = mono_a + opts.window
        head_changes: set[str] = set()
        while time.monotonic() < window_end:
            net.note_deaths(last_spawn)
            state = look(net.alive(everyone), heads)
            head_changes.update(s["head"] for s in state["states"].values() if s)
            machine.sample()
            time.sleep(min(POLL, max(0.0, window_end - time.monotonic())))
        cpu_b = {n.name: cpu_seconds(n) for n in everyone + observers}
        busy_b, mono_b, wall_b = machine_busy_seconds(), time.monotonic(), time.time()
        me_b = _own_cpu()
        span = mono_b - mono_a
        cores = {k: (cpu_b[k] - cpu_a[k]) / span for k in cpu_a if cpu_a[k] is not None and cpu_b.get(k) is not None}
        mem = {n.name: memory(n) for n in everyone + observers}
        # Observers tick once a second: wait (bounded) for a tick past the window's end.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(any(t["t"] >= wall_b for t in ticks(o)) for o in observers):
            time.sleep(0.2)
        gossip = {o.name: observer_rates(o, wall_a, wall_b) for o in observers}
        final = look(net.alive(everyone), heads)
        steady = {
            "window_s": round(span, 1),
            "nodes": len(everyone),
            "observers_heard": heard,
            "gossip_per_observer": gossip,
            "heartbeat_messages_received_per_node_per_s": round(statistics.mean(g["received"]["heartbeat_messages_per_s"] for g in gossip.values()), 2),
            "all_gossip_messages_received_per_node_per_s": round(statistics.mean(
                g["received"]["heartbeat_messages_per_s"] + g["received"]["announcement_messages_per_s"] for g in gossip.values()), 2),
            "heartbeats_published_per_s_network": round(len(everyone) / opts.heartbeat_interval, 2),
            "cpu_cores": by_role(everyone + observers, cores),
            "cpu_cores_nodes_total": round(sum(cores[n.name] for n in everyone if n.name in cores), 3),
            "cpu_cores_this_process": round((me_b - me_a) / span, 3),
            "machine_cpu_cores_busy": round((busy_b - busy_a) / span, 3),
            "machine_cpu_cores_other_processes": round(
                (busy_b - busy_a - sum(cpu_b[k] - cpu_a[k] for k in cores) - (me_b - me_a)) / span, 3),
            "rss_mib": by_role(everyone + observers, {k: v["rss"] / 2**20 for k, v in mem.items() if v}),
            "pss_mib": by_role(everyone + observers, {k: v["pss"] / 2**20 for k, v in mem.items() if v}),
            "rss_mib_nodes_total": round(sum(mem[n.name]["rss"] for n in everyone if mem.get(n.name)) / 2**20, 1),
            "pss_mib_nodes_total": round(sum(mem[n.name]["pss"] for n in everyone if mem.get(n.name)) / 2**20, 1),
            "distinct_heads_seen_in_window": len(head_changes),
            "still_converged_at_end": final["converged"],
            **machine.phase(),
        }
        result["steady"] = steady

        # 5. the registry and the logs.
        result["registry"] = registry_size(net.alive(everyone)[0])
    finally:
        net.note_deaths(t0)
        result["deaths"] = net.deaths
        result["logs"] = log_summary(net.nodes + net.observers)
        _log("stopping every process")
        result["stop"] = net.close()
        result["meta"]["seconds"] = round(time.monotonic() - t0, 1)


def _cpu_of(nodes: list[Node]) -> dict[str, float]:
    return {n.name: v for n in nodes if (v := cpu_seconds(n)) is not None}


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


# --------------------------------------------------------------------------- the observer process


def observe(argv: list[str]) -> int:
    """An observer: joins through ``--bootstrap``, counts pubsub traffic, prints a ``tick``
    line of cumulative counters (JSON) every second until ``--lifetime`` or SIGTERM."""
    p = argparse.ArgumentParser(prog="converge.py observe")
    p.add_argument("--bootstrap", action="append", required=True)
    p.add_argument("--pow-bits", type=int, required=True)
    p.add_argument("--heartbeat-interval", type=float, default=2.0)
    p.add_argument("--lifetime", type=float, default=1800.0)
    args = p.parse_args(argv)

    import logging

    import trio
    from libp2p.pubsub.gossipsub import GossipSub
    from libp2p.pubsub.pubsub import Pubsub

    from dllm_p2p import heartbeat
    from dllm_p2p.host import host_addrs, make_host, parse_multiaddr
    from dllm_p2p.identity import generate
    from dllm_p2p.membership import REGISTRY_TOPIC, Membership, MembershipConfig
    from dllm_p2p.registry.store import ChainStore

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)

    topics = {heartbeat.TOPIC: "heartbeat", REGISTRY_TOPIC: "registry"}
    c: dict[str, Any] = {
        "rx_rpc": 0, "rx_bytes": 0, "rx_pub": Counter(), "rx_dup": Counter(), "rx_pub_bytes": 0, "rx_ctrl": Counter(),
        "tx_rpc": 0, "tx_bytes": 0, "tx_pub": 0, "tx_ctrl": Counter(), "rate_limited": Counter(),
    }

    # What is counted, all in this process only (class patches; the nodes run unmodified):
    # every pubsub RPC frame read from a peer (rx_rpc, rx_bytes: its protobuf bytes); every
    # published message in them on a topic we subscribe to (rx_pub by topic, duplicates
    # included; rx_dup: those already seen, which GossipSub drops); control entries
    # (rx_ctrl); every RPC frame written to a peer (tx_*).
    import libp2p.pubsub.pubsub as pubsub_module

    original_read = pubsub_module.read_varint_prefixed_bytes_limited

    async def counting_read(*a: Any, **kw: Any) -> bytes:
        data = await original_read(*a, **kw)
        c["rx_rpc"] += 1
        c["rx_bytes"] += len(data)
        return data

    pubsub_module.read_varint_prefixed_bytes_limited = counting_read

    original_push = Pubsub.push_msg

    async def counting_push(self: Pubsub, msg_forwarder: Any, msg: Any) -> None:
        if msg_forwarder != self.host.get_id():
            for topic in msg.topicIDs:
                name = topics.get(topic, topic)
                c["rx_pub"][name] += 1
                if self._is_msg_seen(msg):
                    c["rx_dup"][name] += 1
            c["rx_pub_bytes"] += msg.ByteSize()
        await original_push(self, msg_forwarder, msg)

    Pubsub.push_msg = counting_push  # type: ignore[method-assign]

    original_rpc = GossipSub.handle_rpc

    async def counting_rpc(self: GossipSub, rpc: Any, sender: Any) -> None:
        ctrl = rpc.control
        c["rx_ctrl"]["ihave"] += len(ctrl.ihave)
        c["rx_ctrl"]["ihave_ids"] += sum(len(x.messageIDs) for x in ctrl.ihave)
        c["rx_ctrl"]["iwant"] += len(ctrl.iwant)
        c["rx_ctrl"]["iwant_ids"] += sum(len(x.messageIDs) for x in ctrl.iwant)
        c["rx_ctrl"]["graft"] += len(ctrl.graft)
        c["rx_ctrl"]["prune"] += len(ctrl.prune)
        c["rx_ctrl"]["idontwant"] += len(ctrl.idontwant)
        c["rx_ctrl"]["idontwant_ids"] += sum(len(x.messageIDs) for x in ctrl.idontwant)
        await original_rpc(self, rpc, sender)

    GossipSub.handle_rpc = counting_rpc  # type: ignore[method-assign]

    # GossipSub's per-forwarder rate limit (Membership sets max_messages_per_topic_per_second):
    # a message over it is still delivered here but not forwarded to our mesh.
    original_spam = GossipSub._check_spam_protection

    def counting_spam(self: GossipSub, peer_id: Any, msg: Any) -> bool:
        ok = original_spam(self, peer_id, msg)
        if not ok:
            for topic in msg.topicIDs:
                c["rate_limited"][topics.get(topic, topic)] += 1
        return ok

    GossipSub._check_spam_protection = counting_spam  # type: ignore[method-assign]

    original_write = Pubsub.write_msg

    async def counting_write(self: Pubsub, stream: Any, rpc: Any) -> bool:
        c["tx_rpc"] += 1
        c["tx_bytes"] += rpc.ByteSize()
        c["tx_pub"] += len(rpc.publish)
        if rpc.HasField("control"):
            for kind in ("ihave", "iwant", "graft", "prune", "idontwant"):
                c["tx_ctrl"][kind] += len(getattr(rpc.control, kind))
        return await original_write(self, stream, rpc)

    Pubsub.write_msg = counting_write  # type: ignore[method-assign]

    # Heartbeats as the application sees them (Membership.on_heartbeat, after GossipSub,
    # validation and the subscription queue): who was ever heard, and each one's delay,
    # arrival minus the sender's stamp (one machine, one clock).
    heard_ever: set[str] = set()
    delays: list[float] = []

    def on_heartbeat(beat: Any) -> None:
        heard_ever.add(beat.peer_id)
        delays.append(round(time.time() - beat.ts, 3))

    identity = generate()
    scratch = tempfile.TemporaryDirectory(prefix="dllm-observer-")
    membership = Membership(
        identity,
        MembershipConfig(role="observer", bootstrap=args.bootstrap, heartbeat_interval=args.heartbeat_interval, pow_bits=args.pow_bits),
        ChainStore(scratch.name),
        on_heartbeat=on_heartbeat,
    )
    host = make_host(identity)

    async def main() -> None:
        async with host.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]):
            for addr in host_addrs(host):
                print(f"listening on {addr}", flush=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_signal, nursery.cancel_scope)
                await nursery.start(membership.run, host)
                with trio.move_on_after(args.lifetime):
                    while True:
                        now = time.time()
                        router = membership.pubsub.router if membership.pubsub else None
                        tick = {
                            "t": round(now, 3), **{k: (dict(v) if isinstance(v, Counter) else v) for k, v in c.items()},
                            "heard": len(heard_ever),
                            "online": sum(1 for p in list(membership.last_seen) if membership.online(p, now)),
                            "delays": delays[:],
                            "chain_nodes": len(membership.chain.nodes()),
                            "mesh": {topics.get(t, t): len(peers) for t, peers in getattr(router, "mesh", {}).items()},
                            "connected": len(host.get_connected_peers()),
                        }
                        delays.clear()
                        print("tick " + json.dumps(tick, separators=(",", ":")), flush=True)
                        await trio.sleep(1.0)
                nursery.cancel_scope.cancel()

    async def until_signal(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                scope.cancel()
                return

    try:
        trio.run(main)
    finally:
        scratch.cleanup()
    return 0


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.converge",
        description="Start N relays and W workers on 127.0.0.1, measure how fast they converge on one registry head, "
        "then gossip traffic, CPU and memory in steady state. Stops every process at the end.",
    )
    p.add_argument("--relays", type=int, default=50, help="relay-role nodes, the seed included (default 50)")
    p.add_argument("--workers", type=int, default=2, help="workers, started after the relays converged (default 2)")
    p.add_argument("--model", default="tiny", help="the workers' model (default tiny)")
    p.add_argument("--batch", type=int, default=8, help="relays started at once (default 8)")
    p.add_argument("--pow-bits", type=int, default=12, help="proof of work of every node's record (default 12)")
    p.add_argument("--heartbeat-interval", type=float, default=2.0, help="every node's --heartbeat-interval (default 2)")
    p.add_argument("--record-ttl", type=float, default=None, help="every node's --record-ttl (default: the nodes' own, 600 s; a node renews every third of it)")
    p.add_argument("--window", type=float, default=30.0, help="seconds of steady state counted (default 30)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds between the observers hearing every node and the window (default 10)")
    p.add_argument("--timeout", type=float, default=600.0, help="bound on each convergence wait (default 600 s)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="bound on a batch printing its addresses (default 300 s)")
    p.add_argument("--stop-timeout", type=float, default=30.0, help="seconds every process gets to stop before SIGKILL (default 30)")
    p.add_argument("--save", type=Path, default=DEFAULT_OUT, help=f"where the JSON goes (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--keep", action="store_true", help="keep the data dirs (their path is printed)")
    p.add_argument("-v", "--verbose", action="store_true", help="echo every node's output")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["observe"]:
        return observe(argv[1:])
    opts = build_parser().parse_args(argv)
    if opts.relays < 1 or opts.workers < 0 or opts.batch < 1 or opts.window <= 0:
        print("error: need --relays >= 1, --workers >= 0, --batch >= 1, --window > 0", file=sys.stderr)
        return 2
    # Ctrl-C and SIGTERM raise KeyboardInterrupt, so `finally` stops every process.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    result: dict[str, Any] = {}
    code = 0
    try:
        run(opts, result)
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        code = 130
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        print(f"error: {result['error']}", file=sys.stderr)
        code = 1
    opts.save.parent.mkdir(parents=True, exist_ok=True)
    opts.save.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
