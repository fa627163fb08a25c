"""HTTP gateway to a dllm-p2p network: picks a live worker and relays its answer."""
