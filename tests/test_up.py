"""The README's run command, as a user runs it: `python -m dllm_p2p up`, then Ctrl-C."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import httpx
import pytest

from .procs import Child, offline_env

pytestmark = pytest.mark.integration


def test_up_starts_a_network_serves_the_page_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    up = Child(
        [sys.executable, "-m", "dllm_p2p", "up", "--workers", "2", "--port", "0", "--data-dir", str(tmp_path)],
        name="up",
        env=offline_env(),
    )
    try:
        url = up.wait_for_line(r"open the page:\s+(http://127\.0\.0\.1:\d+)/", timeout=240).group(1)
        up.wait_for_line(r"Ctrl-C stops everything", timeout=10)
        assert any("notice:" in line and "tiny" in line for line in up.stderr)  # no gpt2 cached here
        table = "\n".join(up.stdout)
        assert table.count(" yes ") == 2
        with httpx.Client(base_url=url, timeout=60) as http:
            assert "dllm-p2p" in http.get("/").text
            assert http.post("/api/generate", json={"prompt": "Hi", "max_new_tokens": 4}).status_code == 200
            peers = [n["peer_id"] for n in http.get("/api/nodes").json()["nodes"]]
        up.popen.send_signal(signal.SIGINT)
        assert up.popen.wait(timeout=60) == 0, up.output()
        up.wait_for_line("^stopped$", stream="err", timeout=5)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/healthz", timeout=2)
        # Each worker signed a deregister record on its way out.
        from dllm_p2p.registry.chain import verify_chain

        for i in (1, 2):
            chain = verify_chain((tmp_path / f"worker-{i}" / "blockchain.json").read_bytes())
            own = json.loads((tmp_path / f"worker-{i}" / "node.json").read_text())["peer_id"]
            assert own in peers and own not in chain.nodes()
    finally:
        up.kill()
