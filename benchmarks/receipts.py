"""``python -m benchmarks.receipts``: the latency a credits receipt adds to an answer.

One ``tiny`` worker and two gateways on 127.0.0.1: one pays with receipts (the default),
the other runs with ``--no-credits``. The same requests go through each in turn, one at a
time; the first ``--warmup`` of each are not counted. Prints the median and p90 latency of
each and their difference (docs/CREDITS.md, "What it costs"). Every process is stopped at
the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dllm_p2p.localnet import start_gateway, start_worker, wait_online


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.receipts", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300, help="requests through each gateway (default 300)")
    p.add_argument("--warmup", type=int, default=10, help="uncounted requests first (default 10)")
    p.add_argument("--tokens", type=int, default=8, help="tokens per answer, exactly (default 8)")
    args = p.parse_args(argv)
    if args.requests <= args.warmup or args.tokens < 1:
        p.error("--requests must exceed --warmup, --tokens must be at least 1")
    base = Path(tempfile.mkdtemp(prefix="dllm-receipts-"))
    children = []
    try:
        worker, addr = start_worker(base / "worker", "--heartbeat-interval", "1", "--threads", "1")
        children.append(worker)
        urls = {}
        for name, extra in (("receipts", []), ("no-credits", ["--no-credits"])):
            gateway, urls[name] = start_gateway(base / name, "--bootstrap", addr, "--heartbeat-interval", "1", "--audit-rate", "0", *extra, name=name)
            children.append(gateway)
            wait_online(urls[name], 1, children=children)
        latency: dict[str, list[float]] = {name: [] for name in urls}
        body = {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens, "temperature": 0}
        with httpx.Client(timeout=60) as http:
            for n in range(args.requests):
                for name, url in urls.items():
                    started = time.perf_counter()
                    response = http.post(f"{url}/api/generate", json={"prompt": f"Question {n}:", **body})
                    response.raise_for_status()
                    if n >= args.warmup:
                        latency[name].append((time.perf_counter() - started) * 1000)
        for name, values in latency.items():
            values.sort()
            print(f"{name:>10}: {len(values)} requests, median {statistics.median(values):.2f} ms, p90 {values[int(0.9 * len(values))]:.2f} ms")
        added = statistics.median(latency["receipts"]) - statistics.median(latency["no-credits"])
        print(f"a receipt adds {added:.2f} ms (median)")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for child in reversed(children):
            child.stop()


if __name__ == "__main__":
    sys.exit(main())
