"""A real worker process on 127.0.0.1, driven through the CLI, the client and raw streams."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from dllm_p2p import wire
from dllm_p2p.client import DialError, WorkerError, open_client
from dllm_p2p.host import parse_multiaddr, peer_info

from .procs import Child, run_cli, start_worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Child, str, Path]]:
    data_dir = tmp_path_factory.mktemp("worker")
    proc, addr = start_worker(data_dir, "--read-timeout", "1", "--max-new-tokens", "512")
    yield proc, addr, data_dir
    proc.stop()


@pytest.fixture(scope="module")
def narrow_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Child, str]]:
    """One batch slot and no queue: the second concurrent request must get `busy`."""
    proc, addr = start_worker(
        tmp_path_factory.mktemp("narrow"), "--max-concurrency", "1", "--max-queue", "0", "--max-new-tokens", "2000"
    )
    yield proc, addr
    proc.stop()


GOOD = {"prompt": "The quick brown fox", "max_new_tokens": 6, "temperature": 0}


async def assert_still_serves(addr: str) -> None:
    async with open_client() as client:
        done = await client.complete(addr, GOOD)
    assert done["type"] == "done" and done["usage"]["completion_tokens"] >= 1


# --- the happy path -----------------------------------------------------------------------


def test_cli_query_streams_tokens_and_prints_the_final_frame(worker: tuple[Child, str, Path]) -> None:
    _, addr, _ = worker
    args = ["query", addr, "Once upon a time", "--max-new-tokens", "12", "--min-new-tokens", "12", "--temperature", "0"]
    final = run_cli(*args, "--json")
    assert final.returncode == 0, final.stderr
    frame = json.loads(final.stdout)
    assert frame["type"] == "done" and frame["model"] == "tiny"
    assert frame["usage"]["completion_tokens"] == 12 and frame["usage"]["prompt_tokens"] > 0
    assert set(frame["timing"]) >= {"total_ms", "first_token_ms", "queue_ms"}
    streamed = run_cli(*args, "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == frame["text"] + "\n"  # greedy: the same text, printed as it came


def test_answers_are_signed_and_verify_offline(worker: tuple[Child, str, Path], tmp_path: Path) -> None:
    _, addr, _ = worker
    result = run_cli("query", addr, "Once upon a time", "--max-new-tokens", "8", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    frame = json.loads(result.stdout)
    assert frame["signature"]["peer_id"] == addr.rsplit("/", 1)[1] and frame["signature"]["model"] == "tiny"
    saved = tmp_path / "answer.json"
    saved.write_text(result.stdout)
    verified = run_cli("answer", "verify", str(saved))
    assert verified.returncode == 0, verified.stderr
    assert addr.rsplit("/", 1)[1] in verified.stdout and "finish_reason" in verified.stdout
    saved.write_text(json.dumps({**frame, "text": frame["text"] + " (edited)"}))
    tampered = run_cli("answer", "verify", str(saved))
    assert tampered.returncode == 1 and "another text" in tampered.stderr


async def test_client_receives_token_frames_that_add_up_to_the_text(worker: tuple[Child, str, Path]) -> None:
    _, addr, _ = worker
    async with open_client() as client:
        frames = [f async for f in client.generate(addr, {**GOOD, "max_new_tokens": 10, "min_new_tokens": 10, "stream": True, "id": "r1"})]
    tokens, done = frames[:-1], frames[-1]
    assert len(tokens) >= 2 and all(f["type"] == "token" for f in tokens)
    assert done["type"] == "done" and done["id"] == "r1"
    assert "".join(f["text"] for f in tokens) == done["text"]


def test_cli_query_sends_chat_messages_and_stop_strings(worker: tuple[Child, str, Path]) -> None:
    _, addr, _ = worker
    plain = run_cli("query", addr, "User: Hi\nAssistant:", "--max-new-tokens", "16", "--min-new-tokens", "16", "--temperature", "0", "--json")
    chat = run_cli("query", addr, "Hi", "--chat", "--max-new-tokens", "16", "--min-new-tokens", "16", "--temperature", "0", "--json")
    assert plain.returncode == chat.returncode == 0, chat.stderr
    plain_frame, chat_frame = json.loads(plain.stdout), json.loads(chat.stdout)
    # tiny has no chat template: the conversation becomes the same transcript.
    assert chat_frame["text"] == plain_frame["text"] and chat_frame["usage"] == plain_frame["usage"]
    stop = plain_frame["text"][5:8]
    cut = run_cli("query", addr, "Hi", "--chat", "--max-new-tokens", "16", "--min-new-tokens", "16", "--temperature", "0", "--stop", stop, "--json")
    cut_frame = json.loads(cut.stdout)
    assert cut_frame["text"] == plain_frame["text"].split(stop)[0] and cut_frame["finish_reason"] == "stop"


def test_info_describes_the_node(worker: tuple[Child, str, Path]) -> None:
    _, addr, data_dir = worker
    result = run_cli("info", addr)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["peer_id"] == addr.rsplit("/", 1)[1]
    assert info["models"] == ["tiny"]
    assert info["model_info"]["tiny"]["chat"] is False
    assert info["model_info"]["tiny"]["fingerprint"] == json.loads((data_dir / "fingerprints.json").read_text()).popitem()[1]
    assert info["limits"]["max_new_tokens"] == 512
    assert not any("/0.0.0.0/" in a for a in info["addrs"])
    node = json.loads((data_dir / "node.json").read_text())
    assert node["peer_id"] == info["peer_id"] and node["addrs"] == info["addrs"]
    assert stat.S_IMODE(os.stat(data_dir / "node.key").st_mode) == 0o600


def test_cli_reports_a_bad_address_clearly() -> None:
    result = run_cli("query", "/ip4/127.0.0.1/tcp/1", "hi")
    assert result.returncode == 2 and "/p2p/<peer-id>" in result.stderr


# --- keep-alive: several requests in turn on one stream ----------------------------------


async def test_keep_alive_stream_answers_in_order_and_ends_when_the_dialer_closes(worker: tuple[Child, str, Path]) -> None:
    _, addr, _ = worker
    ask = {**GOOD, "keep_alive": True}
    async with open_client() as client:
        failed_before = (await client.info(addr))["load"]["failed"]
        stream = await client.open_stream(addr, wire.GENERATE_PROTOCOL)
        reader = wire.FrameReader(stream, wire.MAX_RESPONSE_FRAME)
        with trio.fail_after(60):
            await stream.write(wire.encode_frame({**ask, "id": "a"}))
            a = await reader.read_frame()
            # The next request may also arrive while one is still generating.
            slow = {**ask, "id": "b", "max_new_tokens": 60, "min_new_tokens": 60, "stream": True}
            await stream.write(wire.encode_frame(slow) + wire.encode_frame({**ask, "id": "c"}))
            frames = []
            while len([f for f in frames if f["type"] == "done"]) < 2:
                frames.append(await reader.read_frame())
            await stream.close()  # our side: the worker must end the stream too
            assert await reader.read_frame() is None
        assert a is not None and a["type"] == "done" and a["id"] == "a"
        done = [f for f in frames if f["type"] == "done"]
        assert [f["id"] for f in done] == ["b", "c"] and done[1]["text"] == a["text"]
        assert frames[-1]["id"] == "c" and {f["type"] for f in frames if f["id"] == "b"} == {"token", "done"}
        assert (await client.info(addr))["load"]["failed"] == failed_before


async def test_a_request_sent_early_is_answered_even_if_the_dialer_then_closes(worker: tuple[Child, str, Path]) -> None:
    _, addr, _ = worker
    ask = {**GOOD, "keep_alive": True}
    async with open_client() as client:
        stream = await client.open_stream(addr, wire.GENERATE_PROTOCOL)
        reader = wire.FrameReader(stream, wire.MAX_RESPONSE_FRAME)
        with trio.fail_after(60):
            slow = {**ask, "id": "a", "max_new_tokens": 60, "min_new_tokens": 60}
            await stream.write(wire.encode_frame(slow) + wire.encode_frame({**ask, "id": "b"}))
            await stream.close()  # nothing more to ask: both answers are still owed
            frames = [await reader.read_frame(), await reader.read_frame()]
            assert await reader.read_frame() is None
    assert [(f["type"], f["id"]) for f in frames if f] == [("done", "a"), ("done", "b")]


async def test_keep_alive_client_reuses_its_stream_and_replaces_a_dead_one(worker: tuple[Child, str, Path]) -> None:
    _, addr, _ = worker
    async with open_client(keep_alive=True) as client:
        peer = await client.connect(addr)
        first = await client.complete(addr, GOOD)
        (kept,) = client._idle[peer]
        second = await client.complete(addr, {**GOOD, "stream": True})
        assert client._idle[peer][0].stream is kept.stream  # the same stream carried both
        await kept.stream.reset()  # as if the worker had dropped it meanwhile
        third = await client.complete(addr, GOOD)
        assert client._idle[peer][0].stream is not kept.stream
    assert first["text"] == second["text"] == third["text"]  # greedy, and nothing was lost


async def test_a_protocol_the_worker_does_not_serve_is_a_dial_error(worker: tuple[Child, str, Path]) -> None:
    _, addr, _ = worker
    async with open_client() as client:
        with pytest.raises(DialError, match="does not serve /dllm/nothing/1.0.0"):
            await client._open(addr, "/dllm/nothing/1.0.0", wire.encode_frame(GOOD))
    await assert_still_serves(addr)


# --- bad input: each gets its error code, and the worker answers the next request -------


async def raw_exchange(addr: str, payload: bytes, close_write: bool = True) -> dict:
    async with open_client() as client:
        stream = await client.open_stream(addr, wire.GENERATE_PROTOCOL)
        await stream.write(payload)
        if close_write:
            await stream.close_write()
        frame = await wire.FrameReader(stream, wire.MAX_RESPONSE_FRAME).read_frame()
    assert frame is not None
    return frame


@pytest.mark.parametrize(
    "payload, code, fragment",
    [
        (wire.encode_uvarint(2**31) + b"x" * 100, "too_large", "exceeds the limit"),
        (b"\x03\xc1\xc1\xc1", "bad_request", "not valid msgpack"),
        (wire.encode_frame({"prompt": "x", "evil": 1}), "bad_request", "unknown request keys: evil"),
        (wire.encode_frame({"prompt": ["not", "a", "string"]}), "bad_request", "'prompt' must be a string"),
        (wire.encode_frame({"prompt": "x", "max_new_tokens": -3}), "bad_request", "max_new_tokens"),
        (wire.encode_frame({"prompt": "x", "model": "llama-9000"}), "unknown_model", "llama-9000"),
        (wire.encode_frame({"prompt": "word " * 5000}), "too_large", "prompt too long"),
        (b"\x05ab", "bad_request", "stream ended"),
    ],
    ids=["huge-length", "garbage", "unknown-key", "wrong-type", "negative", "unknown-model", "prompt-too-long", "truncated"],
)
async def test_bad_input_gets_an_error_frame(worker: tuple[Child, str, Path], payload: bytes, code: str, fragment: str) -> None:
    _, addr, _ = worker
    frame = await raw_exchange(addr, payload)
    assert frame["type"] == "error" and frame["code"] == code, frame
    assert fragment in frame["message"]
    await assert_still_serves(addr)


async def test_a_stalled_dialer_is_timed_out(worker: tuple[Child, str, Path]) -> None:
    _, addr, _ = worker
    frame = await raw_exchange(addr, b"", close_write=False)  # sends nothing, keeps the stream open
    assert frame["code"] == "timeout" and "no request within" in frame["message"]
    await assert_still_serves(addr)


async def test_plaintext_dialer_is_refused(worker: tuple[Child, str, Path]) -> None:
    _, addr, _ = worker
    key_pair = create_new_key_pair()
    plain = new_host(key_pair=key_pair, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)})
    async with plain.run([parse_multiaddr("/ip4/127.0.0.1/tcp/0")]):
        with trio.fail_after(30):
            with pytest.raises(Exception):
                await plain.connect(peer_info(addr))
    await assert_still_serves(addr)


async def test_over_capacity_gets_busy_and_disconnect_stops_generation(narrow_worker: tuple[Child, str]) -> None:
    _, addr = narrow_worker
    long = {"prompt": "Tell me a story", "max_new_tokens": 480, "min_new_tokens": 480, "stream": True}
    async with open_client() as client:
        async with aclosing(client.generate(addr, long)) as frames:
            first = await frames.__anext__()
            assert first["type"] == "token"
            with pytest.raises(WorkerError) as busy:
                await client.complete(addr, GOOD)
            assert busy.value.code == "busy"
        # Leaving the block reset the stream: the worker must drop the generation and
        # free its only slot, well before 480 tokens could have been generated.
        with trio.fail_after(20):
            while (await client.info(addr))["load"]["running"] != 0:
                await trio.sleep(0.05)
        done = await client.complete(addr, GOOD)
        assert done["usage"]["completion_tokens"] >= 1


# --- lifecycle ------------------------------------------------------------------------


def test_sigterm_stops_cleanly_and_the_peer_id_is_stable(tmp_path: Path) -> None:
    proc, addr = start_worker(tmp_path)
    assert proc.stop(timeout=10) == 0, proc.output()
    proc.wait_for_line("worker stopped", stream="err", timeout=5)
    again, addr2 = start_worker(tmp_path)
    try:
        assert addr2.rsplit("/", 1)[1] == addr.rsplit("/", 1)[1]
    finally:
        again.stop()


def test_a_second_process_on_a_data_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    proc, _ = start_worker(tmp_path)
    try:
        second = run_cli("worker", "--model", "tiny", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(tmp_path), timeout=60)
        assert second.returncode == 2
        assert str(tmp_path) in second.stderr and f"process {proc.popen.pid}" in second.stderr
        assert "peer id" not in second.stderr  # refused before touching the key or the model
    finally:
        proc.stop()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    proc, addr = start_worker(tmp_path)
    proc.kill()  # SIGKILL: the lock file stays, naming a dead pid
    assert (tmp_path / "repo.lock").read_text().strip() == str(proc.popen.pid)
    again, addr2 = start_worker(tmp_path)
    try:
        assert addr2.rsplit("/", 1)[1] == addr.rsplit("/", 1)[1]
        assert (tmp_path / "repo.lock").read_text().strip() == str(again.popen.pid)
    finally:
        again.stop()


def test_raw_client_example_talks_to_a_worker(worker: tuple[Child, str, Path]) -> None:
    _, addr, _ = worker
    example = Path(__file__).resolve().parent.parent / "examples" / "raw_client.py"
    result = subprocess.run(
        [sys.executable, str(example), addr, "Hello there"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr
    assert "'type': 'done'" in result.stdout and "'model': 'tiny'" in result.stdout


def test_model_init_tiny_saves_a_checkpoint_transformers_can_load(tmp_path: Path) -> None:
    result = run_cli("model", "init-tiny", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tiny")
    assert model.config.model_type == "gpt2" and len(tokenizer("hello world")["input_ids"]) >= 1


def test_registry_verify_cli_exit_codes(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "blockchain.json"
    ok = run_cli("registry", "verify", str(example))
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(example.read_text())
    doc["blocks"][1]["record"]["models"] = ["forged"]
    bad = tmp_path / "blockchain.json"
    bad.write_text(json.dumps(doc))
    refused = run_cli("registry", "verify", str(bad))
    assert refused.returncode == 1 and "block 1: bad signature" in refused.stderr
