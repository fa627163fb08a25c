"""IPFS without a daemon, between real processes on 127.0.0.1: workers serve their registry
publications over bitswap, an independent IPFS implementation (Helia, in Node.js) fetches
them by CID, a second worker serves the CID it learned, a peer that knows only a CID and
one address finds a provider through the DHT, ``/ipns/NAME`` resolves through the DHT, and
the gateway's trustless ``/ipfs/`` endpoint answers CARs that an IPFS tool verifies."""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dllm_p2p.identity import generate
from dllm_p2p.registry.chain import Chain, make_record, solve_pow
from dllm_p2p.registry.ipfs import EmbeddedStore, cid_of_directory

from .helia import run_helia, run_helia_failing, skip_unless_helia
from dllm_p2p.localnet import LISTENING, child_env

from .procs import Child, run_cli, start_gateway, start_worker

pytestmark = pytest.mark.integration

#: Low proof of work, so that 50 identities are signed in well under a second.
POW = "8"
#: Records live an hour: nothing changes the chain while a test looks at it.
STEADY = ["--heartbeat-interval", "1", "--record-ttl", "3600", "--pow-bits", POW, "--no-mdns"]


def published(data_dir: Path, timeout: float = 60) -> tuple[str, bytes]:
    """The node's current CID and the bytes of the file it published under it (read until
    the two agree: the node may be publishing as we read)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cid = (data_dir / "current_cid.txt").read_text().strip()
            data = (data_dir / "publish" / "blockchain.json").read_bytes()
            if cid_of_directory(data_dir / "publish") == cid:
                return cid, data
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{data_dir} published nothing consistent within {timeout} s")
        time.sleep(0.1)


def fetch_with_helia(tmp_path: Path, addr: str, cid: str, name: str = "fetched.json") -> bytes:
    out = tmp_path / name
    run_helia("fetch.mjs", "--peer", addr, "--cid", cid, "--path", "blockchain.json", "--out", str(out), "--timeout", "30", timeout=60)
    return out.read_bytes()


def chain_of(count: int) -> Chain:
    chain = Chain(pow_bits=int(POW))
    now = int(time.time())
    for i in range(count):
        who = generate()
        peer = who.peer_id.to_base58()
        chain = chain.append(make_record(
            who, "register", [f"/ip4/192.0.2.{i + 1}/tcp/4001"], ["tiny"], 1, ttl=80_000, now=now,
            pow=solve_pow(peer, int(POW)),
        ))
    return chain


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Child, str, Path]]:
    data_dir = tmp_path_factory.mktemp("ipfs") / "w1"
    worker, addr = start_worker(data_dir, *STEADY)
    try:
        yield worker, addr, data_dir
    finally:
        worker.stop()


def test_helia_fetches_a_workers_registry_over_bitswap(first: tuple[Child, str, Path], tmp_path: Path) -> None:
    skip_unless_helia()
    _, addr, data_dir = first
    cid, data = published(data_dir)
    assert fetch_with_helia(tmp_path, addr, cid) == data
    # A CID the worker does not hold: Helia gives up at its own deadline, with a message.
    err = run_helia_failing("fetch.mjs", "--peer", addr, "--cid", "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn",
                            "--out", str(tmp_path / "none"), "--timeout", "3", timeout=30)
    assert err


def test_helia_fetches_a_chain_of_50_records_and_a_second_worker_serves_it_too(first: tuple[Child, str, Path], tmp_path: Path) -> None:
    skip_unless_helia()
    _, addr, data_dir = first
    source = tmp_path / "fifty.json"
    source.write_text(chain_of(50).to_json())
    second_dir = tmp_path / "w2"
    second, second_addr = start_worker(second_dir, *STEADY, "--registry", str(source), "--bootstrap", addr)
    try:
        # Both hold the union (50 + the two workers) and publish it under the same CID.
        deadline = time.monotonic() + 90
        while True:
            cid, data = published(data_dir)
            cid2, _ = published(second_dir)
            if cid == cid2 and data.count(b'"op": "register"') >= 52:
                break
            assert time.monotonic() < deadline, f"the workers did not settle on one 52-record chain ({cid}, {cid2})"
            time.sleep(0.2)
        assert fetch_with_helia(tmp_path, addr, cid, "a.json") == data
        assert fetch_with_helia(tmp_path, second_addr, cid, "b.json") == data
    finally:
        second.stop()


def show(*args: str) -> str:
    result = run_cli("registry", "show", *args, "--json", timeout=90)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_peer_that_knows_only_a_cid_or_name_and_one_node_finds_it_through_the_dht(tmp_path: Path) -> None:
    """The bootstrap node, a relay of another registry (its proof of work differs, so it
    never takes this one), holds none of the worker's blocks: only the worker's provider
    record and IPNS record, which the worker stored in the DHT through it."""
    from dllm_p2p.registry.ipns import ipns_name

    relay = Child(
        [sys.executable, "-m", "dllm_p2p", "relay", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(tmp_path / "relay"),
         "--pow-bits", "9", "--no-mdns"], name="relay", env=child_env(),
    )
    worker = None
    try:
        relay_addr = relay.wait_for_line(LISTENING, timeout=60).group(1)
        worker, addr = start_worker(tmp_path / "w", *STEADY, "--bootstrap", relay_addr)
        cid = worker.wait_for_line(r"provider record for (Qm\w+) announced", timeout=60, stream="err").group(1)
        worker.wait_for_line(rf"IPNS name /ipns/\w+ -> /ipfs/{cid}", timeout=30, stream="err")
        head = Chain.from_json(EmbeddedStore(tmp_path / "w" / "ipfs").get_file(f"{cid}/blockchain.json")).head
        shown = show(cid, "--bootstrap", relay_addr)
        assert Chain.from_json(shown.encode()).head == head
        assert not (tmp_path / "relay" / "ipfs" / "blocks" / cid).exists()  # it came from the worker
        name = ipns_name(addr.rsplit("/", 1)[1])
        # The node's own registry file says where its name points, and since when.
        local = run_cli("registry", "show", str(tmp_path / "w" / "blockchain.json"))
        assert local.returncode == 0, local.stderr
        assert f"IPNS: /ipns/{name} -> /ipfs/{cid}, signed " in local.stdout and "the network's DHT" in local.stdout, local.stdout
        shown = show(f"/ipns/{name}", "--bootstrap", relay_addr)
        assert Chain.from_json(shown.encode()).head == head
        # A node started with only the name and the relay loads the chain, no daemon.
        gateway, _ = start_gateway(tmp_path / "gw", "--registry", f"/ipns/{name}", "--bootstrap", relay_addr, "--pow-bits", POW, "--no-mdns")
        try:
            gateway.wait_for_line(rf"registry /ipns/{name} loaded from peers", timeout=90, stream="err")
        finally:
            gateway.stop()
        # The worker was asked to take the relay's chain (of another network) repeatedly
        # and said why it would not, once.
        assert sum("another network" in line for line in worker.stderr) == 1, worker.output()
    finally:
        if worker is not None:
            worker.stop()
        relay.stop()


def test_the_trustless_gateway_answers_raw_blocks_and_a_car_that_helia_verifies(tmp_path: Path) -> None:
    gateway, url = start_gateway(tmp_path / "gw", "--pow-bits", POW, "--no-mdns")
    try:
        cid, data = published(tmp_path / "gw")
        with httpx.Client(base_url=url, timeout=30) as http:
            raw = http.get(f"/ipfs/{cid}", headers={"Accept": "application/vnd.ipld.raw"})
            assert raw.status_code == 200 and raw.headers["content-type"] == "application/vnd.ipld.raw"
            assert hashlib.sha256(raw.content).digest() == __import__("dllm_p2p.registry.bitswap", fromlist=["x"]).binary_cid(cid)[2:]
            assert http.get(f"/ipfs/{cid}/blockchain.json", headers={"Accept": "application/vnd.ipld.raw"}).status_code == 400
            car = http.get(f"/ipfs/{cid}/blockchain.json", headers={"Accept": "application/vnd.ipld.car"})
            assert car.status_code == 200 and car.headers["content-type"].startswith("application/vnd.ipld.car; version=1")
            assert "attachment" in car.headers["content-disposition"]
            plain = http.get(f"/ipfs/{cid}/blockchain.json")
            assert plain.status_code == 200 and plain.content == data
            assert http.get("/ipfs/QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn").status_code == 404
            assert http.get("/ipfs/not-a-cid").status_code == 400
        path = tmp_path / "registry.car"
        path.write_bytes(car.content)
        skip_unless_helia()
        checked = run_helia("car-verify.mjs", str(path), "--root", cid, "--path", "blockchain.json")
        assert checked["file_sha256"] == hashlib.sha256(data).hexdigest() and checked["roots"] == [cid]
        damaged = bytearray(car.content)
        damaged[-10] ^= 1
        path.write_bytes(bytes(damaged))
        assert run_helia_failing("car-verify.mjs", str(path), "--root", cid)
    finally:
        gateway.stop()
