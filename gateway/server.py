"""``python -m gateway``: one trio loop running a libp2p host, membership and the HTTP API."""

from __future__ import annotations

import argparse
import logging
import os
import time
import sys
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from dllm_p2p.cli import open_registry, relay_candidates, until_signal
from dllm_p2p.client import Client
from dllm_p2p.heartbeat import Heartbeat
from dllm_p2p.host import AddressError, check_psk, make_host, parse_multiaddr
from dllm_p2p.identity import DataDirLock, DataDirLocked, load_or_create
from dllm_p2p.lifeline import watch_parent
from dllm_p2p.membership import Membership, MembershipConfig, deregistered
from dllm_p2p.lan import LanDiscovery
from dllm_p2p.ledger_service import LedgerService
from dllm_p2p.reach import Reach
from dllm_p2p.registry.ipfs import IpfsError
from dllm_p2p.registry.chain import DEFAULT_POW_BITS
from dllm_p2p.registry.publish import Publisher
from dllm_p2p.registry.sinks import PUBLISH_TO_HELP, make_sinks, sink_argument
from dllm_p2p.registry.store import ChainStore

from .accounts import Accounts
from .app import Gateway, create_app
from .audit import PROBATION_PASSES, PROBE_INTERVAL, Auditor
from .history import CAPACITY as HISTORY_SAMPLES, DEFAULT_INTERVAL as HISTORY_INTERVAL, History, metrics_figures
from .nodes import NodeTable

log = logging.getLogger("gateway")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description="HTTP gateway to a dllm-p2p network")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="HTTP address (default 127.0.0.1:8080; port 0 picks a free one)")
    p.add_argument("--p2p-listen", default="/ip4/0.0.0.0/tcp/0", metavar="MULTIADDR", help="libp2p listen address (default: any free TCP port)")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR", help="a node to join the network through (repeatable)")
    p.add_argument("--registry", default=None, metavar="SOURCE", help="seed the registry from a file, CID or /ipns/ name")
    p.add_argument("--ipfs-api", default=None, metavar="URL", help="Kubo RPC API for CIDs and IPNS names (default http://127.0.0.1:5001 when reachable)")
    p.add_argument("--publish-to", action="append", default=[], type=sink_argument, metavar="SINK", help=PUBLISH_TO_HELP)
    p.add_argument("--data-dir", default="~/.dllm/gateway", type=Path, help="gateway key and registry copy (default ~/.dllm/gateway)")
    p.add_argument("--policy", choices=["p2c", "random"], default="p2c", help="node choice: power of two choices on load and latency (default) or random")
    p.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds between heartbeats (default 2)")
    p.add_argument("--ttl", type=float, default=None, help="seconds without a heartbeat before a node is offline (default 3 intervals + 1)")
    p.add_argument("--max-attempts", type=int, default=3, help="nodes tried per request before giving up (default 3)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN", help="allowed browser origin (repeatable; default *)")
    p.add_argument("--public-url", default=None, help="announce this URL in the registry so pages can find this gateway")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on POST routes (repeatable; also read from DLLM_API_KEYS, comma-separated)")
    p.add_argument("--rate-limit", type=float, default=0.0, help="requests per second per client (API key or address); 0 = off (default)")
    p.add_argument("--rate-burst", type=int, default=20, help="burst allowed above --rate-limit (default 20)")
    p.add_argument("--pow-bits", type=int, default=DEFAULT_POW_BITS, help=f"proof of work of the network's registry records (default {DEFAULT_POW_BITS}; the same on every node)")
    p.add_argument("--audit-rate", type=float, default=0.05, metavar="R", help="fraction of answers re-checked on another worker with the same weights (default 0.05; 0 = off)")
    p.add_argument("--probe-interval", type=float, default=PROBE_INTERVAL, metavar="S", help=f"seconds between probe audits of a quarantined worker; {PROBATION_PASSES} passes in a row free it (default {PROBE_INTERVAL:g})")
    p.add_argument("--history-interval", type=float, default=HISTORY_INTERVAL, metavar="S", help=f"seconds between samples of the nodes for /api/history and the page's charts; the last {HISTORY_SAMPLES} are kept (default {HISTORY_INTERVAL:g})")
    p.add_argument("--allow-peer", action="append", default=None, metavar="PEER_ID", help="route only to these worker peer ids (repeatable)")
    p.add_argument("--no-credits", action="store_true", help="do not ask workers for receipts: no ledger, no per-key accounts; workers then treat this gateway as a new identity (docs/CREDITS.md)")
    p.add_argument("--psk", default=None, help="private network key (64 hex chars)")
    p.add_argument("--no-mdns", action="store_true", help="do not look for peers on the LAN with mDNS (on by default)")
    p.add_argument("--no-hole-punch", action="store_true", help="stay relayed: never upgrade a relayed connection to a direct one (DCUtR)")
    p.add_argument("--no-relay", action="store_true", help="never relay for others (by default a gateway that peers can reach directly offers circuit-relay reservations)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


async def run_gateway(
    args: argparse.Namespace, *, task_status: Any = trio.TASK_STATUS_IGNORED, stop: trio.CancelScope | None = None
) -> None:
    lock = DataDirLock(args.data_dir).acquire()  # one process per data dir
    identity = load_or_create(args.data_dir)
    store = ChainStore(args.data_dir)
    membership_config = MembershipConfig(
        role="gateway",
        bootstrap=args.bootstrap,
        heartbeat_interval=args.heartbeat_interval,
        ttl=args.ttl,
        gateway_url=args.public_url,
        pow_bits=args.pow_bits,
    )
    table = NodeTable(ttl=membership_config.effective_ttl, policy=args.policy, allow=args.allow_peer)
    api_keys = list(args.api_key or []) + [k for k in os.environ.get("DLLM_API_KEYS", "").split(",") if k]

    ledger = None if args.no_credits else LedgerService(identity, args.data_dir, pow_bits=args.pow_bits)

    def on_heartbeat(beat: Heartbeat) -> None:
        if ledger is not None:
            ledger.on_heartbeat(beat)
        if beat.role == "worker":
            # When it was sent, on our clock (Membership._stamp): a node with a slow clock
            # is live, a late or replayed heartbeat counts from when it was sent.
            table.heartbeat(
                beat.peer_id, models=beat.models, load=beat.load, addrs=beat.addrs, meta=beat.meta, every=beat.every, now=beat.seen_at
            )

    def on_chain(chain: Any) -> None:
        table.update_from_registry(chain.nodes().values())
        for peer_id in deregistered(chain):
            table.forget(peer_id)

    publisher = await open_registry(store, args.data_dir, args.ipfs_api, args.registry)
    membership = Membership(
        identity, membership_config, store,
        on_heartbeat=on_heartbeat, on_chain=on_chain, publisher=publisher, on_bad_heartbeat=table.bad_heartbeat,
        ledger=ledger.summary if ledger is not None else None,
        sinks=make_sinks(getattr(args, "publish_to", None), identity, args.data_dir),
    )
    host = make_host(identity, psk=args.psk)
    reach = Reach(
        host, psk=args.psk, relays=relay_candidates(args.bootstrap, store), hop=False if args.no_relay else "auto",
        hole_punch=not args.no_hole_punch,
    )
    accounts = Accounts(args.data_dir) if ledger is not None else None
    # Reuse streams to workers (no setup per request); pay for every answer with a receipt.
    client = Client(host, keep_alive=True, ledger=ledger)
    auditor = Auditor(table, client, rate=args.audit_rate, evidence_dir=Path(args.data_dir).expanduser() / "audits", probe_interval=args.probe_interval)
    # The registry's state, for /api/registry and its history (blocks, records, publications).
    def registry_info() -> dict[str, Any]:
        return describe_registry(store, publisher)

    # Samples of the table for /api/history and the page's charts; the last hour at most.
    history = History(table, interval=args.history_interval, credits=ledger.peer_credits if ledger is not None else None, registry=registry_info)
    gw = Gateway(
        table,
        client,
        registry_info=registry_info,
        max_attempts=args.max_attempts,
        cors_origins=args.cors_origin,
        api_keys=api_keys,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        auditor=auditor,
        blocks=publisher.store,
        ledger=ledger,
        accounts=accounts,
        history=history,
    )
    history.figures = metrics_figures(gw.metrics)
    app = create_app(gw)
    config = Config()
    config.bind = [args.listen]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    try:
        async with host.run([parse_multiaddr(args.p2p_listen)]):
            async with trio.open_nursery() as nursery:
                await nursery.start(reach.run)
                if ledger is not None:
                    await nursery.start(ledger.run, host)
                if accounts is not None:
                    nursery.start_soon(accounts.run)
                await nursery.start(membership.run, host)
                if not args.no_mdns:
                    nursery.start_soon(LanDiscovery(host, membership.meet, args.psk).run)
                nursery.start_soon(auditor.run)
                nursery.start_soon(drop_silent, table, host)
                nursery.start_soon(history.run)
                if stop is not None:
                    nursery.start_soon(until_signal, stop, membership.leave)
                binds = await nursery.start(serve, app, config)
                for bind in binds:
                    print(f"gateway listening on {bind}", flush=True)
                task_status.started(binds)
    finally:
        await publisher.aclose()
        lock.release()


async def drop_silent(table: NodeTable, host: Any, every: float = 1.0) -> None:
    """Close the connections of workers whose heartbeats stopped (a crash, a pulled
    cable, a partition): TCP may think such a connection open for minutes, and a request
    waiting on it would wait for the answer deadline. Closed, it fails at once and is
    retried on a node that answers."""
    from libp2p.peer.id import ID

    while True:
        await trio.sleep(every)
        now = time.time()
        network = host.get_network()
        for node in list(table.nodes.values()):
            if not node.last_seen or node.online(now, table.ttl):
                continue
            try:
                peer = ID.from_base58(node.peer_id)
                if network.get_connections(peer):
                    log.info("closing the connection to %s: no heartbeat for %.0f s", node.peer_id, now - node.last_seen)
                    with trio.move_on_after(2):
                        await network.close_peer(peer)
            except Exception as exc:
                log.debug("closing %s: %r", node.peer_id, exc)


def describe_registry(store: ChainStore, publisher: Publisher) -> dict[str, Any]:
    chain = store.chain
    return {
        "head": chain.head,
        "blocks": len(chain.blocks),
        "compacted_at": chain.compacted_at,
        "nodes": list(chain.nodes().values()),
        **publisher.state(),  # cid, published_at, mode, ipns, ipns_cid, ipns_at, ipns_via
    }


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line, or None."""
    if args.max_attempts < 1:
        return f"--max-attempts must be at least 1, not {args.max_attempts}"
    if args.rate_limit < 0 or args.rate_burst < 1:
        return "--rate-limit must be >= 0 and --rate-burst >= 1"
    if not 0 <= args.audit_rate <= 1:
        return f"--audit-rate must be between 0 and 1, not {args.audit_rate:g}"
    if not args.history_interval > 0:
        return f"--history-interval must be above 0 seconds, not {args.history_interval:g}"
    if not args.probe_interval > 0:
        return f"--probe-interval must be above 0 seconds, not {args.probe_interval:g}"
    try:
        MembershipConfig(role="gateway", heartbeat_interval=args.heartbeat_interval, ttl=args.ttl, pow_bits=args.pow_bits)
        args.psk = check_psk(args.psk)
    except (ValueError, AddressError) as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    watch_parent()  # a child of `up` stops when `up` dies, however it dies
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("libp2p").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)

    async def main_task() -> None:
        with trio.CancelScope() as scope:
            await run_gateway(args, stop=scope)

    try:
        trio.run(main_task)
    except DataDirLocked as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, IpfsError) as exc:
        print(f"error: cannot start the gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the signal handler was installed
        return 130
    print("gateway stopped", file=sys.stderr, flush=True)
    return 0


