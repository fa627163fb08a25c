"""A model's fingerprint: one hash over what the model computes with, weights and tokenizer.

Two workers that say they serve "smollm2" may hold different files (another quantization,
a fine-tune, a tampered copy). The fingerprint tells them apart: ``sha256:<hex>`` over the
state dict (each tensor's name, dtype, shape and bytes, in name order), the tokenizer's
serialized form and its chat template. It is computed on the loaded float32 tensors, so it
names what the node actually runs, whatever the file format was.

A model on the llama.cpp backend computes with other numbers (its file's quantized blocks,
or llama.cpp's requantization of them, and 8-bit activations), so its fingerprint is
another: the bytes of the GGUF file the user named, the ``--quantize`` type and the
tokenizer, under a domain of its own. Audits compare only workers with equal fingerprints,
so a llama.cpp worker is checked by another llama.cpp worker, never against float32.

Hashing 135M float32 parameters takes about 0.6 s on this machine; the result is cached in
the node's data dir, keyed by the model's source (file paths, sizes and times, or the
spec and versions of a model built in code), so a restart does not pay it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ..fsutil import write_json_atomic
from .loading import LoadedModel

log = logging.getLogger("dllm_p2p.engine")

DOMAIN = b"dllm-model-fingerprint/1\n"
LLAMACPP_DOMAIN = b"dllm-model-fingerprint/1 llama.cpp\n"
CACHE_FILE = "fingerprints.json"
#: Entries kept in the cache file (a node that tries many models keeps the newest).
CACHE_ENTRIES = 32


def compute(loaded: LoadedModel) -> str:
    """The fingerprint of ``loaded``, hashed now.

    A span of a model (``loaded.span``) gets its whole model's fingerprint: each tensor the
    span does not hold (on the ``meta`` device) is read from ``loaded.tensor_source``, hashed
    and dropped before the next, so the whole model is never in memory at once.
    """
    if loaded.backend == "llamacpp":
        return _compute_gguf(loaded)
    digest = hashlib.sha256(DOMAIN)
    source = loaded.tensor_source
    try:
        for name, tensor in sorted(loaded.model.state_dict().items()):
            if tensor.is_meta:
                if source is None:
                    raise ValueError(f"cannot fingerprint {loaded.name!r}: {name!r} is not loaded and has no source")
                held, tensor = tensor, source(name)
                if tensor.dtype != held.dtype or tensor.shape != held.shape:
                    raise ValueError(
                        f"{name!r} from the tensor source is {tensor.dtype} {tuple(tensor.shape)}, "
                        f"the model's {held.dtype} {tuple(held.shape)}"
                    )
            data = tensor.detach().contiguous().cpu()
            header = f"{name}\0{data.dtype}\0{tuple(data.shape)}\0".encode()
            digest.update(len(header).to_bytes(4, "big") + header)
            digest.update(memoryview(data.view(-1).view(_byte_dtype()).numpy()))
            del tensor, data
    finally:
        if source is not None:
            source.close()
    return _with_tokenizer(digest, loaded.tokenizer)


def _compute_gguf(loaded: LoadedModel) -> str:
    model = loaded.model
    digest = hashlib.sha256(LLAMACPP_DOMAIN)
    digest.update(f"quantize\0{model.quantize}\0".encode())
    with open(model.source, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return _with_tokenizer(digest, loaded.tokenizer)


def _with_tokenizer(digest: Any, tokenizer: Any) -> str:
    """The fingerprint: ``digest`` of the weights, then the tokenizer and its chat template."""
    digest.update(b"tokenizer\0" + _tokenizer_bytes(tokenizer))
    digest.update(b"chat_template\0" + str(getattr(tokenizer, "chat_template", "") or "").encode())
    return "sha256:" + digest.hexdigest()


def fingerprint(loaded: LoadedModel, data_dir: str | Path | None = None) -> str:
    """The fingerprint of ``loaded``, from ``<data_dir>/fingerprints.json`` when its source
    is unchanged since it was last hashed; sets ``loaded.fingerprint`` and returns it."""
    cache_path = Path(data_dir).expanduser() / CACHE_FILE if data_dir is not None else None
    cache = _read_cache(cache_path) if cache_path is not None else {}
    key = hashlib.sha256(loaded.source.encode()).hexdigest() if loaded.source else None
    value = cache.get(key) if key else None
    if not isinstance(value, str) or not value.startswith("sha256:"):
        value = compute(loaded)
        if key and cache_path is not None:
            cache.pop(key, None)
            cache[key] = value
            try:
                write_json_atomic(cache_path, dict(list(cache.items())[-CACHE_ENTRIES:]))
            except OSError as exc:
                log.warning("could not cache the model fingerprint in %s: %s", cache_path, exc)
    loaded.fingerprint = value
    return value


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _tokenizer_bytes(tokenizer: Any) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str().encode()
    vocab = tokenizer.get_vocab()
    return json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8
