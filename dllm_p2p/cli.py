"""Command line: ``python -m dllm_p2p [worker|query|info|model|...]``.

Thin on purpose: parse arguments, call into the modules, turn their exceptions into one
clear line on stderr and an exit code (0 ok, 1 the remote side said no, 2 usage or local
problem). Heavy imports (torch, transformers) happen only in commands that need them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import __version__, wire
from .models import BACKENDS, QUANT_TYPES
from .registry.chain import DEFAULT_POW_BITS
from .registry.sinks import PUBLISH_TO_HELP, sink_argument

SUBCOMMANDS = {"worker", "relay", "query", "info", "model", "registry", "nodes", "deregister", "up", "answer", "ledger"}


def _add_node_args(p: argparse.ArgumentParser, *, data_dir: str, heartbeat: float, record_ttl: float) -> None:
    """What every node of the network takes: where it listens, how it joins, its registry."""
    p.add_argument("--listen", action="append", metavar="MULTIADDR", help="listen address (repeatable; default /ip4/0.0.0.0/tcp/4001)")
    p.add_argument("--announce", action="append", default=[], metavar="MULTIADDR", help="address to advertise instead of the listen addresses (repeatable)")
    p.add_argument("--data-dir", default=data_dir, type=Path, help=f"node key, node.json and registry files (default {data_dir})")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR", help="a node to join the network through (repeatable)")
    p.add_argument("--heartbeat-interval", type=float, default=heartbeat, help=f"seconds between signed heartbeats (default {heartbeat:g}; peers count a node online for 3 of them)")
    p.add_argument("--record-ttl", type=float, default=record_ttl, help=f"seconds a registry record lives unless renewed (default {record_ttl:g}; renewed every 27-33%% of it)")
    p.add_argument("--pow-bits", type=int, default=DEFAULT_POW_BITS, help=f"proof of work each registry record carries, the same on every node of a network (default {DEFAULT_POW_BITS}: about a second, once per identity)")
    p.add_argument("--registry", default=None, metavar="SOURCE", help="seed the registry from a file, CID or /ipns/ name")
    p.add_argument("--ipfs-api", default=None, metavar="URL", help="Kubo RPC API to publish the registry (default http://127.0.0.1:5001 when it answers; else an embedded store)")
    p.add_argument("--publish-to", action="append", default=[], type=sink_argument, metavar="SINK", help=PUBLISH_TO_HELP)
    p.add_argument("--psk", default=None, help="private network key (64 hex chars); peers without it can't connect")
    p.add_argument("--no-mdns", action="store_true", help="do not look for peers on the LAN with mDNS (on by default)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    _add_node_args(p, data_dir="~/.dllm", heartbeat=2.0, record_ttl=600.0)
    p.add_argument("--model", default="gpt2", help="model spec: gpt2, tiny, random:gpt2, a hub name or a local directory (default: gpt2)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="cap on tokens generated per request (default 256)")
    p.add_argument("--max-concurrency", type=int, default=8, help="requests generated together in one batch (default 8)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: all cores; give each of several workers on one machine its share)")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting for a batch slot before 'busy' (default 32)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16"], help="weights of Llama-family models (lean decoder): float16 halves the bytes read per token with the same answers to within rounding; auto = float16 where PyTorch has FBGEMM (x86), else float32; other models run in float32 (default auto)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="what runs the model: llamacpp (GGUF files, llama.cpp's batched API; `make install` builds it), torch (transformers models, and GGUF files dequantized); auto = llamacpp for a whole GGUF model when it is installed, else torch (default auto)")
    p.add_argument("--quantize", default="auto", choices=QUANT_TYPES, help="llama.cpp backend: the weights' type in memory; keep = as in the file; another type is written once by llama.cpp into <data-dir>/models; auto = f16 for a model stored in fewer bits whose float16 weights fit in 1 GiB (SmolLM2: float32's answers, and faster at 8 clients), else keep (default auto)")
    p.add_argument("--kv-cache-mb", type=float, default=None, help="KV-cache budget: requests past it wait for a batch slot, a request that alone exceeds it is refused (default 1024 for torch, a ceiling; 256 for llama.cpp, allocated at start)")
    p.add_argument("--layers", default=None, metavar="START:END", help="serve only decoder layers START..END-1 of the model (Python slice semantics, e.g. 0:10, 10:20, 20:) over /dllm/forward/1.0.0, loading only their weights; clients chain spans into a route (Llama-family models; default: the whole model, over /dllm/generate/1.0.0)")
    p.add_argument("--max-sessions", type=int, default=64, help="with --layers: sessions held at once before 'busy' (default 64)")
    p.add_argument("--session-ttl", type=float, default=300.0, help="with --layers: seconds a session may sit idle before its KV cache is freed (default 300)")
    p.add_argument("--credit-floor", type=float, default=-1000.0, metavar="CREDITS", help="refuse requesters whose verified balance is below this with 'payment_required' while others wait (never when idle; default -1000, a new identity's allowance in debt)")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds one generation may take (default 300)")
    p.add_argument("--read-timeout", type=float, default=10.0, help="seconds a dialer has to send its request (default 10)")
    p.add_argument("--no-relay", action="store_true", help="never relay for others (by default a node that peers can reach directly offers circuit-relay reservations)")
    p.add_argument("--no-hole-punch", action="store_true", help="stay relayed: never upgrade a relayed connection to a direct one (DCUtR), which would show this node's public address to the other side")


def _add_relay_args(p: argparse.ArgumentParser) -> None:
    # A relay has no load to report and lives long: it beats and renews less often than
    # a worker, which keeps 50 relays' gossip within 2 cores (docs/BENCHMARKS.md).
    _add_node_args(p, data_dir="~/.dllm/relay", heartbeat=30.0, record_ttl=3600.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dllm_p2p",
        description="Serve language models peer to peer. With no subcommand, starts a worker.",
    )
    parser.add_argument("--version", action="version", version=f"dllm-p2p {__version__}")
    sub = parser.add_subparsers(dest="command")

    _add_worker_args(sub.add_parser("worker", help="start a worker node (the default)"))
    _add_relay_args(sub.add_parser("relay", help="start a relay: no model; bootstraps, keeps the registry, relays for nodes behind NAT"))

    q = sub.add_parser("query", help="send a prompt to a worker, or through a route of spans (--spans)")
    q.add_argument("addr", metavar="MULTIADDR", help="worker address ending in /p2p/<peer-id>; with --spans, any node to join the network through")
    q.add_argument("prompt")
    q.add_argument("--max-new-tokens", type=int)
    q.add_argument("--min-new-tokens", type=int)
    q.add_argument("--temperature", type=float, help="0 means greedy decoding")
    q.add_argument("--top-p", type=float)
    q.add_argument("--top-k", type=int)
    q.add_argument("--seed", type=int)
    q.add_argument("--model")
    q.add_argument("--chat", action="store_true", help="send the prompt as a user message (the worker applies its chat template)")
    q.add_argument("--stop", action="append", default=None, metavar="TEXT", help="end the answer before TEXT (repeatable, up to 4)")
    q.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    q.add_argument("--json", action="store_true", help="print the final frame as JSON")
    q.add_argument("--psk", default=None)
    q.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer")
    q.add_argument("--spans", action="store_true", help="generate through a route of span workers (--layers) found by listening to the network's heartbeats; the answer names its route")
    q.add_argument("--wait", type=float, default=10.0, help="with --spans: seconds to listen for heartbeats until the spans cover the model (default 10)")

    i = sub.add_parser("info", help="ask a worker to describe itself")
    i.add_argument("addr", metavar="MULTIADDR")
    i.add_argument("--psk", default=None)

    n = sub.add_parser("nodes", help="list the network's nodes: online/offline, models, load")
    n.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR", help="join through this node and listen to heartbeats")
    n.add_argument("--registry", default=None, metavar="SOURCE", help="read this file, CID or /ipns/ name instead of (or before) joining")
    n.add_argument("--ipfs-api", default=None, metavar="URL")
    n.add_argument("--wait", type=float, default=5.0, help="seconds to listen for heartbeats when joining (default 5)")
    n.add_argument("--ttl", type=float, default=7.0, help="seconds without a heartbeat before a node counts as offline (default 7)")
    n.add_argument("--json", action="store_true", help="print a JSON list")
    n.add_argument("--psk", default=None)

    r = sub.add_parser("registry", help="show, verify or publish a registry file (blockchain.json)")
    rsub = r.add_subparsers(dest="registry_command", required=True)
    rv = rsub.add_parser("verify", help="verify a chain offline: exit 0 if valid, 1 naming the first bad block")
    rv.add_argument("file", type=Path)
    rs = rsub.add_parser("show", help="print a chain's blocks and live nodes")
    rs.add_argument("source", help="file, CID or /ipns/ name")
    rs.add_argument("--ipfs-api", default=None, metavar="URL")
    rs.add_argument(
        "--bootstrap", action="append", default=[], metavar="MULTIADDR",
        help="with no daemon: fetch a CID, or resolve a name, from the network this node belongs to (bitswap, DHT)",
    )
    rs.add_argument("--psk", default=None)
    rs.add_argument("--json", action="store_true")
    rp = rsub.add_parser("publish", help="add a node's blockchain.json to IPFS and write current_cid.txt")
    rp.add_argument("--data-dir", type=Path, default=Path("~/.dllm"))
    rp.add_argument("--ipfs-api", default=None, metavar="URL")

    d = sub.add_parser("deregister", help="sign a deregister record for this node's key and spread it")
    d.add_argument("--data-dir", type=Path, default=Path("~/.dllm"))
    d.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR", help="announce it through this node")
    d.add_argument("--psk", default=None)

    u = sub.add_parser("up", help="start a local network: workers + gateway + page on 127.0.0.1")
    u.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    u.add_argument("--model", default=None, help="model spec (default: gpt2 if cached locally, else tiny)")
    u.add_argument("--port", type=int, default=8080, help="gateway HTTP port (default 8080)")
    u.add_argument("--data-dir", type=Path, default=Path("~/.dllm/local"), help="where the nodes keep keys and registry (default ~/.dllm/local)")
    u.add_argument("-v", "--verbose", action="store_true", help="show every process's output")

    a = sub.add_parser("answer", help="check who produced an answer")
    asub = a.add_subparsers(dest="answer_command", required=True)
    av = asub.add_parser("verify", help="verify a signed answer offline: exit 0 and name the signer, else 1 and why")
    av.add_argument("file", type=Path, help="JSON with 'text' and 'signature': a /api/generate answer or `query --json` output ('-' reads stdin)")

    lg = sub.add_parser("ledger", help="credits: show a node's ledger, verify a ledger file (docs/CREDITS.md)")
    lsub = lg.add_subparsers(dest="ledger_command", required=True)
    ls = lsub.add_parser("show", help="balance, totals and recent receipts of a ledger (offline)")
    ls.add_argument("file", nargs="?", type=Path, default=None, help="a ledger.json (default: <data-dir>/ledger.json)")
    ls.add_argument("--data-dir", default="~/.dllm", type=Path, help="the node's data dir (default ~/.dllm; a gateway's is ~/.dllm/gateway)")
    ls.add_argument("--recent", type=int, default=10, metavar="N", help="receipts to list (default 10)")
    ls.add_argument("--json", action="store_true", help="print JSON")
    lv = lsub.add_parser("verify", help="verify a ledger offline: exit 0 if valid, 1 naming the first bad record")
    lv.add_argument("file", type=Path, help="a ledger.json")
    m = sub.add_parser("model", help="model utilities")
    msub = m.add_subparsers(dest="model_command", required=True)
    it = msub.add_parser("init-tiny", help="save the built-in tiny GPT-2 to DIR (loadable with from_pretrained)")
    it.add_argument("dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .lifeline import watch_parent

    watch_parent()  # a child of `up` stops when `up` dies, however it dies
    argv = list(sys.argv[1:] if argv is None else argv)
    # Bare `python -m dllm_p2p [--worker-options]` starts a worker.
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in {"-h", "--help", "--version"}):
        argv.insert(0, "worker")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # py-libp2p logs every refused or reset stream at WARNING/ERROR; that is our business.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL if not getattr(args, "verbose", False) else logging.DEBUG)
    handler = {
        "worker": cmd_worker,
        "relay": cmd_relay,
        "query": cmd_query,
        "info": cmd_info,
        "model": cmd_model,
        "up": cmd_up,
        "nodes": cmd_nodes,
        "registry": cmd_registry,
        "deregister": cmd_deregister,
        "answer": cmd_answer,
        "ledger": cmd_ledger,
    }[args.command]
    if hasattr(args, "psk"):
        from .host import AddressError, check_psk

        try:
            args.psk = check_psk(args.psk)
        except AddressError as exc:
            return _fail(str(exc))
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `... | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


async def open_registry(store: Any, data_dir: Path, ipfs_api: str | None, source: str | None) -> Any:
    """Open the IPFS publisher (saying which mode) and merge the chain named by ``source``."""
    from .registry.chain import RegistryError
    from .registry.ipfs import ContentNotFound, IpfsError, IpfsUnavailable, is_cid
    from .registry.publish import Publisher, load_source

    publisher = await Publisher.open(data_dir, ipfs_api)
    print(publisher.describe(), file=sys.stderr, flush=True)
    if source:
        try:
            store.merge(await load_source(source, publisher))
        except (ContentNotFound, IpfsUnavailable) as exc:
            if publisher.kubo is not None or not (source.startswith(("/ipfs/", "/ipns/")) or is_cid(source.split("/")[0])):
                print(f"warning: could not load the registry from {source}: {exc}", file=sys.stderr, flush=True)
            else:
                publisher.pending = source
                print(f"{source} is not stored here: fetching it from peers (bitswap, DHT) once connected", file=sys.stderr, flush=True)
        except (RegistryError, IpfsError, OSError) as exc:
            print(f"warning: could not load the registry from {source}: {exc}", file=sys.stderr, flush=True)
    return publisher


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


async def until_signal(scope: trio.CancelScope, before: Callable[[], Awaitable[None]] | None = None) -> None:
    """On the first SIGINT or SIGTERM run ``before`` (at most 4 s), then cancel ``scope``:
    a clean, prompt shutdown that still says goodbye to the network."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            print(f"received {signal.Signals(signum).name}, shutting down", file=sys.stderr, flush=True)
            if before is not None:
                with trio.move_on_after(4):
                    await before()
            scope.cancel()
            return


# --- worker -----------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    from .engine import Engine, ModelLoadError, load_model
    from .engine.fingerprint import fingerprint
    from .engine.spans import SpanEngine
    from .identity import DataDirLock, DataDirLocked, load_or_create
    from .memory import resident_mib
    from .membership import Membership, MembershipConfig
    from .lan import LanDiscovery
    from .reach import Reach
    from .registry.sinks import make_sinks
    from .registry.store import ChainStore
    from .ledger_service import LedgerService
    from .worker import Worker, WorkerConfig

    if args.read_timeout <= 0:
        return _fail("--read-timeout must be positive")
    if args.max_concurrency < 1 or args.max_queue < 0:
        return _fail("--max-concurrency must be at least 1 and --max-queue at least 0")
    if args.max_new_tokens < 1 or not args.request_timeout > 0:
        return _fail("--max-new-tokens must be at least 1 and --request-timeout positive")
    if args.kv_cache_mb is not None and not args.kv_cache_mb > 0:
        return _fail("--kv-cache-mb must be positive")
    if args.max_sessions < 1 or not args.session_ttl > 0:
        return _fail("--max-sessions must be at least 1 and --session-ttl positive")
    try:
        membership_config = MembershipConfig(
            role="worker", bootstrap=args.bootstrap, heartbeat_interval=args.heartbeat_interval, record_ttl=args.record_ttl,
            pow_bits=args.pow_bits,
        )
    except ValueError as exc:
        return _fail(str(exc))
    if args.threads is not None:
        import torch

        # Several workers on one machine each spinning up all-core OpenMP pools slow
        # every one of them down many times over: give each its share.
        torch.set_num_threads(max(1, args.threads))
    try:
        DataDirLock(args.data_dir).acquire()  # held until this process exits
    except DataDirLocked as exc:
        return _fail(str(exc))
    identity = load_or_create(args.data_dir)
    print(f"peer id {identity.peer_id}", file=sys.stderr, flush=True)
    say = lambda msg: print(f"[model] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    baseline_rss = resident_mib()
    try:
        loaded = load_model(
            args.model, progress=say, layers=args.layers, backend=args.backend, quantize=args.quantize,
            cache_dir=Path(args.data_dir).expanduser() / "models",
        )
    except ModelLoadError as exc:
        return _fail(str(exc))
    except ValueError as exc:  # a malformed or empty --layers
        return _fail(f"--layers: {exc}")
    say(f"fingerprint {fingerprint(loaded, args.data_dir)}")
    try:
        engine: Engine | SpanEngine
        if args.layers is not None:
            engine = SpanEngine(loaded, dtype=args.dtype, kv_cache_mb=args.kv_cache_mb or 1024, max_sessions=args.max_sessions)
            start, end = engine.span
            say(f"serving layers {start}:{end} of {engine.total_layers}, {engine.dtype} weights, KV cache budget {engine.kv_cache_bytes / 2**20:g} MB")
        else:
            engine = Engine(
                loaded, max_batch_size=args.max_concurrency, max_queue=args.max_queue, dtype=args.dtype,
                kv_cache_mb=args.kv_cache_mb, keep_model=False, threads=args.threads,
            )
            say(f"engine: {engine.backend}, {engine.dtype} weights, KV cache budget {engine.kv_cache_bytes / 2**20:.0f} MB")
    except ValueError as exc:
        return _fail(str(exc))
    config = WorkerConfig(
        listen=args.listen or ["/ip4/0.0.0.0/tcp/4001"],
        announce=args.announce,
        data_dir=args.data_dir,
        max_new_tokens=args.max_new_tokens,
        request_timeout=args.request_timeout,
        read_timeout=args.read_timeout,
        psk=args.psk,
        session_ttl=args.session_ttl,
        baseline_rss_mib=baseline_rss,
        credit_floor=int(args.credit_floor * 1000),
    )
    worker = Worker(engine, identity, config)
    if args.layers is None:  # a span's work is priced with its route's answer: not yet (docs/CREDITS.md)
        worker.ledger = LedgerService(identity, args.data_dir, pow_bits=args.pow_bits)
    store = ChainStore(args.data_dir)
    reach = Reach(
        worker.host, psk=args.psk, relays=relay_candidates(args.bootstrap, store), hop=False if args.no_relay else "auto",
        hole_punch=not args.no_hole_punch,
    )
    membership = Membership(
        identity,
        membership_config,
        store,
        models=lambda: worker.models,
        load=worker.load,
        model_info=worker.model_info,
        ledger=worker.ledger.summary if worker.ledger is not None else None,
        on_heartbeat=worker.ledger.on_heartbeat if worker.ledger is not None else None,
        sinks=make_sinks(args.publish_to, identity, args.data_dir),
    )
    if worker.ledger is not None:
        worker.services.append(worker.ledger.run)
    worker.services.append(lambda host: reach.run())
    worker.services.append(membership.run)
    if not args.no_mdns:
        worker.services.append(lambda host: LanDiscovery(host, membership.meet, args.psk).run())

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(until_signal, nursery.cancel_scope, membership.leave)
            membership.publisher = await open_registry(store, args.data_dir, args.ipfs_api, args.registry)
            try:
                await worker.run()
            finally:
                await membership.publisher.aclose()

    from .registry.ipfs import IpfsError

    engine.start()
    try:
        trio.run(serve)
    except IpfsError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot listen on {config.listen}: {exc}")
    finally:
        engine.close()
    print("worker stopped", file=sys.stderr, flush=True)
    return 0


def relay_candidates(bootstrap: list[str], store: Any) -> Callable[[], list[str]]:
    """Where a node behind NAT may reserve a slot: its bootstrap peers, then every
    registered relay (one address each)."""

    def candidates() -> list[str]:
        registered = [
            record["addrs"][0] for record in store.chain.nodes().values()
            if record.get("role") == "relay" and record.get("addrs")
        ]
        return list(dict.fromkeys([*bootstrap, *registered]))

    return candidates


# --- relay ------------------------------------------------------------------------------


def cmd_relay(args: argparse.Namespace) -> int:
    """A node with no model: it bootstraps others, keeps and serves the registry, forwards
    gossip and relays for nodes behind NAT. Starts in about a second (no torch)."""
    from .fsutil import write_json_atomic
    from .host import host_addrs, make_host, parse_multiaddr
    from .identity import DataDirLock, DataDirLocked, load_or_create
    from .lan import LanDiscovery
    from .membership import Membership, MembershipConfig
    from .reach import Reach
    from .registry.ipfs import IpfsError
    from .registry.sinks import make_sinks
    from .registry.store import ChainStore

    try:
        membership_config = MembershipConfig(
            role="relay", bootstrap=args.bootstrap, heartbeat_interval=args.heartbeat_interval, record_ttl=args.record_ttl,
            pow_bits=args.pow_bits,
        )
        listen = [parse_multiaddr(a) for a in args.listen or ["/ip4/0.0.0.0/tcp/4001"]]
    except ValueError as exc:
        return _fail(str(exc))
    try:
        DataDirLock(args.data_dir).acquire()
    except DataDirLocked as exc:
        return _fail(str(exc))
    identity = load_or_create(args.data_dir)
    print(f"peer id {identity.peer_id}", file=sys.stderr, flush=True)
    host = make_host(identity, announce=args.announce, psk=args.psk, relay=True)
    reach = Reach(host, psk=args.psk, hop=True)
    store = ChainStore(args.data_dir)
    membership = Membership(identity, membership_config, store, sinks=make_sinks(args.publish_to, identity, args.data_dir))

    async def serve() -> None:
        async with trio.open_nursery() as outer:
            outer.start_soon(until_signal, outer.cancel_scope, membership.leave)
            membership.publisher = await open_registry(store, args.data_dir, args.ipfs_api, args.registry)
            try:
                async with host.run(listen), trio.open_nursery() as nursery:
                    addrs = host_addrs(host)
                    write_json_atomic(
                        Path(args.data_dir).expanduser() / "node.json",
                        {"peer_id": identity.peer_id.to_base58(), "role": "relay", "addrs": addrs, "pid": __import__("os").getpid(), "started": int(time.time())},
                    )
                    for addr in addrs:
                        print(f"listening on {addr}", flush=True)
                    await nursery.start(reach.run)
                    await nursery.start(membership.run, host)
                    if not args.no_mdns:
                        nursery.start_soon(LanDiscovery(host, membership.meet, args.psk).run)
                    print("relay ready: offering circuit-relay-v2 reservations", file=sys.stderr, flush=True)
            finally:
                await membership.publisher.aclose()

    try:
        trio.run(serve)
    except IpfsError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot listen on {args.listen}: {exc}")
    print("relay stopped", file=sys.stderr, flush=True)
    return 0


# --- query / info -----------------------------------------------------------------------


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"stream": bool(args.stream)}
    if args.chat:
        request["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        request["prompt"] = args.prompt
    for key in ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "seed", "model", "stop"):
        value = getattr(args, key)
        if value is not None:
            request[key] = value
    return request


def cmd_query(args: argparse.Namespace) -> int:
    from .client import ClientError, WorkerError, open_client
    from .host import AddressError, peer_info

    try:
        peer_info(args.addr)
    except AddressError as exc:
        return _fail(str(exc))
    request = _request_from_args(args)
    if args.spans:
        try:
            return _query_route(args, wire.parse_request(request))
        except wire.WireError as exc:
            return _fail(str(exc))

    async def run() -> int:
        async with open_client(psk=args.psk) as client:
            with trio.move_on_after(args.timeout):
                try:
                    async with aclosing(client.generate(args.addr, request)) as frames:
                        async for frame in frames:
                            if frame["type"] == "token" and not args.json:
                                sys.stdout.write(frame["text"])
                                sys.stdout.flush()
                            elif frame["type"] == "done":
                                if args.json:
                                    print(json.dumps(frame, ensure_ascii=False))
                                elif args.stream:
                                    print()
                                else:
                                    print(frame["text"])
                                return 0
                except WorkerError as exc:
                    return _fail(f"worker answered {exc.code}: {exc.message}", 1)
                except ClientError as exc:
                    return _fail(str(exc))
            return _fail(f"no answer within {args.timeout:g} s")
        return 2

    return trio.run(run)


def _query_route(args: argparse.Namespace, request: Any) -> int:
    """``query --spans``: join through ``addr``, listen to heartbeats until span workers of
    one model cover all its layers, then drive the cheapest route (``route.py``)."""
    from .client import Client
    from .host import make_host, parse_multiaddr
    from .identity import generate
    from .membership import Membership, MembershipConfig
    from .registry.store import ChainStore
    from .route import Hop, RouteError, RouteResult, generate_route, plan_best

    beats: dict[str, Any] = {}

    def hops() -> list[Hop]:
        out = []
        for beat in beats.values():
            for name, facts in beat.meta.items():
                if facts.get("forward") and facts.get("span") and (request.model in (None, name)):
                    start, end = facts["span"]
                    out.append(Hop(beat.peer_id, tuple(beat.addrs), start, end, facts["fingerprint"], facts["layers"], facts.get("hidden")))
        return out

    async def run(store: Any) -> int:
        membership = Membership(
            generate(), MembershipConfig(role="observer", bootstrap=[args.addr], pow_bits=DEFAULT_POW_BITS), store,
            on_heartbeat=lambda beat: beats.__setitem__(beat.peer_id, beat),
        )
        host = make_host(generate(), psk=args.psk)
        async with host.run([parse_multiaddr("/ip4/0.0.0.0/tcp/0")]), trio.open_nursery() as nursery:
            await nursery.start(membership.run, host)
            route: list[Hop] = []
            with trio.move_on_after(args.wait):
                while not (route := plan_best(hops())):
                    await trio.sleep(0.2)
            if not route:
                have = sorted({f"{h.start}:{h.end}" for h in hops()})
                nursery.cancel_scope.cancel()
                return _fail(f"no route of spans covers the model after {args.wait:g} s (spans heard: {', '.join(have) or 'none'})", 1)
            print("route: " + " -> ".join(f"{h.start}:{h.end}@{h.peer_id[-8:]}" for h in route), file=sys.stderr, flush=True)
            code = 2
            with trio.move_on_after(args.timeout):
                try:
                    async with aclosing(generate_route(Client(host), request, route, candidates=hops)) as pieces:
                        async for piece in pieces:
                            if isinstance(piece, RouteResult):
                                if args.json:
                                    print(json.dumps(dataclasses.asdict(piece), ensure_ascii=False))
                                else:
                                    print("" if args.stream else piece.text)
                                code = 0
                            elif not args.json and args.stream:
                                sys.stdout.write(piece)
                                sys.stdout.flush()
                except RouteError as exc:
                    code = _fail(f"the route failed ({exc.code}): {exc}", 1)
            if code == 2:
                _fail(f"no answer within {args.timeout:g} s")
            nursery.cancel_scope.cancel()
            return code

    async def main() -> int:
        with tempfile.TemporaryDirectory(prefix="dllm-query-") as scratch:
            return await run(ChainStore(scratch))

    return trio.run(main)


def cmd_info(args: argparse.Namespace) -> int:
    from .client import ClientError, open_client

    async def run() -> int:
        async with open_client(psk=args.psk) as client:
            try:
                info = await client.info(args.addr)
            except (ClientError, ValueError) as exc:
                return _fail(str(exc))
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return 0

    return trio.run(run)


# --- answer -----------------------------------------------------------------------------


def cmd_answer(args: argparse.Namespace) -> int:
    from .answers import InvalidAnswer, check

    try:
        raw = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
        doc = json.loads(raw)
    except (OSError, ValueError) as exc:
        return _fail(f"{args.file}: {exc}")
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        return _fail(f"{args.file}: expected a JSON object with 'text' and 'signature'")
    try:
        statement = check(doc.get("signature"), text=doc["text"])
    except InvalidAnswer as exc:
        return _fail(f"not a valid signed answer: {exc}", 1)
    usage = statement["usage"]
    print(
        f"signed by {statement['peer_id']}\nmodel {statement['model']} ({statement['fingerprint']})\n"
        f"request sha256 {statement['request']}\n{usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
        f"completion tokens, finish_reason {statement['finish_reason']}"
    )
    return 0


# --- ledger -----------------------------------------------------------------------------


def cmd_ledger(args: argparse.Namespace) -> int:
    from .credits import InvalidLedger, allowance_holds, load_ledger_file, verify_records

    path = args.file if args.file is not None else Path(args.data_dir).expanduser() / "ledger.json"
    try:
        data = load_ledger_file(path)
        owner, records, proof = data["owner"], data["records"], data.get("pow")
        totals = verify_records(records, owner)
    except InvalidLedger as exc:
        return _fail(f"{path}: does not verify: {exc}", 1)
    # The allowance is the price of a proof of work; the file carries its owner's.
    allowance = allowance_holds(owner, proof)
    balance = totals.balance if allowance else totals.net
    if args.ledger_command == "verify":
        print(f"{path}: valid ledger of {owner}: {len(records)} records, balance {balance / 1000:.3f} credits")
        return 0
    receipts = [r for r in records if r["kind"] == "receipt"][-max(0, args.recent):] if args.recent else []
    if args.json:
        json.dump({"owner": owner, "unit": "millicredits", **totals.to_json(), "balance": balance, "allowance": allowance, "records": len(records),
                   "recent": [r["receipt"] | {"seq": r["seq"]} for r in receipts]}, sys.stdout, indent=2)
        print()
        return 0
    print(f"ledger of {owner} ({path})")
    grant = f"allowance 1000 (proof of work of {proof['bits']} bits)" if allowance else "no allowance (no proof of work in the file yet)"
    print(f"balance {balance / 1000:.3f} credits = {grant} + earned {totals.earned / 1000:.3f} - spent {totals.spent / 1000:.3f}")
    print(f"{totals.receipts} receipts, {len(records)} records in this file")
    for record in receipts:
        r = record["receipt"]
        role, other = ("earned", r["requester"]) if r["worker"] == owner else ("spent", r["worker"])
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"]))
        print(f"  #{record['seq']} {when} {role} {r['amount'] / 1000:.3f} ({r['prompt_tokens']}+{r['completion_tokens']} tokens of {r['model']}) with {other}")
    return 0


# --- model ------------------------------------------------------------------------------


def cmd_model(args: argparse.Namespace) -> int:
    from .engine import init_tiny

    path = init_tiny(args.dir)
    print(f"saved the tiny model to {path}; load it with --model {path}")
    return 0


# --- up ---------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from .localnet import run_up

    if args.workers < 1:
        return _fail("--workers must be at least 1")
    return run_up(args.workers, args.model, args.port, args.data_dir, args.verbose)


# --- registry, nodes, deregister --------------------------------------------------------


def cmd_registry(args: argparse.Namespace) -> int:
    from .host import AddressError
    from .registry.chain import RegistryError
    from .registry.ipfs import IpfsError
    from .registry.publish import Publisher, load_source
    from .registry.store import ChainStore, verify_file

    if args.registry_command == "verify":
        ok, message = verify_file(args.file)
        print(message, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1

    async def show() -> int:
        with tempfile.TemporaryDirectory(prefix="dllm-show-") as scratch:  # the fetched blocks
            publisher = await Publisher.open(Path(scratch), args.ipfs_api)
            try:
                if args.bootstrap and publisher.kubo is None:
                    chain = await _load_through_peers(args.source, publisher, args.bootstrap, args.psk)
                else:
                    chain = await load_source(args.source, publisher)
            except (RegistryError, IpfsError, OSError, AddressError) as exc:
                return _fail(f"{args.source}: {exc}", 1)
            finally:
                await publisher.aclose()
        if args.json:
            print(chain.to_json(), end="")
            return 0
        print(f"head {chain.head}  blocks {len(chain.blocks)}  compacted_at {chain.compacted_at}")
        for block in chain.blocks[1:]:
            rec = block["record"]
            print(f"  #{block['index']:<4} {rec['op']:<10} {rec['peer_id']}  seq {rec['seq']}  expires {_when(rec['expires'])}")
        live = chain.nodes()
        print(f"live nodes: {len(live)}")
        for rec in live.values():
            print(f"  {rec['peer_id']}  {rec.get('role', 'worker'):<7} {','.join(rec['models']) or '-':<12} {' '.join(rec['addrs'][:1])}")
        for line in _publication_lines(args.source):
            print(line)
        return 0

    async def publish() -> int:
        store = ChainStore(args.data_dir)
        try:
            chain = store.load()
            publisher = await Publisher.open(args.data_dir, args.ipfs_api)
        except (RegistryError, IpfsError) as exc:
            return _fail(str(exc), 1)
        try:
            print(publisher.describe(), file=sys.stderr)
            cid = await publisher.publish(chain)
            name = await publisher.publish_name()
        except IpfsError as exc:
            return _fail(f"publishing failed: {exc}", 1)
        finally:
            await publisher.aclose()
        print(cid)
        if name:
            print(f"/ipns/{name}")
        return 0

    return trio.run(show if args.registry_command == "show" else publish)


def _publication_lines(source: str) -> list[str]:
    """For a node's own blockchain.json (or its data dir): what it last published and
    where its IPNS name points, with their ages, from ``publication.json`` beside it."""
    from .registry.publish import STATE_FILE

    path = Path(source).expanduser()
    state_file = (path if path.is_dir() else path.parent) / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(state, dict):
        return []

    def ago(when: Any) -> str:
        return f"{max(0.0, time.time() - when):.0f} s ago" if isinstance(when, (int, float)) else "never"

    lines = [f"published /ipfs/{state.get('cid')} {ago(state.get('published_at'))} ({state.get('mode')})"]
    via = state.get("ipns_via")
    if via == "off":
        lines.append("IPNS: off (no daemon and no network: nothing points a name at this registry)")
    elif state.get("ipns"):
        where = "Kubo" if via == "kubo" else "the network's DHT (dllm nodes resolve it; public IPFS gateways do not)"
        lines.append(f"IPNS: /ipns/{state['ipns']} -> /ipfs/{state.get('ipns_cid')}, signed {ago(state.get('ipns_at'))}, through {where}")
    else:
        lines.append("IPNS: no name published yet")
    return lines


async def _load_through_peers(source: str, publisher: Any, bootstrap: list[str], psk: str | None) -> Any:
    """Load ``source`` (a CID or /ipns/ name) with a short-lived peer of our own that
    joins through ``bootstrap``: bitswap from the peers it reaches, the DHT for the rest."""
    from .host import make_host, parse_multiaddr, peer_info
    from .identity import generate
    from .registry.exchange import IpfsPeer
    from .registry.publish import load_source

    host = make_host(generate(), psk=psk)
    chain, failure = None, None
    async with host.run([parse_multiaddr("/ip4/0.0.0.0/tcp/0")]), trio.open_nursery() as nursery:
        peer = IpfsPeer(host, publisher.store, server=False)
        await nursery.start(peer.run)
        reached = 0
        for addr in bootstrap:
            try:
                with trio.fail_after(10):
                    await host.connect(peer_info(addr))
                reached += 1
            except Exception as exc:
                print(f"warning: bootstrap {addr}: {exc!r}", file=sys.stderr)
        if not reached:
            raise OSError("no bootstrap node answered")
        publisher.network = peer
        try:
            chain = await load_source(source, publisher)
        except Exception as exc:  # raised outside the nursery, not wrapped in a group
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return chain


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cmd_nodes(args: argparse.Namespace) -> int:
    from .host import connected_peers, make_host, parse_multiaddr
    from .identity import generate
    from .membership import Membership, MembershipConfig
    from .registry.chain import RegistryError
    from .registry.ipfs import IpfsError
    from .registry.publish import Publisher, load_source
    from .registry.store import ChainStore

    lan = not args.bootstrap and not args.registry
    if lan:
        print(f"no --bootstrap or --registry: looking for nodes on the LAN (mDNS) for {args.wait:g} s", file=sys.stderr, flush=True)

    async def run() -> int:
        with tempfile.TemporaryDirectory(prefix="dllm-nodes-") as scratch:
            return await listing(ChainStore(scratch))

    async def listing(store: Any) -> int:
        if args.registry:
            publisher = await Publisher.open(store.path.parent, args.ipfs_api)
            try:
                store.merge(await load_source(args.registry, publisher))
            except (RegistryError, IpfsError, OSError) as exc:
                return _fail(f"{args.registry}: {exc}", 1)
            finally:
                await publisher.aclose()
        beats: dict[str, Any] = {}
        #: Peers we held a connection to at the end: alive now, even if their heartbeat
        #: did not come within --wait (a relay beats every 30 s).
        connected: set[str] = set()
        if args.bootstrap or lan:
            identity = generate()
            membership = Membership(
                identity,
                MembershipConfig(
                    role="observer", bootstrap=args.bootstrap, ttl=args.ttl,
                    pow_bits=store.chain.pow_bits if store.chain.records else DEFAULT_POW_BITS,
                ),
                store,
                # Seen when sent, on our clock (see Membership._stamp).
                on_heartbeat=lambda beat: beats.__setitem__(beat.peer_id, (beat.seen_at, beat)),
            )
            host = make_host(identity, psk=args.psk)
            async with host.run([parse_multiaddr("/ip4/0.0.0.0/tcp/0")]):
                async with trio.open_nursery() as nursery:
                    await nursery.start(membership.run, host)
                    if lan:
                        from .lan import LanDiscovery

                        await nursery.start(LanDiscovery(host, membership.meet, args.psk).run)
                    await trio.sleep(args.wait)
                    connected = {peer.to_base58() for peer in connected_peers(host)}
                    nursery.cancel_scope.cancel()
        now = time.time()
        rows = []
        peers = dict(store.chain.nodes())
        for peer_id, (_, beat) in beats.items():
            peers.setdefault(peer_id, {"peer_id": peer_id, "addrs": beat.addrs, "models": beat.models, "role": beat.role})
        for peer_id, rec in sorted(peers.items()):
            seen, beat = beats.get(peer_id, (None, None))
            rows.append({
                "peer_id": peer_id,
                "role": rec.get("role", "worker"),
                "online": (seen is not None and now - seen <= beat.ttl(args.ttl)) or peer_id in connected,
                "models": beat.models if beat else rec.get("models", []),
                "addrs": beat.addrs if beat else rec.get("addrs", []),
                "last_seen": seen,
                "load": beat.load if beat else None,
                "expires": rec.get("expires"),
            })
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'peer id':<54} {'role':<8} {'status':<8} {'models':<14} {'last seen':<10} {'load':<10} address")
        for row in rows:
            load = row["load"] or {}
            load_text = f"{load.get('running', 0)}/{load.get('capacity', '?')}" if load else "-"
            seen_text = f"{now - row['last_seen']:.1f}s ago" if row["last_seen"] else "never"
            status = "online" if row["online"] else "offline"
            print(f"{row['peer_id']:<54} {row['role']:<8} {status:<8} {','.join(row['models']) or '-':<14} {seen_text:<10} {load_text:<10} {(row['addrs'] or ['-'])[0]}")
        if args.registry and not args.bootstrap:
            print("(read from the registry only: join with --bootstrap to see who is online)")
        return 0

    return trio.run(run)


def cmd_deregister(args: argparse.Namespace) -> int:
    from .host import host_addrs, make_host, parse_multiaddr
    from .identity import KEY_FILE, DataDirLock, DataDirLocked, load_or_create
    from .membership import Membership, MembershipConfig, proof_of_work
    from .registry.chain import RegistryError, make_record
    from .registry.store import ChainStore

    key = args.data_dir.expanduser() / KEY_FILE
    if not key.is_file():
        return _fail(f"{key} does not exist: there is no node to deregister in {args.data_dir}")
    try:
        DataDirLock(args.data_dir).acquire()
    except DataDirLocked as exc:
        return _fail(f"{exc} (a running node deregisters itself when it stops)")
    identity = load_or_create(args.data_dir)
    store = ChainStore(args.data_dir)
    try:
        store.load()
    except RegistryError as exc:
        return _fail(f"{store.path}: {exc}", 1)
    peer_id = identity.peer_id.to_base58()

    async def run() -> int:
        bits = store.chain.pow_bits if store.chain.records else DEFAULT_POW_BITS
        membership = Membership(identity, MembershipConfig(role="observer", bootstrap=args.bootstrap, pow_bits=bits), store)
        host = make_host(identity, psk=args.psk)
        async with host.run([parse_multiaddr("/ip4/0.0.0.0/tcp/0")]):
            async with trio.open_nursery() as nursery:
                await nursery.start(membership.run, host)  # joins: merges the bootstrap chain
                seq = max(int(time.time() * 1000), store.chain.next_seq(peer_id))
                bits = store.chain.pow_bits
                extra = {"pow": await trio.to_thread.run_sync(proof_of_work, args.data_dir, peer_id, bits)} if bits else {}
                record = make_record(identity, "deregister", host_addrs(host), [], seq, ttl=600, **extra)
                store.save(store.chain.append(record))
                if args.bootstrap:
                    await membership.push_to(args.bootstrap[0])
                nursery.cancel_scope.cancel()
        print(f"deregistered {peer_id} (seq {seq}); chain head {store.chain.head}")
        return 0

    return trio.run(run)
