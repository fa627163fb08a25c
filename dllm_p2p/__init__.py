"""dllm-p2p: serve language models from many machines over libp2p, with no coordinator."""

__version__ = "0.1.0"
