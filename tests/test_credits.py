"""Credits: receipts, ledgers, balances, forks and priority (dllm_p2p/credits.py, docs/CREDITS.md).

The unit tests build receipts and ledgers with real keys; the integration tests run real
workers and gateways on 127.0.0.1 and read what they wrote.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dllm_p2p import credits, identity
from dllm_p2p.identity import load_or_create

from .procs import HEARTBEAT, LocalNetwork, get_json, run_cli, start_gateway, start_worker, wait_for, wait_online


def _offer(worker: identity.Identity, requester: identity.Identity, *, completion: int = 16, prompt: int = 3, params: int = 1000, now: float | None = None, rid: str | None = None) -> dict[str, Any]:
    signature = {"usage": {"prompt_tokens": prompt, "completion_tokens": completion}, "model": "m", "fingerprint": "sha256:ab", "sig": rid or str(time.time_ns())}
    return credits.make_receipt(
        worker, requester=requester.peer_id.to_base58(), request_id=rid, request_digest="cd" * 32, signature=signature,
        params=params, now=now,
    )


def _receipt(worker: identity.Identity, requester: identity.Identity, **kw: Any) -> dict[str, Any]:
    return credits.countersign(requester, _offer(worker, requester, **kw))


# --- the rule and receipts -------------------------------------------------------------


def test_the_price_rule() -> None:
    # One generated token of a 1B model is one credit (1000 mc); a prompt token a quarter.
    assert credits.amount_mc(10**9, 0, 1) == 1000
    assert credits.amount_mc(10**9, 4, 0) == 1000
    # SmolLM2-135M, 10 prompt + 64 generated tokens: (10 + 256) x 134,515,008 / 4e6, rounded up.
    assert credits.amount_mc(134_515_008, 10, 64) == 8946
    assert credits.amount_mc(10, 0, 1) == 1  # never free


def test_a_receipt_verifies_and_any_change_breaks_it() -> None:
    worker, requester = identity.generate(), identity.generate()
    receipt = _receipt(worker, requester)
    assert credits.check_receipt(receipt) is receipt
    for key, value in (("amount", receipt["amount"] + 1), ("completion_tokens", 17), ("requester", worker.peer_id.to_base58())):
        with pytest.raises(credits.InvalidReceipt):
            credits.check_receipt({**receipt, key: value})
    # Repriced consistently (amount follows the rule) it is still not what was signed.
    bigger = {**receipt, "params": 2000, "amount": credits.amount_mc(2000, 3, 16)}
    with pytest.raises(credits.InvalidReceipt, match="does not verify"):
        credits.check_receipt(bigger)
    with pytest.raises(credits.InvalidReceipt, match="requester_sig"):
        credits.check_receipt({k: v for k, v in receipt.items() if k != "requester_sig"})


def test_a_requester_countersigns_only_its_own_answer() -> None:
    worker, requester, other = identity.generate(), identity.generate(), identity.generate()
    signature = {"usage": {"prompt_tokens": 3, "completion_tokens": 16}, "model": "m", "fingerprint": "sha256:ab", "sig": "x"}
    offer = credits.make_receipt(worker, requester=requester.peer_id.to_base58(), request_id=None, request_digest="cd" * 32, signature=signature, params=1000)
    done = {"signature": signature, "usage": signature["usage"], "model": "m", "fingerprint": "sha256:ab"}
    me, them = requester.peer_id.to_base58(), worker.peer_id.to_base58()
    assert credits.check_offer(offer, requester=me, worker=them, done=done)
    with pytest.raises(credits.InvalidReceipt, match="not us"):
        credits.check_offer(offer, requester=other.peer_id.to_base58(), worker=them, done=done)
    with pytest.raises(credits.InvalidReceipt, match="other tokens"):
        credits.check_offer(offer, requester=me, worker=them, done={**done, "usage": {"prompt_tokens": 3, "completion_tokens": 15}})
    with pytest.raises(credits.InvalidReceipt, match="another answer"):
        credits.check_offer(offer, requester=me, worker=them, done={**done, "signature": {**signature, "sig": "y"}})
    with pytest.raises(credits.InvalidReceipt, match="time"):
        credits.check_offer(offer, requester=me, worker=them, done=done, now=time.time() + 3600)


# --- ledgers -----------------------------------------------------------------------------


def test_ledger_balances_come_from_receipts_and_survive_a_restart(tmp_path: Path) -> None:
    me, a, b = identity.generate(), identity.generate(), identity.generate()
    ledger = credits.Ledger(tmp_path, me)
    earned = ledger.append(_receipt(me, a, completion=10))
    ledger.append(_receipt(b, me, completion=4))
    again = _receipt(me, b, completion=2)
    ledger.append(again)
    with pytest.raises(credits.DuplicateReceipt):  # held once
        ledger.append(again)
    amounts = [r["receipt"]["amount"] for r in ledger.records]
    assert ledger.totals.earned == amounts[0] + amounts[2] and ledger.totals.spent == amounts[1]
    assert ledger.totals.balance == credits.ALLOWANCE_MC + amounts[0] + amounts[2] - amounts[1]
    assert earned["seq"] == 1 and ledger.seq == 3
    reopened = credits.Ledger(tmp_path, me)
    assert reopened.totals == ledger.totals and reopened.head == ledger.head
    with pytest.raises(credits.InvalidReceipt, match="does not name"):
        ledger.append(_receipt(a, b))


def test_verify_names_the_first_bad_record(tmp_path: Path) -> None:
    me, peer = identity.generate(), identity.generate()
    ledger = credits.Ledger(tmp_path, me)
    for n in range(4):
        ledger.append(_receipt(me, peer, completion=n + 1))
    good = json.loads(ledger.path.read_text())
    assert credits.verify_records(good["records"], good["owner"]).receipts == 4

    def broken(change) -> str:  # type: ignore[no-untyped-def]
        data = copy.deepcopy(good)
        change(data["records"])
        with pytest.raises(credits.InvalidLedger) as caught:
            credits.verify_records(data["records"], data["owner"])
        return str(caught.value)

    assert broken(lambda r: r[2]["receipt"].__setitem__("completion_tokens", 99)).startswith("record 3:")
    assert "expected sequence number 3" in broken(lambda r: r.pop(2))
    # Re-signed by the owner after an edit, the chain still shows it: prev no longer matches.
    def resign(records: list[dict[str, Any]]) -> None:
        body = {k: v for k, v in records[1].items() if k != "sig"} | {"receipt": _receipt(me, peer, completion=9)}
        records[1] = credits.sign_record(me, body)
    assert broken(resign).startswith("record 3: prev")
    assert "twice" in broken(lambda r: r.__setitem__(3, credits.sign_record(me, {**{k: v for k, v in r[3].items() if k != "sig"}, "receipt": r[2]["receipt"]})))


def test_ledger_verify_cli_and_one_flipped_byte(tmp_path: Path) -> None:
    me, peer = identity.generate(), identity.generate()
    ledger = credits.Ledger(tmp_path, me)
    for n in range(3):
        ledger.append(_receipt(peer, me, completion=n + 1))
    ok = run_cli("ledger", "verify", str(ledger.path))
    assert ok.returncode == 0 and "valid ledger" in ok.stdout, ok.stderr
    shown = run_cli("ledger", "show", "--data-dir", str(tmp_path), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["spent"] == ledger.totals.spent and len(json.loads(shown.stdout)["recent"]) == 3
    raw = bytearray(ledger.path.read_bytes())
    at = raw.index(b'"completion_tokens": 2') + len(b'"completion_tokens": ')
    raw[at] = ord("3")
    flipped = tmp_path / "flipped.json"
    flipped.write_bytes(bytes(raw))
    bad = run_cli("ledger", "verify", str(flipped))
    assert bad.returncode == 1 and "record 2" in bad.stderr, bad.stderr


def test_checkpoints_bound_the_file_and_lose_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credits, "CHECKPOINT_EVERY", 5)
    me, peer = identity.generate(), identity.generate()
    ledger = credits.Ledger(tmp_path, me)
    for n in range(12):
        ledger.append(_receipt(me, peer, completion=n + 1))
    records = json.loads(ledger.path.read_text())["records"]
    # 12 receipts: checkpoints after the 5th and the 10th (records 6 and 12), 2 receipts since.
    assert [r["kind"] for r in records] == ["checkpoint", "receipt", "receipt"]
    assert records[0]["seq"] == 12 and records[0]["receipts"] == 10
    archived = [json.loads(line) for line in (tmp_path / credits.ARCHIVE_FILE).read_text().splitlines()]
    assert [r["seq"] for r in archived] == list(range(1, 12))
    assert credits.verify_records(archived + records, me.peer_id.to_base58()) == ledger.totals
    assert credits.Ledger(tmp_path, me).totals == ledger.totals


def test_a_ledger_that_does_not_verify_is_kept_aside(tmp_path: Path) -> None:
    me = identity.generate()
    (tmp_path / credits.LEDGER_FILE).write_text('{"version": 1, "owner": "x", "records": [{"seq": 1}]}')
    ledger = credits.Ledger(tmp_path, me)
    assert ledger.seq == 0
    assert [p.name.startswith("ledger.json.invalid-") for p in tmp_path.iterdir()] == [True]


def test_two_records_with_one_number_are_a_fork() -> None:
    me, peer = identity.generate(), identity.generate()
    owner = me.peer_id.to_base58()
    first = credits.sign_record(me, {"owner": owner, "seq": 1, "prev": credits.GENESIS, "kind": "receipt", "receipt": _receipt(me, peer)})
    other = credits.sign_record(me, {"owner": owner, "seq": 1, "prev": credits.GENESIS, "kind": "receipt", "receipt": _receipt(me, peer)})
    peers = credits.PeerLedgers()
    assert peers.take_record(first) is None and peers.take_record(first) is None
    fork = peers.take_record(other)
    assert fork is not None and fork.seq == 1 and peers.balance(owner) < -(10**15)


def test_the_allowance_is_the_price_of_a_proof_of_work() -> None:
    from dllm_p2p.registry.chain import solve_pow

    me, other = identity.generate(), identity.generate()
    owner = me.peer_id.to_base58()
    proof = {"bits": 8, "nonce": solve_pow(owner, 8)}
    assert credits.allowance_holds(owner, proof, 8) and credits.allowance_holds(owner, proof)
    assert not credits.allowance_holds(owner, proof, 12)  # the network asks for more
    assert not credits.allowance_holds(other.peer_id.to_base58(), proof, 8)  # another key's
    assert not credits.allowance_holds(owner, None) and not credits.allowance_holds(owner, {"bits": True, "nonce": "0"})
    peers = credits.PeerLedgers()
    spent = credits.Totals(earned=0, spent=300_000, receipts=1)
    peers.set_verified(owner, spent, credits.GENESIS, allowance=True)
    peers.set_verified("without", spent, credits.GENESIS, allowance=False)
    assert peers.balance(owner) == credits.ALLOWANCE_MC - 300_000 and peers.balance("without") == -300_000
    assert peers.balance("unknown") is None


def test_what_a_hostile_peer_sends_is_refused_cleanly(tmp_path: Path) -> None:
    from dllm_p2p.ledger_service import LedgerService

    worker, requester = identity.generate(), identity.generate()
    me, them = requester.peer_id.to_base58(), worker.peer_id.to_base58()
    offer = _offer(worker, requester)
    done = {"usage": {"prompt_tokens": 3, "completion_tokens": 16}, "model": "m", "fingerprint": "sha256:ab"}
    for signature in ({"x": float("nan")}, {"x": b"raw"}, "text", None):  # not plain JSON, or not a map
        with pytest.raises(credits.InvalidReceipt):
            credits.check_offer(offer, requester=me, worker=them, done={**done, "signature": signature})
    service = LedgerService(worker, tmp_path)
    full = credits.countersign(requester, offer)
    record = credits.sign_record(requester, {"owner": me, "seq": 1, "prev": credits.GENESIS, "kind": "receipt", "receipt": full})
    frame = {"type": "countersign", "requester_sig": full["requester_sig"], "record": record}
    assert service.take_countersign(offer, frame, me) == full
    padded = credits.sign_record(requester, {**{k: v for k, v in record.items() if k != "sig"}, "pad": "x" * 60_000})
    stripped = credits.sign_record(requester, {"owner": me, "seq": 1, "prev": credits.GENESIS, "kind": "receipt", "receipt": {"worker": them}})
    nested: Any = []
    for _ in range(5000):
        nested = [nested]
    for bad in (None, {**record, "receipt": nested}, padded, stripped, {**record, "seq": "1"}):
        with pytest.raises(credits.InvalidReceipt):
            service.take_countersign(offer, {**frame, "record": bad}, me)
    with pytest.raises(credits.InvalidReceipt):  # signed by someone else
        service.take_countersign(offer, frame, them)


def test_a_peers_checkpoint_counts_its_debt_not_its_claimed_credit() -> None:
    me = identity.generate()
    owner = me.peer_id.to_base58()
    boast = credits.sign_record(me, {"owner": owner, "seq": 9, "prev": "ab" * 32, "kind": "checkpoint", "time": 1, "earned": 2**61, "spent": 0, "receipts": 1})
    debt = credits.sign_record(me, {"owner": owner, "seq": 9, "prev": "ab" * 32, "kind": "checkpoint", "time": 1, "earned": 5, "spent": 900, "receipts": 3})
    assert credits.verify_records([boast], owner).earned == 2**61  # our own file: our own word
    assert credits.verify_records([boast], owner, trust_checkpoint=False).net == 0
    assert credits.verify_records([debt], owner, trust_checkpoint=False).net == -895


def test_a_receipt_is_refused_again_after_a_checkpoint_and_archived_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credits, "CHECKPOINT_EVERY", 3)
    me, peer = identity.generate(), identity.generate()
    ledger = credits.Ledger(tmp_path, me)
    first = _receipt(me, peer, rid="first")
    ledger.append(first)
    for n in range(3):
        ledger.append(_receipt(me, peer, rid=f"n{n}"), save=False)
    real = credits.write_atomic
    calls = {"n": 0}

    def failing(*args: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full")
        real(*args, **kw)

    monkeypatch.setattr(credits, "write_atomic", failing)
    with pytest.raises(OSError):
        ledger.flush()  # the archive was written, the file was not
    ledger.flush()
    seqs = [json.loads(line)["seq"] for line in (tmp_path / credits.ARCHIVE_FILE).read_text().splitlines()]
    assert seqs == [1, 2, 3], seqs  # once each, though written twice
    with pytest.raises(credits.DuplicateReceipt):
        ledger.append(first)  # archived, still remembered


def test_heartbeats_tell_only_what_is_on_disk(tmp_path: Path) -> None:
    me, peer = identity.generate(), identity.generate()
    ledger = credits.Ledger(tmp_path, me)
    ledger.append(_receipt(me, peer), save=False)
    assert ledger.summary()["seq"] == 0 and ledger.seq == 1
    ledger.flush()
    assert ledger.summary()["seq"] == 1


def test_forks_are_bounded_and_withheld_records_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(credits, "MAX_FORKS", 3)
    peers = credits.PeerLedgers()
    for n in range(5):
        peer = f"peer{n}"
        peers.take_summary(peer, {"seq": 1, "head": "aa" * 32, "earned": 0, "spent": 0, "recent": []}, b"one")
        assert peers.take_summary(peer, {"seq": 1, "head": "bb" * 32, "earned": 0, "spent": 0, "recent": []}, b"two")
    assert list(peers.forks) == ["peer2", "peer3", "peer4"]
    # A requester that countersigned with its record 1, then goes on saying its ledger is empty.
    me, worker = identity.generate(), identity.generate()
    owner = me.peer_id.to_base58()
    record = credits.sign_record(me, {"owner": owner, "seq": 1, "prev": credits.GENESIS, "kind": "receipt", "receipt": _receipt(worker, me)})
    assert peers.take_record(record, given=True) is None
    empty = {"seq": 0, "head": credits.GENESIS, "earned": 0, "spent": 0, "recent": []}
    assert peers.take_summary(owner, empty, b"beat") is None  # within the grace: it may not have written yet
    monkeypatch.setattr(credits, "WITHHELD_GRACE_S", -1.0)
    fork = peers.take_summary(owner, empty, b"beat")
    assert fork is not None and fork.hashes[1] == "withheld" and fork.evidence[0] == record


# --- priority in the engine ----------------------------------------------------------------


@pytest.mark.trio
async def test_the_queue_admits_higher_balances_first() -> None:
    import trio

    from dllm_p2p.engine import Engine, GenerationParams, load_model

    engine = Engine(load_model("tiny"), max_batch_size=1, max_queue=8)
    engine.start()
    order: list[int] = []
    try:
        async def one(priority: int, tokens: int) -> None:
            params = GenerationParams(prompt="hi", max_new_tokens=tokens, min_new_tokens=tokens, temperature=0, priority=priority)
            async with engine.generate(params, stream=False) as generation:
                async for _ in generation:
                    pass
            order.append(priority)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 0, 500)  # holds the only slot while the others queue
            while engine.stats()["running"] == 0:
                await trio.sleep(0.001)
            for n, priority in enumerate((1, 5, 3, 5, -2)):
                nursery.start_soon(one, priority, 1)
                with trio.fail_after(10):
                    while engine.stats()["queued"] < n + 1:
                        await trio.sleep(0.001)
            assert not order, "the slot holder ended before everything queued: make it longer"
    finally:
        engine.close()
    assert order == [0, 5, 5, 3, 1, -2], order


# --- real processes --------------------------------------------------------------------------


def _receipts(path: Path) -> list[dict[str, Any]]:
    try:
        return [r["receipt"] for r in json.loads(path.read_text())["records"] if r["kind"] == "receipt"]
    except (OSError, ValueError):
        return []


@pytest.fixture(scope="module")
def paid_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    network = LocalNetwork(
        data_dir=tmp_path_factory.mktemp("credits"), workers=2, model="tiny",
        worker_args=["--heartbeat-interval", HEARTBEAT],
        gateway_args=["--heartbeat-interval", HEARTBEAT, "--audit-rate", "0", "--policy", "random"],
    )
    with network:
        yield network


@pytest.mark.integration
def test_twenty_requests_pay_each_worker_what_it_served(paid_net: LocalNetwork) -> None:
    answers = []
    with httpx.Client(base_url=paid_net.url, timeout=60) as http:
        for n in range(20):
            body = {"prompt": f"Question {n}:", "max_new_tokens": 4 + n % 5, "min_new_tokens": 4 + n % 5, "temperature": 0}
            response = http.post("/api/generate", json=body)
            assert response.status_code == 200, response.text
            answers.append(response.json())
    served = {a["node"] for a in answers}
    assert len(served) == 2, "both workers should have served"
    gateway_dir = paid_net.data_dir / "gateway"
    dirs = {load_or_create(paid_net.data_dir / f"worker-{i}").peer_id.to_base58(): paid_net.data_dir / f"worker-{i}" for i in (1, 2)}
    # The worker appends once our countersignature arrives, just after the answer.
    for peer, path in dirs.items():
        count = sum(1 for a in answers if a["node"] == peer)
        wait_for(lambda: len(_receipts(path / "ledger.json")) == count, 30, f"{count} receipts in {peer}'s ledger")
    params = _receipts(gateway_dir / "ledger.json")[0]["params"]
    for peer, path in dirs.items():
        mine = [a for a in answers if a["node"] == peer]
        rule = sum(credits.amount_mc(params, a["usage"]["prompt_tokens"], a["usage"]["completion_tokens"]) for a in mine)
        assert all(a["cost"]["millicredits"] == credits.amount_mc(params, a["usage"]["prompt_tokens"], a["usage"]["completion_tokens"]) for a in mine)
        owner, totals, _ = credits.verify_file(path / "ledger.json")
        assert owner == peer and totals.earned == rule and totals.spent == 0 and totals.receipts == len(mine)
    _, gateway_totals, _ = credits.verify_file(gateway_dir / "ledger.json")
    assert gateway_totals.spent == sum(a["cost"]["millicredits"] for a in answers) and gateway_totals.earned == 0
    assert gateway_totals.receipts == 20
    # Per API key (this gateway takes none: one public account), and on the credits page.
    info = get_json(f"{paid_net.url}/api/credits")
    assert info["spent"] == gateway_totals.spent and info["accounts"]["public"] == {"spent_mc": gateway_totals.spent, "requests": 20}
    for path in [*dirs.values(), gateway_dir]:
        result = run_cli("ledger", "verify", str(path / "ledger.json"))
        assert result.returncode == 0, result.stderr
    # The nodes' gossiped totals reach the gateway's node table.
    wait_for(
        lambda: all((n.get("credits") or {}).get("earned_mc") == credits.verify_file(dirs[n["peer_id"]] / "ledger.json")[1].earned
                    for n in get_json(f"{paid_net.url}/api/nodes")["nodes"] if n["peer_id"] in dirs),
        10, "the workers' earned credits in /api/nodes",
    )


def _write_ledger(data_dir: Path, receipts: list[dict[str, Any]]) -> credits.Ledger:
    ledger = credits.Ledger(data_dir, load_or_create(data_dir))
    for receipt in receipts:
        ledger.append(receipt)
    return ledger


@pytest.mark.integration
def test_a_forked_ledger_is_detected_within_a_gossip_round(paid_net: LocalNetwork, tmp_path: Path) -> None:
    """A third worker runs on a ledger, stops, and comes back on another ledger of the same
    key that differs at its last record: the gateway (and the other workers) hold both
    signed summaries, so they see the fork."""
    data_dir = tmp_path / "forker"
    me, buyer = load_or_create(data_dir), identity.generate()
    common = [_receipt(me, buyer, completion=5, rid="a")]
    first = _write_ledger(data_dir, common + [_receipt(me, buyer, completion=6, rid="b")])
    peer = me.peer_id.to_base58()
    args = ["--bootstrap", paid_net.worker_addrs[0], "--heartbeat-interval", HEARTBEAT]
    child, _ = start_worker(data_dir, *args, name="forker")
    try:
        wait_for(lambda: any(p["peer_id"] == peer and p["seq"] == 2 for p in get_json(f"{paid_net.url}/api/credits")["peers"]), 30, "the gateway to hear the first ledger")
    finally:
        child.stop()
    (data_dir / credits.LEDGER_FILE).unlink()
    second = _write_ledger(data_dir, common + [_receipt(me, buyer, completion=7, rid="c")])
    assert second.seq == first.seq and second.head != first.head
    child, _ = start_worker(data_dir, *args, name="forker-again")
    try:
        started = time.monotonic()
        forks = wait_for(lambda: [f for f in get_json(f"{paid_net.url}/api/credits")["forks"] if f["peer"] == peer], 30, "the fork to be detected")
        detected_in = time.monotonic() - started
        assert forks[0]["seq"] == 2 and set(forks[0]["hashes"]) == {first.head, second.head}
        print(f"fork detected {detected_in:.1f} s after the forked node listened (heartbeats every {HEARTBEAT} s)")
        # The proof is kept (written within seconds, off the event loop): two signed heartbeats, one per head.
        forks_file = paid_net.data_dir / "gateway" / "forks.json"
        saved = json.loads(wait_for(lambda: forks_file.exists() and forks_file.read_text(), 15, "forks.json"))
        assert saved[0]["peer"] == peer and len(saved[0]["evidence"]) == 2
    finally:
        child.stop()


@pytest.mark.integration
def test_a_richer_gateway_waits_less_and_neither_starves(tmp_path: Path) -> None:
    """One worker with one batch slot, two gateways sending 8 requests at a time each: the
    worker verifies both gateways' ledgers and admits the richer one's requests first."""
    worker_dir, rich_dir, poor_dir = tmp_path / "worker", tmp_path / "rich", tmp_path / "poor"
    stranger = identity.generate()
    rich, poor = load_or_create(rich_dir), load_or_create(poor_dir)
    # The rich gateway's key has served others before (earned 3,000 credits); the poor one
    # has spent 1,500 (500 in debt, above the worker's floor of -1,000).
    _write_ledger(rich_dir, [_receipt(rich, stranger, completion=1000, params=750_000_000, rid=f"r{n}") for n in range(4)])
    _write_ledger(poor_dir, [_receipt(stranger, poor, completion=1000, params=500_000_000, rid=f"p{n}") for n in range(3)])
    children = []
    try:
        worker, addr = start_worker(worker_dir, "--max-concurrency", "1", "--max-queue", "64", "--heartbeat-interval", HEARTBEAT, name="worker")
        children.append(worker)
        urls = {}
        for name, path in (("rich", rich_dir), ("poor", poor_dir)):
            gateway, urls[name] = start_gateway(path, "--bootstrap", addr, "--heartbeat-interval", HEARTBEAT, "--audit-rate", "0", name=name)
            children.append(gateway)
            wait_online(urls[name], 1, children=children)
        balances = {"rich": credits.ALLOWANCE_MC + 3_000_000, "poor": credits.ALLOWANCE_MC - 1_500_000}
        ids = {"rich": rich.peer_id.to_base58(), "poor": poor.peer_id.to_base58()}

        # A worker verifies the ledgers of peers that asked it for work: one request each first.
        for name in ("rich", "poor"):
            with httpx.Client(base_url=urls[name], timeout=60) as http:
                assert http.post("/api/generate", json={"prompt": "hello", "max_new_tokens": 2}).status_code == 200

        def verified() -> bool:
            result = run_cli("info", addr, timeout=30)
            if result.returncode != 0:
                return False
            known = json.loads(result.stdout).get("credits", {}).get("verified_mc", {})
            return all(known.get(ids[n]) is not None and abs(known[ids[n]] - balances[n]) < 200_000 for n in ids)

        wait_for(verified, 60, "the worker to verify both gateways' ledgers")

        def ask(name: str, n: int) -> dict[str, Any]:
            with httpx.Client(base_url=urls[name], timeout=120) as http:
                response = http.post("/api/generate", json={"prompt": f"{name} {n}", "max_new_tokens": 24, "min_new_tokens": 24, "temperature": 0})
                return {"name": name, "status": response.status_code, **(response.json() if response.status_code == 200 else {"body": response.text})}

        jobs = [(name, n) for n in range(24) for name in ("rich", "poor")]
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(lambda job: ask(*job), jobs))
    finally:
        for child in reversed(children):
            child.stop()
    assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200][:3]
    waits = {name: [r["timing"]["queue_ms"] for r in results if r["name"] == name] for name in ("rich", "poor")}
    medians = {name: statistics.median(w) for name, w in waits.items()}
    print(f"median queue time: rich {medians['rich']:.0f} ms, poor {medians['poor']:.0f} ms; max poor {max(waits['poor']):.0f} ms")
    assert len(waits["poor"]) == 24  # nobody starves: every poor request was answered
    assert medians["rich"] < medians["poor"]
